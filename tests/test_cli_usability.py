"""The CLI's error policy, `--version`, `--debug` and what `--help` shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eoir_cli import __version__
from eoir_cli.cli import app
from eoir_cli.commands.common import DEBUG_ENV
from eoir_cli.errors import InputError

runner = CliRunner()


def _raise(exc: BaseException):  # noqa: ANN202
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    return boom


def test_version_prints_the_package_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"eoir {__version__}"


def test_input_error_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr("eoir_cli.info.preset_table", _raise(InputError("shape: expected 3 sizes, got 2")))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: shape: expected 3 sizes, got 2"


def test_unexpected_error_is_reported_as_a_bug_with_the_debug_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr("eoir_cli.info.preset_table", _raise(ValueError("index 7 out of range")))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) <= 2  # one message (rich may wrap it), never a traceback
    assert "Traceback" not in result.output
    assert "unexpected ValueError: index 7 out of range" in result.output and "--debug" in result.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_an_unexpected_error(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr("eoir_cli.info.preset_table", _raise(RuntimeError("real bug")))
    if how == "env":
        monkeypatch.setenv(DEBUG_ENV, "1")
        result = runner.invoke(app, ["info"])
    else:
        result = runner.invoke(app, ["--debug", "info"])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "real bug"


def test_ctrl_c_is_one_line_saying_what_was_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr("eoir_cli.train.train", _raise(KeyboardInterrupt()))
    result = runner.invoke(app, ["train", "--steps", "1", "--out", "unused"])
    assert result.exit_code == 130
    assert result.output.startswith("interrupted: the run folder keeps last.pt")
    assert "eoir train --resume" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_export_of_a_missing_or_unreadable_checkpoint_is_one_line_and_writes_nothing(
        tmp_path: Path, content: bytes | None) -> None:
    model = tmp_path / "model.pth"
    if content is not None:
        model.write_bytes(content)
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(model), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and str(model) in result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == ([model] if content is not None else [])


def test_bad_train_config_value_is_one_line() -> None:
    # TrainConfig validates --val-pairs etc. itself; at the CLI boundary those are the user's values.
    result = runner.invoke(app, ["train", "--shape", "1", "64", "64", "--out", "unused"])
    assert result.exit_code == 1
    assert result.output.startswith("error: shape: expected 3 sizes >= 2, got (1, 64, 64)")


@pytest.mark.parametrize("command", ["register", "test", "export", "bench", "demo", "train", "info"])
def test_help_shows_no_value_type_for_flags(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "<int,int,int>" not in result.output


def test_shape_options_read_d_h_w_in_help() -> None:
    for command in ("train", "bench", "export", "info"):
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert re.search(r"--shape\s+D H W", result.output), (command, result.output)


def test_training_bar_keeps_step_count_and_eta_at_80_columns() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from eoir_cli.commands.train import make_train_progress, train_terms_text

    con = Console(width=80, file=io.StringIO(), record=True)
    progress = make_train_progress(con)
    info = SimpleNamespace(terms={"total": -0.41234, "ncc": -0.50121, "smooth": 0.03125, "dice": 0.2}, lr=1e-4)
    task = progress.add_task("train", total=2000, terms=train_terms_text(info, " val_dice 0.7012"))
    progress.update(task, completed=120)
    con.print(progress.get_renderable())
    lines = [line for line in con.export_text().splitlines() if line.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert "120/2000" in lines[0] and "eta" in lines[0] and "total -0.4123" in lines[0]


def test_no_progress_bar_is_drawn_before_an_early_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from eoir_cli.errors import EoirError

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr("eoir_cli.train.train", _raise(EoirError("--data-dir x: no such directory")))
    result = runner.invoke(app, ["train", "--steps", "1", "--out", "unused"])
    assert result.exit_code == 1
    assert result.output == "error: --data-dir x: no such directory\n"


def test_train_help_shows_the_defaults_of_train_config() -> None:
    from eoir_cli.config import TrainConfig

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.strip().startswith("│ --")}
    d = TrainConfig()
    for option, value in (("--lr", d.lr), ("--val-every", d.val_every), ("--save-every", d.save_every),
                          ("--batch-size", d.batch_size), ("--smooth-weight", d.smooth_weight),
                          ("--val-pairs", d.val_pairs), ("--preset", d.preset), ("--out", d.out)):
        assert f"[default: {value}]" in rows[option], rows[option]
    assert "[default: off]" in rows["--amp"] and "[default: the preset's]" in rows["--channels"]


def test_missing_optional_library_is_one_line_our_own_import_error_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    missing = ModuleNotFoundError("No module named 'tensorrt'", name="tensorrt")
    monkeypatch.setattr("eoir_cli.info.preset_table", _raise(missing))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 1 and result.output.strip() == "error: No module named 'tensorrt'"
    ours = ImportError("cannot import name 'nope' from 'eoir_cli.model'", name="eoir_cli.model")
    monkeypatch.setattr("eoir_cli.info.preset_table", _raise(ours))
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 2 and "unexpected ImportError" in result.output


def test_quick_exit_joins_writers_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    marker = tmp_path / "written.txt"
    code = (
        "import threading, time\n"
        "from eoir_cli.cli import quick_exit\n"
        f"def write():\n    time.sleep(0.3)\n    open({str(marker)!r}, 'w').write('done')\n"
        "threading.Thread(target=write).start()\n"
        "print('buffered line')\n"  # a pipe is block-buffered: lost unless flushed
        "quick_exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "buffered line\n"
    assert marker.read_text() == "done"  # the writer thread finished before the process ended
    message = subprocess.run([sys.executable, "-c", "from eoir_cli.cli import quick_exit; quick_exit('bad input')"],
                             capture_output=True, text=True, timeout=120)
    assert (message.returncode, message.stderr) == (1, "bad input\n")


def test_entry_point_keeps_the_error_line_and_status_with_the_quick_exit(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "eoir_cli.cli", "register", str(tmp_path / "missing.nii.gz"),
                           str(tmp_path / "other.nii.gz"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "missing.nii.gz" in lines[0], lines
    assert not (tmp_path / "out").exists()
