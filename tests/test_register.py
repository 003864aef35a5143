"""eoir register: geometry of every output (checked with scipy and SimpleITK), refinement, bad inputs, batch.

Volumes are real brains from ../shared/data downsampled to 4 mm; the network is an untrained
4-channel EOIR, so the accuracy checks rely on the optimisation stages (affine, refine).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from eoir_cli.batch import read_pair_list
from eoir_cli.cli import app
from eoir_cli.config import PRESETS
from eoir_cli.errors import EoirError
from eoir_cli.pipeline import register

runner = CliRunner()
SPACING = 4.0  # mm of the network grid in these tests


def _corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _downsample(path: Path, factor: int = 4, labels: bool = False) -> nib.Nifti1Image:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    d, h, w = (s // factor * factor for s in data.shape)
    data = data[:d, :h, :w]
    if labels:
        # nearest voxel to the block centre; same grid (affine) as the averaged image
        small = data[factor // 2::factor, factor // 2::factor, factor // 2::factor].astype(np.int16)
    else:
        small = data.reshape(d // factor, factor, h // factor, factor, w // factor, factor).mean((1, 3, 5))
        small = small.astype(np.float32)
    offset = (factor - 1) / 2
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = offset
    return nib.Nifti1Image(small, img.affine @ scale)


def _rigid(angle_deg: float, axis: int, shift_mm: tuple[float, float, float], centre: np.ndarray) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(4)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    to_c, back = np.eye(4), np.eye(4)
    to_c[:3, 3], back[:3, 3] = -centre, centre + np.asarray(shift_mm)
    return back @ rot @ to_c


def _resample_to(img: nib.Nifti1Image, affine: np.ndarray, shape, motion: np.ndarray, order: int = 1) -> np.ndarray:
    """Content of ``img`` moved by ``motion`` (mm -> mm), sampled on a new grid."""
    index_map = np.linalg.inv(img.affine) @ np.linalg.inv(motion) @ affine
    data = np.asanyarray(img.dataobj).astype(np.float32)
    return ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3], output_shape=tuple(shape), order=order)


@pytest.fixture(scope="module")
def pair(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fixed: a real brain at 4 mm (RAS). Moving: the same brain moved rigidly (7°, 6 mm), stored
    LPS-flipped, anisotropic (3 × 5 × 4 mm), slightly oblique and cropped."""
    root = tmp_path_factory.mktemp("pair")
    brains = shared_data / "brain_lumirlike"
    fixed = _downsample(brains / "imagesTr/SYNBRAIN_0001_0000.nii.gz")
    fixed_seg = _downsample(brains / "labelsTr/SYNBRAIN_0001_0000.nii.gz", labels=True)
    nib.save(fixed, str(root / "fixed.nii.gz"))
    nib.save(fixed_seg, str(root / "fixed_seg.nii.gz"))
    centre = fixed.affine[:3, :3] @ (np.array(fixed.shape) - 1) / 2 + fixed.affine[:3, 3]
    motion = _rigid(7.0, 2, (6.0, -4.0, 3.0), centre)
    # LPS array order (x and y flipped), 3 x 5 x 4 mm, tilted 4 degrees about x: an oblique grid.
    tilt = _rigid(4.0, 0, (0.0, 0.0, 0.0), np.zeros(3))[:3, :3]
    direction = tilt @ np.diag([-1.0, -1.0, 1.0])
    spacing = np.array([3.0, 5.0, 4.0])
    shape = (50, 30, 36)  # 150 x 150 x 144 mm: crops the 160 x 224 x 192 mm field of view
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = direction * spacing
    moving_affine[:3, 3] = centre - moving_affine[:3, :3] @ (np.array(shape) - 1) / 2
    moving = _resample_to(fixed, moving_affine, shape, motion)
    moving_seg = _resample_to(fixed_seg, moving_affine, shape, motion, order=0).astype(np.int16)
    nib.save(nib.Nifti1Image(moving, moving_affine), str(root / "moving.nii.gz"))
    nib.save(nib.Nifti1Image(moving_seg, moving_affine), str(root / "moving_seg.nii.gz"))
    return {k: root / f"{k}.nii.gz" for k in ("fixed", "moving", "fixed_seg", "moving_seg")}


