"""Deployment facts: one normalize(), facts carried by checkpoints and exports, register running a model by them."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from eoir_cli.checkpoint import load_model, save_checkpoint
from eoir_cli.cli import app
from eoir_cli.config import PRESETS
from eoir_cli.deployment import (
    Deployment,
    Normalization,
    assumed_deployment,
    deployment_of,
    image_modality,
    intensity_bounds,
    normalize,
    preset_deployment,
)
from eoir_cli.model import EOIR

runner = CliRunner()


# ------------------------------------------------------------------------------------------ normalize


def test_normalize_golden_values_per_kind() -> None:
    x = np.array([-1000.0, -500.0, 150.0, 800.0, 2000.0])
    # window [-500, 800]: (x + 500) / 1300, clipped -> 0, 0, 650/1300 = 0.5, 1, 1
    np.testing.assert_allclose(normalize(x, Normalization.window_of(-500, 800)), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalize(x, "ct"), [0, 0, 0.5, 1, 1])
    # divide by 255: 0 -> 0, 51 -> 0.2, 255 -> 1, 510 -> 1 (clipped)
    np.testing.assert_allclose(normalize(np.array([0.0, 51.0, 255.0, 510.0]), "u8"), [0, 0.2, 1, 1], atol=1e-7)
    # min-max: (x - 2) / (10 - 2)
    np.testing.assert_allclose(normalize(np.array([2.0, 4.0, 10.0]), "minmax"), [0, 0.25, 1])
    # percentiles 0/100 are min-max; 25/75 of 0..100 are 25 and 75: 50 -> 0.5, 0 -> 0 (clipped), 100 -> 1
    ramp = np.arange(101, dtype=float)
    np.testing.assert_allclose(normalize(ramp, Normalization("percentile", 0, 100)), ramp / 100, atol=1e-6)
    out = normalize(ramp, Normalization("percentile", 25, 75))
    assert out[50] == pytest.approx(0.5) and out[0] == 0 and out[100] == 1
    # reference: the bounds come from another image (a warped image in its source's contrast)
    np.testing.assert_allclose(normalize(np.array([5.0]), "minmax", reference=np.array([0.0, 10.0])), [0.5])
    # bounds computed once serve both: the same numbers as reference=
    spec = Normalization("percentile", 25, 75)
    np.testing.assert_array_equal(normalize(x, spec, bounds=intensity_bounds(ramp, spec)),
                                  normalize(x, spec, reference=ramp))


def test_normalization_specs_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="expected low < high"):
        Normalization("window", 800, -500)
    with pytest.raises(ValueError, match="expected one of"):
        Normalization.parse("zscore")
    with pytest.raises(ValueError, match="unknown keys"):
        Normalization.parse({"kind": "window", "lo": 1})


def test_image_modality() -> None:
    assert image_modality(np.array([-1024.0] + [40.0] * 99)) == "CT"  # a little air is enough
    assert image_modality(np.array([0.0, 10.0, 255.0])) == "MRI"
    assert image_modality(np.array([-3.0, 0.0, 5.0])) is None


# ------------------------------------------------------------------------------------------ facts in artifacts


def test_deployment_round_trips_and_assumed_facts() -> None:
    facts = preset_deployment("abdomen")
    assert facts.spacing == (2.0, 2.0, 2.0) and facts.normalization == Normalization.window_of(-500, 800)
    again = Deployment.from_dict(json.dumps(facts.to_dict()))
    assert again == facts and again.source == "model file"
    # an original EOIR checkpoint records its training grid in its buffers; nothing else is known
    old = assumed_deployment({"format": "original", "grid_size": (160, 192, 224)})
    assert old.grid == (160, 192, 224) and old.domain == "any" and old.source == "assumed"
    # a training checkpoint written before facts existed: its train_config names the dataset and shape
    resumed = deployment_of({"train_config": {"dataset": "abdomen", "shape": None}})
    assert resumed.spacing == (2.0, 2.0, 2.0) and resumed.source == "assumed"
    with pytest.raises(ValueError, match="unknown keys"):
        Deployment.from_dict({"spacing": 1, "modality": "CT"})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoints_carry_their_facts(tmp_path: Path, suffix: str) -> None:
    facts = preset_deployment("abdomen")
    path = save_checkpoint(tmp_path / f"m{suffix}", EOIR(PRESETS["lumir"].replace(channels=2, levels=2)),
                           extra={"deployment": facts.to_dict()})
    assert deployment_of(load_model(path).checkpoint_info) == facts


def test_presets_and_the_bundled_model_carry_facts() -> None:
    assert deployment_of(load_model("abdomen", channels=2).checkpoint_info).domain == "abdomen CT"
    bundled = deployment_of(load_model("default").checkpoint_info)
    assert bundled.source == "model file" and bundled.grid == (160, 224, 192) and bundled.domain == "brain MRI"


# ------------------------------------------------------------------------------------------ the abdomen ONNX test

GRID = (64, 64, 64)  # 2 mm: a 128 mm cube, covers the 120 x 108 x 60 mm CT crop


@pytest.fixture(scope="module")
def ct_pair(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3 mm abdominal CT crop (HU) and the same scan with its content shifted by 6 mm."""
    root = tmp_path_factory.mktemp("ct")
    img = nib.load(str(shared_data / "abdomen_small/TS_example_ct_sm.nii.gz"))
    data = np.asanyarray(img.dataobj)[40:80, 30:66, 5:25].astype(np.int16)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ np.array([40, 30, 5]) + img.affine[:3, 3]
    nib.save(nib.Nifti1Image(data, affine), str(root / "fixed.nii.gz"))
    moved = affine.copy()
    moved[:3, 3] += [6.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(data, moved), str(root / "moving.nii.gz"))
    return root / "fixed.nii.gz", root / "moving.nii.gz"


