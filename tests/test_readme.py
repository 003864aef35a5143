"""README.md's examples, extracted from the file itself so that they cannot drift from the code.

* Every ```python block runs, in README order, in a scratch folder holding small stand-ins for the
  files it names (``fixed.nii.gz``, ``net_latest.pth``, ``eoir.onnx``, ...). The few edits that
  make a block small (``SMALL``) must each still apply, or the test fails.
* Every ``eoir ...`` command line in a ```bash block (and the ``eoir_cli.train`` arguments given to
  ``torchrun``) parses with the real command: options, choices and types exist as written.
  ``RUN`` commands are also run on the small files.
* Every ``--option`` in a README table exists in the command its section is about.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from eoir_cli.cli import app
from tests.conftest_data import blob, save

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()

# Edits that keep a README block's meaning but make it fit a unit test (all must apply).
SMALL = [
    ("refine=20)", "refine=2)"),                                    # register(): 2 refinement steps
    ("torch.rand(1, 1, 160, 224, 192)", "torch.rand(1, 1, 32, 32, 32)"),  # load_model(): a 32^3 pair
]
# README commands that are also run here, with the same small edits.
RUN = {
    "eoir register fixed.nii.gz moving.nii.gz -o out/": [("--refine 20", "--refine 2"), ("-o out/", "-o out_cli/")],
}


def _blocks(lang: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"```{lang}\n(.*?)```", README, re.S)]


def _command_lines() -> list[list[str]]:
    """Argument lists of every ``eoir`` / ``torchrun -m eoir_cli.train`` command in the bash blocks."""
    out = []
    for block in _blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in re.split(r"&&|\|\|?|;", line):
                words = shlex.split(part)
                if words[:1] == ["eoir"]:
                    out.append(words)
                elif words[:1] == ["torchrun"] and "eoir_cli.train" in words:
                    out.append(["eoir", "train", *words[words.index("eoir_cli.train") + 1:]])
    return out


def _click_app() -> typer.main.TyperGroup:
    return typer.main.get_command(app)  # type: ignore[return-value]


def _options_of(command: str) -> set[str]:
    group = _click_app()
    names = {o for p in group.params for o in (*p.opts, *p.secondary_opts)}
    sub = group.commands[command]
    return names | {o for p in sub.params for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("words", _command_lines(), ids=lambda w: " ".join(w)[:60])
def test_readme_command_parses(words: list[str]) -> None:
    group = _click_app()
    args = words[1:]
    ctx = group.make_context("eoir", list(args), resilient_parsing=False)
    name, sub, rest = group.resolve_command(ctx, [*getattr(ctx, "_protected_args", []), *ctx.args])
    assert sub is not None, f"README command {' '.join(words)!r}: no such eoir command"
    sub.make_context(name, rest, parent=ctx)  # raises a UsageError for an unknown option, choice or type


def test_readme_has_commands_to_check() -> None:
    commands = {w[1] for w in _command_lines()}
    assert {"register", "train", "test", "export", "bench", "demo"} <= commands


def _tables_by_command() -> list[tuple[str, str]]:
    """(command, first cell) of every table row under a ``## ... `eoir X` `` heading or in the commands table."""
    rows = []
    command = None
    for line in README.splitlines():
        heading = re.match(r"^#{2,3} .*`eoir (\w+)`", line)
        if heading:
            command = heading.group(1)
        elif line.startswith("## "):
            command = None
        elif line.startswith("| `eoir "):
            rows.append((line.split("`")[1].split()[1], line.split("|")[1]))
        elif line.startswith("|") and command:
            rows.append((command, line.split("|")[1]))
    return rows


def test_readme_table_options_exist() -> None:
    checked = 0
    for command, cell in _tables_by_command():
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cell):
            assert option in _options_of(command), f"README table: eoir {command} has no option {option}"
            checked += 1
    assert checked >= 40  # the register, train and commands tables


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small stand-ins for every file README's examples name."""
    from eoir_cli.checkpoint import eoir_to_original_state_dict
    from eoir_cli.config import resolve_config
    from eoir_cli.model import EOIR
    from export.onnx_export import torch2onnx

    ws = tmp_path_factory.mktemp("readme")
    shape = (40, 48, 40)
    for name, shift in (("fixed", 0), ("moving", 3)):
        image, labels = blob(shape, shift)
        save(ws / f"{name}.nii.gz", image.astype(np.float32), spacing=2.0)
        save(ws / f"{name}_seg.nii.gz", labels, spacing=2.0)
    (ws / "pairs.csv").write_text("fixed,moving,fixed_seg,moving_seg\n"
                                  "fixed.nii.gz,moving.nii.gz,fixed_seg.nii.gz,moving_seg.nii.gz\n")
    torch.manual_seed(0)
    tiny = EOIR(resolve_config("lumir", channels=4)).eval()
    # An original-code checkpoint (dict with model_state_dict), as `load_model("net_latest.pth")` expects.
    torch.save({"model_state_dict": eoir_to_original_state_dict(tiny.state_dict(), grid_size=(32, 32, 32))},
               ws / "net_latest.pth")
    torch2onnx(tiny, ws / "eoir.onnx", shape=(32, 32, 32), verify=False)
    return ws


def test_readme_python_blocks_run(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    blocks = _blocks("python")
    assert len(blocks) >= 4
    used = set()
    rng = np.random.default_rng(0)
    for block in blocks:
        code = block
        for old, new in SMALL:
            if old in code:
                code = code.replace(old, new)
                used.add(old)
        # What the surrounding text says the names are: `moving`/`fixed` (backend example) and
        # `moving01`/`fixed01` (run_pair) normalised (D, H, W) arrays, `disp` an (N, 3, D, H, W) field in
        # voxels (inverse example), `ras_points_in_moving` (n, 3) RAS mm.
        pair = {name: rng.random((32, 32, 32), dtype=np.float32) for name in ("moving", "fixed")}
        namespace = {"__name__": "readme", **pair, "moving01": pair["moving"], "fixed01": pair["fixed"],
                     "disp": torch.full((1, 3, 16, 16, 16), 0.5), "ras_points_in_moving": np.zeros((2, 3))}
        try:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
        except Exception as err:
            raise AssertionError(f"README python block failed ({type(err).__name__}: {err}):\n{block}") from err
    assert used == {old for old, _ in SMALL}, f"README changed: edits no longer apply: {set(dict(SMALL)) - used}"
    # The register() example wrote its outputs; the SimpleITK / scipy examples read them.
    assert (workspace / "out" / "metrics.json").is_file()


@pytest.mark.parametrize("prefix", sorted(RUN))
def test_readme_commands_run_on_small_data(workspace: Path, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.chdir(workspace)
    matches = [w for w in _command_lines() if " ".join(w).startswith(prefix)]
    assert matches, f"README no longer shows {prefix!r}"
    line = " ".join(matches[0])
    for old, new in RUN[prefix]:
        assert old in line, f"README command changed: {line!r} lacks {old!r}"
        line = line.replace(old, new)
    result = runner.invoke(app, shlex.split(line)[1:])
    assert result.exit_code == 0, f"{line}\n{result.output}"