class IdentityNetwork:
    """A backend whose network answers zero: isolates the geometry (affine + composition) from
    an untrained network's random displacement."""

    name, device, precision, input_shape, metadata = "identity", "cpu", "fp32", None, {}
    config = PRESETS["lumir"]

    def __call__(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        return np.zeros((3, *fixed.shape), np.float32)


@pytest.fixture(scope="module")
def registered(pair: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reg") / "out"
    register(pair["fixed"], pair["moving"], out, model=IdentityNetwork(), moving_seg=pair["moving_seg"],
             fixed_seg=pair["fixed_seg"], spacing=SPACING, outputs="all")
    return out


def test_cli_single_pair_with_a_checkpoint(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--model",
                                 str(tiny_checkpoint), "--moving-seg", str(pair["moving_seg"]), "--fixed-seg",
                                 str(pair["fixed_seg"]), "--spacing", str(SPACING), "--device", "cpu", "--refine", "2"])
    assert result.exit_code == 0, result.output
    assert "Dice" in result.output and (out / "warped_seg.nii.gz").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "torch" and metrics["refine_steps"] == 2


def test_cli_labels_choose_the_scored_labels(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    base = ["register", str(pair["fixed"]), str(pair["moving"]), "--model", str(tiny_checkpoint), "--moving-seg",
            str(pair["moving_seg"]), "--fixed-seg", str(pair["fixed_seg"]), "--spacing", str(SPACING), "--no-hd95",
            "--refine", "0", "--no-affine"]
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "bad"), "--labels", "2,x"])
    assert bad.exit_code == 1 and "--labels: expected comma-separated integers" in bad.output
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    good = runner.invoke(app, [*base, "-o", str(tmp_path / "good"), "--labels", "2,41"])
    assert good.exit_code == 0, good.output
    seg = json.loads((tmp_path / "good" / "metrics.json").read_text())["segmentation"]
    assert seg["labels"] == [2, 41] and sorted(seg["dice_after"]) == ["2", "41"]


def test_a_grid_that_does_not_cover_the_image_is_said_and_fit_grid_covers_it(pair: dict[str, Path]) -> None:
    from eoir_cli.deployment import Deployment

    class SmallGridNetwork(IdentityNetwork):  # trained on a 32^3 grid at 2 mm: 64 mm, smaller than the brain
        deployment = Deployment(spacing=(2.0, 2.0, 2.0), grid=(32, 32, 32))

    res = register(pair["fixed"], pair["moving"], model=SmallGridNetwork(), affine=False, refine=0, qc=False)
    assert res.grid.shape == (32, 32, 32) and len(res.metrics["warnings"]) == 1
    assert "does not cover the fixed image's foreground" in res.metrics["warnings"][0]
    assert "--fit-grid" in res.metrics["warnings"][0]
    fitted = register(pair["fixed"], pair["moving"], model=SmallGridNetwork(), affine=False, refine=0, qc=False,
                      fit_grid=True)
    assert fitted.metrics["warnings"] == [] and fitted.grid.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert all(s > 32 for s in fitted.grid.shape)


def test_batch_scores_the_manifest_labels_eval(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"labels_eval": [2, 41], "pairs": [
        {"fixed": str(pair["fixed"]), "moving": str(pair["moving"]), "fixed_seg": str(pair["fixed_seg"]),
         "moving_seg": str(pair["moving_seg"]), "name": "p"}]}))
    out = tmp_path / "batch"
    result = runner.invoke(app, ["register", "--pairs", str(manifest), "-o", str(out), "--model", str(tiny_checkpoint),
                                 "--spacing", str(SPACING), "--no-affine", "--no-hd95", "--refine", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "p" / "metrics.json").read_text())["segmentation"]["labels"] == [2, 41]