@pytest.fixture(scope="module")
def abdomen_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import torch2onnx

    torch.manual_seed(0)
    net = load_model("abdomen", channels=2)  # the abdomen preset: input_scale 0.5, facts 2 mm / HU window
    path = tmp_path_factory.mktemp("onnx") / "abdomen.onnx"
    torch2onnx(net, path, shape=GRID, verify=False)
    return path


def test_exported_abdomen_model_runs_at_its_own_spacing_and_normalisation(
        ct_pair: tuple[Path, Path], abdomen_onnx: Path, tmp_path: Path) -> None:
    from eoir_cli.backends import open_backend
    from eoir_cli.inference import run_pair
    from eoir_cli.pipeline import register
    from eoir_cli.preprocess import NetworkGrid, antialias_sigma, resample_affine

    meta = {p.key: p.value for p in onnx.load(str(abdomen_onnx)).metadata_props}
    assert json.loads(meta["deployment"])["spacing"] == [2.0, 2.0, 2.0]
    fixed, moving = ct_pair
    out = tmp_path / "out"
    result = runner.invoke(app, ["register", str(fixed), str(moving), "--model", str(abdomen_onnx), "-o", str(out),
                                 "--no-affine", "--refine", "0", "--no-hd95"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["network_grid"]["spacing_mm"] == [2.0, 2.0, 2.0]  # not 1 mm: read from the .onnx
    assert metrics["network_grid"]["shape"] == list(GRID)
    assert metrics["deployment"]["normalization_used"] == {"kind": "window", "low": -500.0, "high": 800.0}
    assert metrics["deployment"]["domain"] == "abdomen CT" and metrics["warnings"] == []

    # The network saw the HU-windowed images on that grid: rerun the network on them by hand.
    res = register(fixed, moving, model=str(abdomen_onnx), affine=False, refine=0, qc=False)
    net = open_backend(str(abdomen_onnx))
    grid = NetworkGrid(GRID, np.array(metrics["network_grid"]["affine"]))
    inputs = {}
    for name, path in (("fixed", fixed), ("moving", moving)):
        vol = nib.load(str(path))
        for kind, spec in (("window", Normalization.window_of(-500, 800)), ("percentile", Normalization())):
            data01 = normalize(np.asanyarray(vol.dataobj), spec)
            inputs[name, kind] = resample_affine(data01, np.linalg.inv(vol.affine) @ grid.affine, GRID,
                                                 sigma=antialias_sigma(vol.header.get_zooms()[:3], grid.spacing))
    expected = run_pair(net, inputs["moving", "window"], inputs["fixed", "window"])
    percentile = run_pair(net, inputs["moving", "percentile"], inputs["fixed", "percentile"])
    np.testing.assert_allclose(res.network_disp, expected, atol=1e-4)
    assert np.abs(percentile - expected).max() > 1e-3  # the comparison can tell the normalisations apart


def test_a_model_given_another_modality_is_refused_in_one_line(
        ct_pair: tuple[Path, Path], abdomen_onnx: Path, shared_data: Path, tmp_path: Path) -> None:
    fixed, moving = ct_pair
    out = tmp_path / "brain_on_ct"
    result = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out)])  # the bundled brain MRI model
    assert result.exit_code == 1
    assert "trained on brain MRI" in result.output and "looks like CT" in result.output
    assert "--allow-mismatch" in result.output and "Traceback" not in result.output
    assert not out.exists()
    brain = shared_data / "brain_lumirlike/imagesTr/SYNBRAIN_0001_0000.nii.gz"
    result = runner.invoke(app, ["register", str(brain), str(brain), "--model", str(abdomen_onnx), "-o",
                                 str(tmp_path / "ct_on_brain")])
    assert result.exit_code == 1 and "trained on abdomen CT" in result.output


def test_allow_mismatch_runs_anyway(ct_pair: tuple[Path, Path], abdomen_onnx: Path) -> None:
    from eoir_cli.io import Volume
    from eoir_cli.pipeline import DomainMismatch, register

    fixed, _ = ct_pair
    mri_like = nib.load(str(fixed))
    data = np.asanyarray(mri_like.dataobj).astype(np.float32) + 1100.0  # no negative values: not HU
    vol = Volume(data, mri_like.affine, None, None)
    with pytest.raises(DomainMismatch, match="no negative intensities"):
        register(vol, vol, model=str(abdomen_onnx), affine=False, refine=0, qc=False)
    res = register(vol, vol, model=str(abdomen_onnx), affine=False, refine=0, qc=False, allow_mismatch=True)
    assert res.metrics["deployment"]["domain"] == "abdomen CT"
