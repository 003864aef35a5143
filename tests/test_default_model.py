"""The bundled default brain model, `eoir register` without --model, and `eoir demo`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from eoir_cli.checkpoint import load_model
from eoir_cli.cli import app
from eoir_cli.weights import DEFAULT_WEIGHTS, provenance, sha256

runner = CliRunner()


def test_bundled_weights_match_their_provenance_record() -> None:
    record = provenance()
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000  # shipped inside the wheel: keep it a few hundred kB
    assert sha256(DEFAULT_WEIGHTS) == record["sha256"]
    model = load_model("default")
    assert model.config.to_dict() == record["model_config"]
    assert record["command"].startswith("eoir train ")
    assert record["validation"]["pairs"], "provenance must carry the validation numbers"


def test_default_model_runs_at_its_native_grid() -> None:
    import torch

    model = load_model("default")
    moving = torch.zeros(1, 1, 160, 224, 192)
    moving[:, :, 60:100, 80:140, 70:120] = 1.0
    fixed = torch.roll(moving, shifts=3, dims=2)  # the same box 3 voxels further along axis 0
    with torch.no_grad():
        disp = model(moving, fixed)
    assert disp.shape == (1, 3, 160, 224, 192)
    # Inside the fixed box, the moving box lies 3 voxels back along axis 0: disp_0 should be negative there.
    assert float(disp[0, 0, 70:90, 90:130, 80:110].mean()) < -1.0


def _small_pair(tmp_path: Path, shared_data: Path) -> tuple[Path, Path]:
    """Two real brains at 2 mm (80×112×96) so a default-pipeline run stays quick."""
    paths = []
    for name in ("SYNBRAIN_0002_0000", "SYNBRAIN_0001_0000"):
        img = nib.load(shared_data / "brain_lumirlike/imagesTr" / f"{name}.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)[::2, ::2, ::2]
        affine = img.affine.copy()
        affine[:3, :3] *= 2
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.slow
def test_register_without_model_uses_the_bundled_model(tmp_path: Path, shared_data: Path) -> None:
    fixed, moving = _small_pair(tmp_path, shared_data)
    out = tmp_path / "out"
    result = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out), "--refine", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "default"
    assert nib.load(out / "warped.nii.gz").shape == nib.load(fixed).shape
    assert metrics["field"]["jac_nonpos_percent"] < 0.1


@pytest.mark.slow
def test_demo_runs_on_the_shipped_pair_and_improves_dice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without -o the demo writes to the user cache folder (here $EOIR_CACHE), never the working directory.
    monkeypatch.setenv("EOIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--fast", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "cache" / "demo"
    assert f"writing to {out}/" in result.output.replace("\n", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    metrics = json.loads((out / "metrics.json").read_text())
    seg = metrics["segmentation"]
    assert len(seg["labels"]) == 31
    assert seg["dice_after_mean"] > seg["dice_before_mean"] + 0.02
    assert (out / "qc.png").read_bytes()[:4] == b"\x89PNG"
    assert "Dice" in result.output