def test_outputs_exist_with_documented_layout(registered: Path, pair: dict[str, Path]) -> None:
    names = sorted(p.name for p in registered.iterdir())
    assert names == sorted(["warped.nii.gz", "disp.nii.gz", "warp_itk.nii.gz", "warped_seg.nii.gz",
                            "jacobian.nii.gz", "metrics.json", "qc.png", "inverse_warped.nii.gz",
                            "inverse_disp.nii.gz", "inverse_warp_itk.nii.gz", "affine_itk.txt"])
    fixed = nib.load(str(pair["fixed"]))
    for name, shape in (("warped", fixed.shape), ("disp", fixed.shape + (3,)), ("warp_itk", fixed.shape + (1, 3)),
                        ("jacobian", fixed.shape), ("warped_seg", fixed.shape)):
        img = nib.load(str(registered / f"{name}.nii.gz"))
        assert img.shape == shape, name
        np.testing.assert_allclose(img.affine, fixed.affine, atol=1e-4)
    assert int(nib.load(str(registered / "warp_itk.nii.gz")).header["intent_code"]) == 1007
    moving = nib.load(str(pair["moving"]))
    for name, shape in (("inverse_warped", moving.shape), ("inverse_disp", moving.shape + (3,)),
                        ("inverse_warp_itk", moving.shape + (1, 3))):
        img = nib.load(str(registered / f"{name}.nii.gz"))
        assert img.shape == shape, name
        np.testing.assert_allclose(img.affine, moving.affine, atol=1e-4)
    assert int(nib.load(str(registered / "inverse_warp_itk.nii.gz")).header["intent_code"]) == 1007
    assert (registered / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((registered / "metrics.json").read_text())
    assert {"backend", "device", "timings_s", "field", "segmentation"} <= set(metrics)
    assert {"load", "affine", "network", "compose", "total"} <= set(metrics["timings_s"])
    assert {"ndv_percent", "jac_nonpos_percent", "sdlogj", "grid"} == set(metrics["field"])
    # the two "% |J| <= 0" figures each say which grid they are on
    assert "network grid" in metrics["field"]["grid"] and "native grid" in metrics["jacobian_native"]["grid"]
    consistency = metrics["inverse_consistency"]
    for direction in ("fixed_to_moving_to_fixed", "moving_to_fixed_to_moving"):
        assert {"mean_mm", "p95_mm", "max_mm", "fraction_inside"} <= set(consistency[direction])


def test_orientation_spacing_round_trip_recovers_the_anatomy(registered: Path, pair: dict[str, Path]) -> None:
    """The LPS, anisotropic, oblique, cropped and moved copy lands back on the original."""
    fixed = nib.load(str(pair["fixed"])).get_fdata()
    warped = nib.load(str(registered / "warped.nii.gz")).get_fdata()
    inside = warped > 0  # the moving copy is cropped: compare where it has content
    before = json.loads((registered / "metrics.json").read_text())["segmentation"]
    assert _corr(warped, fixed, inside) > 0.9
    assert before["dice_after_mean"] > before["dice_before_mean"] + 0.1
    assert before["dice_after_mean"] > 0.6


def test_disp_applied_with_map_coordinates_reproduces_warped(registered: Path, pair: dict[str, Path]) -> None:
    moving = nib.load(str(pair["moving"])).get_fdata().astype(np.float32)
    disp = nib.load(str(registered / "disp.nii.gz")).get_fdata()
    index = np.stack(np.meshgrid(*[np.arange(s) for s in disp.shape[:3]], indexing="ij")) + disp.transpose(3, 0, 1, 2)
    resampled = ndimage.map_coordinates(moving, index, order=1, mode="grid-constant", cval=0.0)
    warped = nib.load(str(registered / "warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(resampled, warped, atol=1e-3 * float(moving.max()))


def test_warp_itk_applied_with_simpleitk_reproduces_warped(registered: Path, pair: dict[str, Path]) -> None:
    match, identity = _simpleitk_agreement(registered / "warp_itk.nii.gz", pair["moving"], pair["fixed"],
                                           registered / "warped.nii.gz")
    assert match > 0.99
    # Not trivially true: without the field (scanner coordinates only) the 7° / 6 mm motion remains.
    assert identity < match - 0.05


def _simpleitk_agreement(field_path: Path, source: Path, reference: Path, ours: Path) -> tuple[float, float]:
    """Correlation of ``ours`` with SimpleITK resampling ``source`` onto ``reference`` through the field, and
    with the identity resampling (scanner coordinates only)."""
    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(str(field_path), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3
    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    grid = sitk.ReadImage(str(reference), sitk.sitkFloat32)
    target = sitk.GetArrayFromImage(sitk.ReadImage(str(ours), sitk.sitkFloat32))
    out = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.DisplacementFieldTransform(field),
                                               sitk.sitkLinear, 0.0))
    identity = sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(3, sitk.sitkIdentity),
                                                    sitk.sitkLinear, 0.0))
    return _corr(out, target), _corr(identity, target)


