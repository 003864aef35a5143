"""Training loop: few-step runs on synth, resume equals the uninterrupted run, CLI, DDP (gloo)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eoir_cli.cli import app
from eoir_cli.errors import EoirError
from eoir_cli.train import TrainConfig, load_resume_config, poly_lr_lambda, rng_state, set_rng_state, train

runner = CliRunner()


def _tiny(out: Path, **kw: object) -> TrainConfig:
    base = dict(dataset="synth", data_dir=None, shape=(32, 32, 32), channels=2, steps=4, val_every=2,
                save_every=2, val_pairs=1, out=str(out), device="cpu", log_every=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    # shapes-only synth (no data dir exists under a tmp root), so the test needs no files.
    torch.manual_seed(0)
    train(_tiny(out, data_dir=str(_empty_maps(tmp_path_factory))))
    return out


def _empty_maps(factory: pytest.TempPathFactory) -> Path:
    """A directory with one small label map (two labels) written by the test."""
    import nibabel as nib
    import numpy as np

    root = factory.mktemp("maps")
    data = np.zeros((24, 24, 24), np.int16)
    data[6:18, 6:18, 6:18] = 1
    data[10:14, 10:14, 10:14] = 2
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / "map.nii.gz"))
    return root


def test_straight_run_writes_outputs(straight_run: Path) -> None:
    for name in ("config.json", "metrics.csv", "last.pt", "best.pt", "model.safetensors"):
        assert (straight_run / name).is_file(), name
    rows = _rows(straight_run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for key in ("total", "ncc", "smooth", "dice", "lr", "time_s"):
        assert key in rows[0]
    assert rows[1]["val_dice"] != "" and rows[0]["val_dice"] == ""
    # poly decay: step 1 uses lr0, step 2 lr0 * (1 - 1/4)^0.9 = 1e-4 * 0.7719...
    assert float(rows[0]["lr"]) == pytest.approx(1e-4)
    assert float(rows[1]["lr"]) == pytest.approx(1e-4 * 0.75**0.9, rel=1e-6)
    config = json.loads((straight_run / "config.json").read_text())
    assert config["train"]["channels"] == 2 and config["total_steps"] == 4
    data = torch.load(straight_run / "last.pt", weights_only=True)
    assert data["step"] == 4 and data["train_config"]["shape"] == [32, 32, 32]


def test_resume_reproduces_uninterrupted_losses(straight_run: Path, tmp_path: Path) -> None:
    maps = json.loads((straight_run / "config.json").read_text())["train"]["data_dir"]
    out = tmp_path / "run"

    class Killed(Exception):
        pass

    def kill_after_two(info: object) -> None:
        if info.step == 2:  # type: ignore[attr-defined]
            raise Killed

    with pytest.raises(Killed):
        train(_tiny(out, data_dir=maps), kill_after_two)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    torch.manual_seed(123)  # a different global RNG must not matter
    result = train(_tiny(out, data_dir=maps, resume=str(out)))
    assert result.steps == 4
    straight, resumed = _rows(straight_run / "metrics.csv"), _rows(out / "metrics.csv")
    assert [r["step"] for r in resumed] == ["1", "2", "3", "4"]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("total", "ncc", "smooth", "dice", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), (a["step"], key)
    wa = torch.load(straight_run / "last.pt", weights_only=True)["model"]
    wb = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_existing_run_is_not_overwritten(straight_run: Path) -> None:
    before = (straight_run / "last.pt").read_bytes()
    with pytest.raises(EoirError, match="already holds a run"):
        train(_tiny(straight_run))
    assert (straight_run / "last.pt").read_bytes() == before


def test_resume_refuses_changed_options(straight_run: Path) -> None:
    config = load_resume_config(str(straight_run))
    with pytest.raises(EoirError, match=r"options \['channels'\] differ"):
        train(config.replace(channels=4, resume=str(straight_run)))


def test_poly_lr_lambda_golden() -> None:
    fn = poly_lr_lambda(10)
    assert fn(0) == 1.0
    assert fn(5) == pytest.approx(0.5**0.9)  # (1 - 5/10)^0.9 = 0.5359...
    assert fn(10) == 0.0 and fn(12) == 0.0


def test_rng_state_roundtrip() -> None:
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="preset: expected one of"):
        TrainConfig(preset="nope")
    with pytest.raises(ValueError, match="steps: expected >= 1"):
        TrainConfig(steps=0)


def test_cli_train_synth_and_bad_shape(tmp_path: Path) -> None:
    maps = _write_map(tmp_path)
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train", "--dataset", "synth", "--data-dir", str(maps), "--shape", "32", "32", "32",
                                 "--channels", "2", "--steps", "2", "--val-pairs", "1", "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    assert (out / "model.safetensors").is_file()
    bad = runner.invoke(app, ["train", "--shape", "30", "32", "32", "--data-dir", str(maps), "--channels", "2",
                              "--steps", "1", "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert bad.exit_code == 1
    assert "expected multiples of (16, 16, 16)" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing"), "--device", "cpu"])
    assert missing.exit_code == 1 and "expected a last.pt file" in missing.output


def _write_map(tmp_path: Path) -> Path:
    import nibabel as nib
    import numpy as np

    root = tmp_path / "maps"
    root.mkdir()
    data = np.zeros((20, 20, 20), np.int16)
    data[5:15, 5:15, 5:15] = 3
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / "a.nii.gz"))
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out: str, maps: str, weights_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from eoir_cli import train as train_module

    captured = {}
    original = train_module._Pyramid.__init__

    def keep(self: object, model: torch.nn.Module) -> None:
        original(self, model)  # type: ignore[arg-type]
        captured["model"] = model

    train_module._Pyramid.__init__ = keep  # type: ignore[method-assign]
    train_module.train(_tiny(Path(out), data_dir=maps, steps=2, val_every=0, save_every=0))
    torch.save({k: v.detach() for k, v in captured["model"].state_dict().items()},
               Path(weights_dir) / f"rank{rank}.pt")


def test_ddp_two_process_gloo(tmp_path: Path) -> None:
    maps = _write_map(tmp_path)
    out = tmp_path / "ddp"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(maps), str(tmp_path)), nprocs=2,
                                join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # DDP averages gradients, so both ranks end with identical weights after 2 steps.
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2"]
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)  # rank 0 saved the final (shared) weights


def test_bf16_cpu_run_resumes_exactly_and_draws_curves(tmp_path_factory: pytest.TempPathFactory) -> None:
    maps = str(_empty_maps(tmp_path_factory))
    straight = tmp_path_factory.mktemp("bf16")
    with pytest.raises(EoirError, match="coarsest pyramid level to be >= 3 voxels per axis, got \\(2, 2, 2\\)"):
        train(_tiny(tmp_path_factory.mktemp("bf16_5_levels"), data_dir=maps, amp=True))  # 32 / 2^4 = 2
    train(_tiny(straight, data_dir=maps, amp=True, levels=4))
    png = (straight / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    class Killed(Exception):
        pass

    def kill_after_two(info: object) -> None:
        if info.step == 2:  # type: ignore[attr-defined]
            raise Killed

    out = tmp_path_factory.mktemp("bf16_resumed")
    with pytest.raises(Killed):
        train(_tiny(out, data_dir=maps, amp=True, levels=4), kill_after_two)
    train(_tiny(out, data_dir=maps, amp=True, levels=4, resume=str(out)))
    for a, b in zip(_rows(straight / "metrics.csv"), _rows(out / "metrics.csv"), strict=True):
        for key in ("total", "ncc", "dice", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), (a["step"], key)
    # bf16 autocast changes the numbers: the fp32 run of the same seed differs.
    fp32 = tmp_path_factory.mktemp("fp32")
    train(_tiny(fp32, data_dir=maps, steps=1, val_every=0, levels=4))
    assert float(_rows(fp32 / "metrics.csv")[0]["total"]) != pytest.approx(
        float(_rows(straight / "metrics.csv")[0]["total"]), abs=1e-7)


def test_resumed_schedule_golden() -> None:
    from eoir_cli.train import resumed_schedule

    stored = {"start": 0, "factor": 1.0, "end": 4}
    assert resumed_schedule(stored, 2, 4) is stored  # same total: exact resume
    longer = resumed_schedule(stored, 2, 8)
    # reached (1 - 2/4)^0.9 = 0.5^0.9 at step 2, then decays to 0 at step 8
    assert longer == {"start": 2, "factor": pytest.approx(0.5**0.9), "end": 8}
    fn = poly_lr_lambda(8, start=2, factor=longer["factor"])
    assert fn(2) == pytest.approx(0.5**0.9) and fn(5) == pytest.approx(0.5**0.9 * 0.5**0.9) and fn(8) == 0.0
    finished = resumed_schedule(stored, 4, 8)  # learning rate had reached 0: restart on the stretched decay
    assert finished == {"start": 4, "factor": pytest.approx(0.5**0.9), "end": 8}
    with pytest.raises(EoirError, match="expected more than the 4 steps"):
        resumed_schedule(stored, 4, 4)


def test_resume_to_more_steps_never_steps_at_zero_or_jumps(straight_run: Path, tmp_path: Path) -> None:
    maps = json.loads((straight_run / "config.json").read_text())["train"]["data_dir"]
    import shutil

    out = tmp_path / "longer"
    shutil.copytree(straight_run, out)
    train(_tiny(out, data_dir=maps, resume=str(out), steps=8))
    lrs = [float(r["lr"]) for r in _rows(out / "metrics.csv")]
    assert len(lrs) == 8 and all(lr > 0 for lr in lrs)
    # steps 5..8 decay smoothly from the restart value 1e-4 * (1 - 4/8)^0.9
    assert lrs[4] == pytest.approx(1e-4 * 0.5**0.9, rel=1e-6)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_holdout_keeps_subject_out_of_training_and_validates_on_it() -> None:
    from eoir_cli.data.datasets import holdout_pairs
    from eoir_cli.data.synth import SynthConfig, SynthPairs, default_synth_root

    root = default_synth_root()
    if root is None:
        pytest.skip("../shared/data is not beside the checkout")
    synth = SynthPairs(SynthConfig(shape=(32, 32, 32)), root, exclude=("VXMT1_0100",))
    names = [s.name for s in synth.sources] + [r.name for r in synth.reals]
    assert names and not any("VXMT1_0100" in n for n in names)
    assert any("SYNBRAIN_0001" in n for n in names)
    pairs = holdout_pairs(root, ("VXMT1_0100",), (32, 48, 32))
    assert len(pairs) == 3  # the three other labelled subjects registered to the held-out one
    labels = set(torch.unique(pairs[0]["fixed_labels"]).tolist())
    assert 2 in labels and labels <= {0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28, 41, 42, 43,
                                      44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60}
    assert pairs[0]["moving"].shape == (1, 32, 48, 32)
    with pytest.raises(EoirError, match="expected labelled images"):
        holdout_pairs(root, ("NOBODY",), (32, 32, 32))