def test_apply_to_the_moving_image_reproduces_warped(registered: Path, pair: dict[str, Path]) -> None:
    from eoir_cli.apply import apply_to_image

    # The moving image is LPS-ordered, anisotropic, oblique and cropped: its own grid, not the fixed one.
    warped = nib.load(str(registered / "warped.nii.gz")).get_fdata()
    again = apply_to_image(registered, pair["moving"]).data
    scale = float(np.abs(warped).max())
    np.testing.assert_allclose(again, warped, rtol=0, atol=1e-4 * scale)
    labels = nib.load(str(registered / "warped_seg.nii.gz")).get_fdata()
    np.testing.assert_array_equal(apply_to_image(registered, pair["moving_seg"], interp="nearest").data, labels)


def test_inverse_warped_is_the_fixed_image_on_the_moving_grid(registered: Path, pair: dict[str, Path]) -> None:
    from eoir_cli.apply import apply_to_image

    inverse_warped = nib.load(str(registered / "inverse_warped.nii.gz")).get_fdata()
    moving = nib.load(str(pair["moving"])).get_fdata()
    inside = inverse_warped > 0
    assert _corr(inverse_warped, moving, inside) > 0.9  # the fixed anatomy lands on the moving one
    again = apply_to_image(registered, pair["fixed"], inverse=True).data
    scale = float(np.abs(inverse_warped).max())
    np.testing.assert_allclose(again, inverse_warped, rtol=0, atol=1e-4 * scale)


def test_simpleitk_applying_the_inverse_field_reproduces_inverse_warped(registered: Path,
                                                                        pair: dict[str, Path]) -> None:
    match, identity = _simpleitk_agreement(registered / "inverse_warp_itk.nii.gz", pair["fixed"], pair["moving"],
                                           registered / "inverse_warped.nii.gz")
    assert match > 0.99
    assert identity < match - 0.05


def test_affine_itk_file_holds_the_affine_of_metrics(registered: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    tx = sitk.ReadTransform(str(registered / "affine_itk.txt"))
    affine = np.array(json.loads((registered / "metrics.json").read_text())["affine_ras"])
    assert not np.allclose(affine, np.eye(4), atol=1e-2)  # the rigid motion was found
    p = np.array([12.0, -30.0, 20.0])
    q = np.array(tx.TransformPoint(tuple((p * [-1, -1, 1]).tolist()))) * [-1, -1, 1]
    np.testing.assert_allclose(q, affine[:3, :3] @ p + affine[:3, 3], atol=1e-5)


def test_inverse_is_consistent_and_points_round_trip(registered: Path, pair: dict[str, Path]) -> None:
    from eoir_cli.apply import map_points

    consistency = json.loads((registered / "metrics.json").read_text())["inverse_consistency"]
    # Moving voxel -> fixed (exact at the moving voxel) -> moving (the forward field between 4 mm
    # fixed voxels): a twentieth of a voxel on average.
    assert consistency["moving_to_fixed_to_moving"]["mean_mm"] < 0.2, consistency
    # The other way interpolates the inverse field between the moving voxels (3 x 5 x 4 mm, oblique):
    # bounded by a quarter of the coarsest of them.
    assert consistency["fixed_to_moving_to_fixed"]["mean_mm"] < 1.25, consistency
    assert min(c["fraction_inside"] for k, c in consistency.items() if k.endswith("_to_fixed") or
               k.endswith("_to_moving")) > 0.5
    fixed = nib.load(str(pair["fixed"]))
    rng = np.random.default_rng(0)
    idx = rng.uniform(8, np.array(fixed.shape) - 8, size=(30, 3))
    points = idx @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]  # fixed-space points
    there = map_points(registered, points, inverse=True)  # fixed -> moving
    assert np.abs(there - points).max() > 2.0  # the 7° / 6 mm motion moves them
    back = map_points(registered, there)  # moving -> fixed
    assert np.abs(back - points).max() < 1e-3


def test_no_inverse_writes_no_inverse_outputs(pair: dict[str, Path], tmp_path: Path) -> None:
    result = register(pair["fixed"], pair["moving"], tmp_path / "out", model=IdentityNetwork(), spacing=SPACING,
                      refine=0, inverse=False, qc=False)
    assert result.inverse_disp is None and "inverse_consistency" not in result.metrics
    assert not any(p.name.startswith("inverse_") for p in (tmp_path / "out").iterdir())
    assert (tmp_path / "out" / "affine_itk.txt").is_file()


def test_refine_recovers_a_known_smooth_deformation(shared_data: Path) -> None:
    """fixed = moving warped by a known smooth field d, so the answer is disp = d (voxels)."""
    from eoir_cli.deployment import normalize
    from eoir_cli.refine import refine
    from eoir_cli.spatial import identity_grid, warp

    img = _downsample(shared_data / "brain_lumirlike/imagesTr/SYNBRAIN_0002_0000.nii.gz", factor=4)
    moving = np.ascontiguousarray(normalize(img.get_fdata().astype(np.float32))[4:36, 4:52, 4:44])
    grid = identity_grid(moving.shape)[0]
    # d = 2 voxels * sin(2 pi x / 32) along each axis: smooth, no folding (max gradient 2 * 2pi/32 ~ 0.4).
    d_true = torch.stack([2.0 * torch.sin(2 * math.pi * grid[(c + 1) % 3] / 32) for c in range(3)])[None]
    mov = torch.from_numpy(moving)[None, None]
    fix = warp(mov, d_true)
    disp = refine(fix, mov, None, steps=40, lr=0.5, weight=2.0, window=5, scale=1.0)
    mask = torch.from_numpy(moving > 0.1)
    err = (disp - d_true).norm(dim=1)[0][mask].mean().item()
    err_identity = d_true.norm(dim=1)[0][mask].mean().item()  # ~2.4 voxels
    assert err < 0.6 * err_identity, (err, err_identity)


def test_refine_starts_from_the_network_answer() -> None:
    """v is fitted so that exp(v) ≈ disp: zero steps return disp, the fixed-point fit is close."""
    from eoir_cli.refine import velocity_from_disp
    from eoir_cli.spatial import identity_grid, integrate

    grid = identity_grid((16, 16, 16))[0]
    disp = torch.stack([1.5 * torch.sin(2 * math.pi * grid[c] / 16) for c in range(3)])[None]
    v = velocity_from_disp(disp, 7, iterations=3)
    naive = (integrate(disp, 7) - disp).abs().mean().item()
    fitted = (integrate(v, 7) - disp).abs().mean().item()
    assert fitted < 0.3 * naive


def test_lumir_mode_writes_challenge_named_field(shared_data: Path, tmp_path: Path) -> None:
    from eoir_cli.data.datasets import case_id

    assert case_id("imagesVal/LUMIRMRI_3454_0000.nii.gz") == "3454"
    assert case_id("SYNBRAIN_0002_0000.nii.gz") == "0002"


# ------------------------------------------------------------------------------------------ bad inputs


def _bad_files(tmp: Path, pair: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    rng = np.random.default_rng(0)
    fixed = nib.load(str(pair["fixed"]))
    data = fixed.get_fdata().astype(np.float32)
    (tmp / "text.nii.gz").write_text("not an image\n")
    (tmp / "random.nii").write_bytes(rng.bytes(4000))
    blob = pair["fixed"].read_bytes()
    (tmp / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    nib.save(nib.Nifti1Image(data[:, :, 10], fixed.affine), str(tmp / "2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), fixed.affine), str(tmp / "4d.nii.gz"))
    nan = data.copy()
    nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, fixed.affine), str(tmp / "nan.nii.gz"))
    inf = data.copy()
    inf[5, 5, 5] = np.inf
    nib.save(nib.Nifti1Image(inf, fixed.affine), str(tmp / "inf.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(data.shape, 7.0, np.float32), fixed.affine), str(tmp / "const.nii.gz"))
    seg = np.asanyarray(nib.load(str(pair["fixed_seg"])).dataobj)
    nib.save(nib.Nifti1Image(seg[:-1], fixed.affine), str(tmp / "seg_shape.nii.gz"))
    moved = fixed.affine.copy()
    moved[0, 3] += 8.0
    nib.save(nib.Nifti1Image(seg, moved), str(tmp / "seg_geom.nii.gz"))
    (tmp / "corrupt.pt").write_bytes(rng.bytes(3000))

    class Hostile:
        def __reduce__(self):  # would create a marker file if the pickle were executed
            return (Path.touch, (tmp / "PWNED",))

    with open(tmp / "hostile.pt", "wb") as f:
        pickle.dump({"model": Hostile()}, f)
    (tmp / "model.xyz").write_bytes(b"weights")
    f, m = str(pair["fixed"]), str(pair["moving"])
    return {
        "missing": ([str(tmp / "nope.nii.gz"), m], "no such file"),
        "text": ([str(tmp / "text.nii.gz"), m], "not a readable NIfTI"),
        "random-bytes": ([f, str(tmp / "random.nii")], "not a readable NIfTI"),
        "truncated-gzip": ([str(tmp / "trunc.nii.gz"), m], "not a readable NIfTI"),
        "2d": ([str(tmp / "2d.nii.gz"), m], "expected a 3-D volume"),
        "4d": ([f, str(tmp / "4d.nii.gz")], "expected a 3-D volume"),
        "nan": ([str(tmp / "nan.nii.gz"), m], "NaN/Inf"),
        "inf": ([f, str(tmp / "inf.nii.gz")], "NaN/Inf"),
        "constant": ([f, str(tmp / "const.nii.gz")], "constant image"),
        "seg-shape": ([f, m, "--fixed-seg", str(tmp / "seg_shape.nii.gz")], "expected the shape of its image"),
        "seg-geometry": ([f, m, "--fixed-seg", str(tmp / "seg_geom.nii.gz")], "geometry"),
        "seg-missing": ([f, m, "--moving-seg", str(tmp / "nope_seg.nii.gz")], "no such file"),
        "seg-unreadable": ([f, m, "--fixed-seg", str(tmp / "text.nii.gz")], "not a readable NIfTI"),  # on a thread
        "corrupt-model": ([f, m, "--model", str(tmp / "corrupt.pt")], "corrupt.pt: "),
        "hostile-model": ([f, m, "--model", str(tmp / "hostile.pt")], "refused to load"),
        "unknown-suffix": ([f, m, "--model", str(tmp / "model.xyz")], "unknown model suffix"),
        "missing-engine": ([f, m, "--model", str(tmp / "nope.engine")], "engine"),
        "backend-mismatch": ([f, m, "--backend", "onnx"], "backend onnx: the model"),
        "huge-sigma": ([f, m, "--refine-sigma", "1e6"], "refine-sigma: expected 0 to 8 voxels, got 1e+06"),
    }


def test_every_bad_input_gives_one_line_and_no_outputs(pair: dict[str, Path], tiny_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    cases = _bad_files(tmp_path, pair)
    for name, (args, message) in cases.items():
        out = tmp_path / f"out_{name}"
        model = [] if "--model" in args else ["--model", str(tiny_checkpoint)]
        result = runner.invoke(app, ["register", *args, "-o", str(out), *model, "--spacing", str(SPACING),
                                     "--no-affine", "--device", "cpu"])
        assert result.exit_code == 1, (name, result.output)
        assert message in result.output, (name, result.output)
        assert "Traceback" not in result.output, name
        assert not out.exists() or not any(out.iterdir()), (name, list(out.iterdir()))
    assert not (tmp_path / "PWNED").exists()


def test_engine_built_for_another_shape_is_refused(shared_data: Path) -> None:
    class FixedShapeBackend:  # stands in for a TensorRT/ONNX file exported for 128^3
        name, device, precision, input_shape = "tensorrt", "cuda", "fp32", (128, 128, 128)
        config, metadata = PRESETS["lumir"], {}

        def __call__(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
            raise AssertionError("must be refused before running")

    images = shared_data / "brain_lumirlike/imagesTr"
    with pytest.raises(EoirError, match=r"built for input shape \(128, 128, 128\)"):
        register(images / "SYNBRAIN_0002_0000.nii.gz", images / "SYNBRAIN_0001_0000.nii.gz",
                 model=FixedShapeBackend(), lumir=True)


def test_inputs_are_never_overwritten(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    victim = tmp_path / "warped.nii.gz"
    victim.write_bytes(pair["moving"].read_bytes())
    before = victim.read_bytes()
    result = runner.invoke(app, ["register", str(pair["fixed"]), str(victim), "-o", str(tmp_path), "--model",
                                 str(tiny_checkpoint), "--spacing", str(SPACING)])
    assert result.exit_code == 1 and "would overwrite the input" in result.output
    assert victim.read_bytes() == before


def test_output_location_is_checked_before_any_computation(pair: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    for out, message in ((tmp_path / "a_file", "expected a folder, got an existing file"),
                         (tmp_path / "a_file" / "sub", "cannot create it")):
        # The model does not exist: the output check must come first (it used to fail after the whole run).
        result = runner.invoke(app, ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out),
                                     "--model", str(tmp_path / "missing.pt")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Errno" not in result.output


def test_results_are_not_replaced_without_overwrite(pair: dict[str, Path], tiny_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--model", str(tiny_checkpoint),
            "--spacing", str(SPACING), "--no-affine", "--no-hd95"]
    assert runner.invoke(app, [*args, "--refine", "0"]).exit_code == 0
    stamp = (out / "metrics.json").read_bytes()
    again = runner.invoke(app, [*args, "--refine", "1"])
    assert again.exit_code == 1 and "already holds registration results" in again.output
    assert "--overwrite" in again.output and (out / "metrics.json").read_bytes() == stamp
    replaced = runner.invoke(app, [*args, "--refine", "1", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "metrics.json").read_text())["refine_steps"] == 1


def test_staging_of_a_killed_run_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from eoir_cli.outputs import STAGING_PREFIX, clean_stale_staging

    out = tmp_path / "out"
    # A run killed with SIGKILL inside its staging block leaves its folder behind.
    code = ("import os, signal, pathlib\n"
            "from eoir_cli.outputs import staging\n"
            f"with staging(pathlib.Path({str(out)!r})) as stage:\n"
            "    (stage / 'warped.nii.gz').write_bytes(b'partial')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert proc.returncode == -signal.SIGKILL
    left = list(out.glob(STAGING_PREFIX + "*"))
    assert len(left) == 1 and (left[0] / "warped.nii.gz").is_file()
    # A live process's folder (ours), another host's and a fresh one of unknown owner are kept;
    # an unknown owner's folder older than a day goes.
    mine = out / f"{STAGING_PREFIX}{left[0].name.split('-')[2]}-{os.getpid()}-live"
    other_host = out / f"{STAGING_PREFIX}otherhost-999999-x"
    fresh_unknown, old_unknown = out / f"{STAGING_PREFIX}abc123", out / f"{STAGING_PREFIX}def456"
    for d in (mine, other_host, fresh_unknown, old_unknown):
        d.mkdir()
    os.utime(old_unknown, (0, 0))
    removed = clean_stale_staging(out)
    assert sorted(removed) == sorted([left[0], old_unknown])
    assert mine.is_dir() and other_host.is_dir() and fresh_unknown.is_dir()


def test_ctrl_c_while_writing_leaves_nothing_and_says_so(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("eoir_cli.itk.save_itk_displacement", interrupted)
    out = tmp_path / "out"
    result = runner.invoke(app, ["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out), "--model",
                                 str(tiny_checkpoint), "--spacing", str(SPACING), "--no-affine", "--refine", "0"])
    assert result.exit_code == 130
    last = result.output.strip().splitlines()[-1]  # after the per-stage times printed as they finish
    assert last.startswith(f"interrupted: nothing was written to {out}") and "Traceback" not in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- batch


def test_batch_resumes_and_skips_finished_pairs(pair: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("fixed,moving,moving_seg,fixed_seg,name\n"
                        f"{pair['fixed']},{pair['moving']},{pair['moving_seg']},{pair['fixed_seg']},a\n"
                        f"{pair['fixed']},{pair['fixed']},,,b\n")
    assert [p.label for p in read_pair_list(csv_path)] == ["a", "b"]
    out = tmp_path / "batch"
    args = ["register", "--pairs", str(csv_path), "-o", str(out), "--model", str(tiny_checkpoint), "--spacing",
            str(SPACING), "--no-affine", "--no-hd95"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (out / "a" / "metrics.json").is_file() and (out / "b" / "warped.nii.gz").is_file()
    stamp = (out / "a" / "warped.nii.gz").stat().st_mtime_ns
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("name,status") and [r.split(",")[1] for r in summary[1:]] == ["done", "done"]
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert [r.split(",")[1] for r in (out / "summary.csv").read_text().splitlines()[1:]] == ["skipped", "skipped"]
    assert (out / "a" / "warped.nii.gz").stat().st_mtime_ns == stamp


def test_dataset_json_pairs_and_label_lookup(shared_data: Path) -> None:
    pairs = read_pair_list(shared_data / "brain_lumirlike/SYNBRAIN_dataset.json")
    assert pairs[0].label == "0002_0001"
    assert pairs[0].fixed.image.name == "SYNBRAIN_0002_0000.nii.gz" and pairs[0].fixed.image.is_file()
    assert pairs[0].moving.seg is not None and pairs[0].moving.seg.parent.name == "labelsTr"
