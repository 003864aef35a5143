"""eoir apply: images and points through a saved registration, both ways; ITK files; bad input.

The registration here is built by hand with a known inverse: an affine ``T`` (rotation, scaling,
translation) after a smooth shear ``s`` along x that depends on z only, so
``φ(p) = T(p + s(p))`` and ``φ⁻¹(q) = y - s(y)`` with ``y = T⁻¹ q`` exactly. Image content is a
linear function of the RAS position, which trilinear interpolation reproduces exactly.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from eoir_cli.apply import apply_to_image, apply_to_points, map_points, open_transform, read_points
from eoir_cli.cli import app
from eoir_cli.coords import RAS_TO_LPS
from eoir_cli.errors import EoirError
from eoir_cli.io import Volume
from eoir_cli.itk import save_itk_affine, save_itk_displacement

runner = CliRunner()
SHEAR_MM, WAVELENGTH_MM = 3.0, 80.0
GRADIENT = np.array([0.7, -1.3, 2.1])  # content = GRADIENT · p + 50 (RAS mm)


def _rotation(deg: float, axis: int) -> np.ndarray:
    a = math.radians(deg)
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
    return rot


T = np.eye(4)
T[:3, :3] = _rotation(6.0, 2) @ np.diag([1.05, 0.97, 1.02])
T[:3, 3] = [4.0, -3.0, 2.0]


def _shear(p: np.ndarray) -> np.ndarray:
    s = np.zeros_like(p)
    s[..., 0] = SHEAR_MM * np.sin(2 * math.pi * p[..., 2] / WAVELENGTH_MM)
    return s


def phi(p: np.ndarray) -> np.ndarray:
    """Fixed RAS mm -> the moving RAS mm it samples."""
    y = p + _shear(p)
    return y @ T[:3, :3].T + T[:3, 3]


def phi_inv(q: np.ndarray) -> np.ndarray:
    y = (q - T[:3, 3]) @ np.linalg.inv(T[:3, :3]).T
    return y - _shear(y)


def _grid_points(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _affine(direction: np.ndarray, spacing: tuple[float, float, float], centre: np.ndarray,
            shape: tuple[int, int, int]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = direction * np.asarray(spacing)
    a[:3, 3] = centre - a[:3, :3] @ (np.array(shape) - 1) / 2
    return a


FIXED_SHAPE = (20, 24, 22)
FIXED_AFFINE = _affine(np.eye(3), (3.0, 3.0, 3.0), np.zeros(3), FIXED_SHAPE)
# The moving grid is LPS-ordered, anisotropic and oblique, and larger than the fixed field of view.
MOVING_SHAPE = (26, 20, 24)
MOVING_AFFINE = _affine(_rotation(5.0, 0) @ np.diag([-1.0, -1.0, 1.0]), (3.0, 4.0, 3.5), np.array([4.0, -3.0, 2.0]),
                        MOVING_SHAPE)


def content(points_ras: np.ndarray) -> np.ndarray:
    return (points_ras @ GRADIENT + 50.0).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registration folder as eoir register writes it, from the analytic φ."""
    out = tmp_path_factory.mktemp("reg")
    p = _grid_points(FIXED_AFFINE, FIXED_SHAPE)
    save_itk_displacement(out / "warp_itk.nii.gz", ((phi(p) - p) * RAS_TO_LPS).astype(np.float32), FIXED_AFFINE)
    q = _grid_points(MOVING_AFFINE, MOVING_SHAPE)
    save_itk_displacement(out / "inverse_warp_itk.nii.gz", ((phi_inv(q) - q) * RAS_TO_LPS).astype(np.float32),
                          MOVING_AFFINE)
    nib.save(nib.Nifti1Image(content(q), MOVING_AFFINE), str(out / "moving.nii.gz"))
    nib.save(nib.Nifti1Image(content(p), FIXED_AFFINE), str(out / "fixed.nii.gz"))
    return out


def _inside(points_ras: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], margin: float = 1.0) -> np.ndarray:
    inv = np.linalg.inv(affine)
    idx = points_ras @ inv[:3, :3].T + inv[:3, 3]
    return np.all((idx >= margin) & (idx <= np.array(shape) - 1 - margin), axis=-1)


def test_forward_apply_samples_the_moving_image_at_phi(folder: Path) -> None:
    out = apply_to_image(folder, folder / "moving.nii.gz")
    p = _grid_points(FIXED_AFFINE, FIXED_SHAPE)
    inside = _inside(phi(p), MOVING_AFFINE, MOVING_SHAPE)
    assert inside.mean() > 0.5 and out.shape == FIXED_SHAPE
    np.testing.assert_allclose(out.data[inside], content(phi(p))[inside], rtol=0, atol=2e-3)
    np.testing.assert_allclose(out.affine, FIXED_AFFINE)


def test_an_image_on_its_own_grid_gives_the_same_warped_image(folder: Path) -> None:
    # The same moving-space content on another grid: RAS order, 2 mm, shifted field of view.
    shape = (40, 36, 38)
    affine = _affine(np.eye(3), (2.0, 2.0, 2.0), np.array([2.0, 0.0, -1.0]), shape)
    other = Volume(content(_grid_points(affine, shape)), affine)
    a = apply_to_image(folder, folder / "moving.nii.gz").data
    b = apply_to_image(folder, other).data
    p = phi(_grid_points(FIXED_AFFINE, FIXED_SHAPE))
    both = _inside(p, MOVING_AFFINE, MOVING_SHAPE) & _inside(p, affine, shape)
    assert both.mean() > 0.4
    np.testing.assert_allclose(a[both], b[both], rtol=0, atol=2e-3)


def test_inverse_apply_samples_the_fixed_image_at_phi_inverse(folder: Path) -> None:
    out = apply_to_image(folder, folder / "fixed.nii.gz", inverse=True)
    q = _grid_points(MOVING_AFFINE, MOVING_SHAPE)
    inside = _inside(phi_inv(q), FIXED_AFFINE, FIXED_SHAPE)
    assert inside.mean() > 0.3 and out.shape == MOVING_SHAPE
    np.testing.assert_allclose(out.data[inside], content(phi_inv(q))[inside], rtol=0, atol=2e-3)


def test_image_round_trip_through_apply_and_apply_inverse(folder: Path, tmp_path: Path) -> None:
    there = apply_to_image(folder, folder / "moving.nii.gz")
    nib.save(nib.Nifti1Image(there.data, there.affine), str(tmp_path / "there.nii.gz"))
    back = apply_to_image(folder, tmp_path / "there.nii.gz", inverse=True)
    q = _grid_points(MOVING_AFFINE, MOVING_SHAPE)
    # Voxels whose round trip stays inside both grids (with a voxel of margin).
    ok = _inside(phi_inv(q), FIXED_AFFINE, FIXED_SHAPE, margin=1.5) & _inside(q, MOVING_AFFINE, MOVING_SHAPE, 1.5)
    assert ok.mean() > 0.2
    # The content changes by |GRADIENT| ≈ 2.6 per mm: 0.05 means the round trip is within ~0.02 mm.
    np.testing.assert_allclose(back.data[ok], content(q)[ok], rtol=0, atol=0.05)


def test_simpleitk_applying_the_inverse_field_reproduces_apply_inverse(folder: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(str(folder / "inverse_warp_itk.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetSize() == MOVING_SHAPE and field.GetNumberOfComponentsPerPixel() == 3
    transform = sitk.DisplacementFieldTransform(field)
    fixed = sitk.ReadImage(str(folder / "fixed.nii.gz"), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(folder / "moving.nii.gz"), sitk.sitkFloat32)
    theirs = sitk.GetArrayFromImage(sitk.Resample(fixed, reference, transform, sitk.sitkLinear, 0.0))
    ours = apply_to_image(folder, folder / "fixed.nii.gz", inverse=True).data
    theirs = theirs.transpose(2, 1, 0)  # SimpleITK arrays are (z, y, x)
    # Within the fixed image; at its very edge ITK and eoir pad differently (ITK: a whole 0 beyond
    # half a voxel, eoir: trilinear against 0).
    inside = _inside(phi_inv(_grid_points(MOVING_AFFINE, MOVING_SHAPE)), FIXED_AFFINE, FIXED_SHAPE)
    assert inside.mean() > 0.3
    assert np.corrcoef(theirs[inside], ours[inside])[0, 1] > 0.9999
    np.testing.assert_allclose(theirs[inside], ours[inside], rtol=0, atol=1e-3)


def test_points_go_moving_to_fixed_and_back(folder: Path) -> None:
    rng = np.random.default_rng(0)
    p_true = rng.uniform(-20, 20, size=(50, 3))  # well inside the fixed field of view
    q = phi(p_true)
    p = map_points(folder, q)
    # The field is trilinear between 3 mm voxels: the shear's curvature costs < 0.05 mm.
    np.testing.assert_allclose(p, p_true, rtol=0, atol=0.05)
    back = map_points(folder, p, inverse=True)
    assert np.abs(back - q).max() < 1e-3  # forward then back: solved to 1e-4 mm


def test_points_through_a_single_field_file(folder: Path) -> None:
    rng = np.random.default_rng(1)
    p_true = rng.uniform(-15, 15, size=(20, 3))
    field = folder / "warp_itk.nii.gz"
    np.testing.assert_allclose(map_points(field, phi(p_true)), p_true, rtol=0, atol=0.05)
    np.testing.assert_allclose(map_points(field, p_true, inverse=True), phi(p_true), rtol=0, atol=0.05)


def test_point_columns_choose_the_convention_and_keep_other_columns(folder: Path, tmp_path: Path) -> None:
    p_true = np.array([[5.0, -7.0, 9.0], [-12.0, 3.0, -4.0]])
    q = phi(p_true)
    lps = q * RAS_TO_LPS
    (tmp_path / "ras.csv").write_text("name,R,A,S\n" + "".join(f"pt{n},{a},{b},{c}\n" for n, (a, b, c) in enumerate(q)))
    (tmp_path / "lps.csv").write_text("x,y,z,t\n" + "".join(f"{a},{b},{c},0\n" for a, b, c in lps))
    ras_out = apply_to_points(folder, tmp_path / "ras.csv").splitlines()
    lps_out = apply_to_points(folder, tmp_path / "lps.csv").splitlines()
    assert ras_out[0] == "name,R,A,S" and lps_out[0] == "x,y,z,t"
    got_ras = np.array([[float(v) for v in line.split(",")[1:]] for line in ras_out[1:]])
    got_lps = np.array([[float(v) for v in line.split(",")[:3]] for line in lps_out[1:]])
    assert [line.split(",")[0] for line in ras_out[1:]] == ["pt0", "pt1"]
    np.testing.assert_allclose(got_ras, p_true, atol=0.05)
    # x,y,z are LPS (as antsApplyTransformsToPoints reads them): the signs of x and y flip.
    np.testing.assert_allclose(got_lps, p_true * RAS_TO_LPS, atol=0.05)


def test_voxel_index_points_use_the_source_and_target_grids(folder: Path, tmp_path: Path) -> None:
    ijk = np.array([[10.0, 8.0, 12.0], [14.0, 9.0, 10.0]])  # moving voxel indices
    q = ijk @ MOVING_AFFINE[:3, :3].T + MOVING_AFFINE[:3, 3]
    (tmp_path / "ijk.csv").write_text("i,j,k\n" + "".join(f"{a},{b},{c}\n" for a, b, c in ijk))
    lines = apply_to_points(folder, tmp_path / "ijk.csv").splitlines()[1:]
    got = np.array([[float(v) for v in line.split(",")] for line in lines])
    expected = (phi_inv(q) - FIXED_AFFINE[:3, 3]) @ np.linalg.inv(FIXED_AFFINE[:3, :3]).T  # fixed voxel indices
    np.testing.assert_allclose(got, expected, atol=0.02)


def test_label_maps_keep_their_values(folder: Path, tmp_path: Path) -> None:
    q = _grid_points(MOVING_AFFINE, MOVING_SHAPE)
    labels = np.where(q[..., 0] > 0, 7, 3).astype(np.int16)
    labels[q[..., 2] > 12] = 11
    nib.save(nib.Nifti1Image(labels, MOVING_AFFINE), str(tmp_path / "labels.nii.gz"))
    for interp in ("label", "nearest"):
        out = apply_to_image(folder, tmp_path / "labels.nii.gz", interp=interp).data
        assert set(np.unique(out)) <= {0, 3, 7, 11} and {3, 7, 11} <= set(np.unique(out))
        p = phi(_grid_points(FIXED_AFFINE, FIXED_SHAPE))
        truth = np.where(p[..., 0] > 0, 7, 3)
        truth[p[..., 2] > 12] = 11
        inside = _inside(p, MOVING_AFFINE, MOVING_SHAPE)
        assert (out[inside] == truth[inside]).mean() > 0.97


def test_label_interpolation_picks_the_label_with_the_largest_weight() -> None:
    import torch

    from eoir_cli.apply import _sample_image

    # 2×2×2 cube: label 5 at the corners with x0 = 0, label 9 at x0 = 1. At x0 = 0.4 label 5
    # holds weight 0.6; at x0 = 0.6 label 9 does.
    cube = torch.tensor([5, 9]).view(2, 1, 1).expand(2, 2, 2).reshape(1, 1, 2, 2, 2).contiguous()
    at = torch.tensor([[0.4, 0.6], [0.5, 0.5], [0.5, 0.5]]).view(3, 1, 1, 2)
    assert _sample_image(cube, at, "label").flatten().tolist() == [5, 9]
    # Half a voxel outside along x0: 0.5·label 9 vs 0.5·background; the first max wins -> stays inside.
    outside = torch.tensor([[1.6], [0.5], [0.5]]).view(3, 1, 1, 1)
    assert _sample_image(cube, outside, "label").flatten().tolist() == [0]


@pytest.mark.parametrize("suffix", [".txt", ".mat"])
def test_affine_itk_file_is_read_by_simpleitk_as_the_same_map(suffix: str, tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    path = save_itk_affine(tmp_path / f"affine{suffix}", T)
    tx = sitk.ReadTransform(str(path))
    p = np.array([10.0, -20.0, 30.0])
    q_lps = np.array(tx.TransformPoint(tuple((p * RAS_TO_LPS).tolist())))
    np.testing.assert_allclose(q_lps * RAS_TO_LPS, T[:3, :3] @ p + T[:3, 3], atol=1e-9)


def test_cli_apply_writes_the_image_and_the_points(folder: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["apply", str(folder), str(folder / "moving.nii.gz"), "-o", str(tmp_path / "w.nii.gz")])
    assert res.exit_code == 0, res.output
    img = nib.load(str(tmp_path / "w.nii.gz"))
    assert img.shape == FIXED_SHAPE and np.allclose(img.affine, FIXED_AFFINE)
    np.testing.assert_array_equal(np.asarray(img.dataobj), apply_to_image(folder, folder / "moving.nii.gz").data)
    (tmp_path / "p.csv").write_text("R,A,S\n1,2,3\n")
    res = runner.invoke(app, ["apply", str(folder), "--points", str(tmp_path / "p.csv"), "-o", str(tmp_path / "o.csv")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.csv").read_text().startswith("R,A,S\n")


def test_cli_bad_inputs_end_in_one_line(folder: Path, tmp_path: Path) -> None:
    moving = str(folder / "moving.nii.gz")
    scalar = tmp_path / "scalar.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(scalar))
    far = tmp_path / "far.nii.gz"
    far_affine = MOVING_AFFINE.copy()
    far_affine[:3, 3] += 1000.0  # another scanner space altogether
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(MOVING_SHAPE).astype(np.float32), far_affine), str(far))
    (tmp_path / "bad.csv").write_text("u,v,w\n1,2,3\n")
    (tmp_path / "exists.nii.gz").write_bytes(b"keep")
    cases = [
        (["apply", str(tmp_path / "nowhere"), moving, "-o", str(tmp_path / "a.nii.gz")], "no such registration"),
        (["apply", str(tmp_path), moving, "-o", str(tmp_path / "a.nii.gz")], "found no warp_itk.nii.gz"),
        (["apply", str(scalar), moving, "-o", str(tmp_path / "a.nii.gz")], "expected a displacement field of shape"),
        (["apply", str(folder), str(far), "-o", str(tmp_path / "a.nii.gz")], "does not overlap"),
        (["apply", str(folder), moving, "-o", str(tmp_path / "exists.nii.gz")], "exists"),
        (["apply", str(folder / "warp_itk.nii.gz"), moving, "--inverse", "-o", str(tmp_path / "a.nii.gz")],
         "no inverse_warp_itk.nii.gz"),
        (["apply", str(folder), "--points", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "a.csv")],
         "expected coordinate columns"),
        (["apply", str(folder), moving], "expected -o"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output, (message, res.output)
        assert "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) <= 2, res.output  # one line (rich may wrap once)
    assert (tmp_path / "exists.nii.gz").read_bytes() == b"keep"
    assert not (tmp_path / "a.nii.gz").exists()


def test_read_points_rejects_non_numbers(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("R,A,S\n1,two,3\n")
    with pytest.raises(EoirError, match=r"line 2: expected numbers in columns R, A, S"):
        read_points(tmp_path / "p.csv")


def test_open_transform_names_the_missing_inverse(folder: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(folder / "warp_itk.nii.gz", tmp_path / "warp_itk.nii.gz")
    transform = open_transform(tmp_path)
    with pytest.raises(EoirError, match="no inverse_warp_itk.nii.gz"):
        transform.field(inverse=True)


@pytest.fixture(scope="module")
def forward_only(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same registration saved the default way: no inverse field; metrics.json names the moving image."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("forward_only")
    for name in ("warp_itk.nii.gz", "fixed.nii.gz", "moving.nii.gz"):
        shutil.copy(folder / name, out / name)
    (out / "metrics.json").write_text(json.dumps({"moving": str(out / "moving.nii.gz")}))
    return out


@pytest.mark.parametrize("how", ["metrics.json", "reference"])
def test_inverse_is_computed_from_the_forward_field_when_not_saved(forward_only: Path, tmp_path: Path,
                                                                   how: str) -> None:
    import shutil

    source = forward_only
    if how == "reference":  # a bare field file: the moving grid comes from --reference
        source = tmp_path / "warp_itk.nii.gz"
        shutil.copy(forward_only / "warp_itk.nii.gz", source)
    out = apply_to_image(source, forward_only / "fixed.nii.gz", inverse=True,
                         reference=forward_only / "moving.nii.gz" if how == "reference" else None)
    q = _grid_points(MOVING_AFFINE, MOVING_SHAPE)
    inside = _inside(phi_inv(q), FIXED_AFFINE, FIXED_SHAPE, margin=1.5)
    assert inside.mean() > 0.3 and out.shape == MOVING_SHAPE
    np.testing.assert_allclose(out.affine, MOVING_AFFINE)
    # |GRADIENT| ≈ 2.6 per mm: 0.05 = the computed inverse within ~0.02 mm of φ⁻¹ (the saved one: 2e-3).
    np.testing.assert_allclose(out.data[inside], content(phi_inv(q))[inside], rtol=0, atol=0.05)


def test_no_inverse_and_no_moving_image_is_one_clear_error(forward_only: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(forward_only / "warp_itk.nii.gz", tmp_path / "warp_itk.nii.gz")
    with pytest.raises(EoirError, match="--reference MOVING.nii.gz, or register again with --inverse"):
        apply_to_image(tmp_path, forward_only / "fixed.nii.gz", inverse=True)
    result = runner.invoke(app, ["apply", str(tmp_path), str(forward_only / "fixed.nii.gz"), "-o",
                                 str(tmp_path / "x.nii.gz"), "--inverse"])
    assert result.exit_code == 1 and "--reference" in result.output and not (tmp_path / "x.nii.gz").exists()
    result = runner.invoke(app, ["apply", str(tmp_path), str(forward_only / "fixed.nii.gz"), "-o",
                                 str(tmp_path / "x.nii.gz"), "--inverse", "--reference",
                                 str(forward_only / "moving.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "computing the inverse" in result.output and (tmp_path / "x.nii.gz").is_file()


def test_ants_reads_both_fields_and_moves_points_the_documented_way(folder: Path) -> None:
    """antsApplyTransforms / antsApplyTransformsToPoints (antspyx) against eoir apply on the analytic φ."""
    ants = pytest.importorskip("ants", reason="antspyx is not installed (optional: pip install antspyx)")
    import pandas as pd

    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    for target, source, field, inverse in ((fixed, moving, "warp_itk.nii.gz", False),
                                           (moving, fixed, "inverse_warp_itk.nii.gz", True)):
        theirs = ants.apply_transforms(fixed=target, moving=source, transformlist=[str(folder / field)],
                                       interpolator="linear").numpy()
        ours = apply_to_image(folder, folder / ("fixed.nii.gz" if inverse else "moving.nii.gz"), inverse=inverse).data
        assert theirs.shape == ours.shape
        grid = _grid_points(MOVING_AFFINE, MOVING_SHAPE) if inverse else _grid_points(FIXED_AFFINE, FIXED_SHAPE)
        mapped = phi_inv(grid) if inverse else phi(grid)
        inside = _inside(mapped, FIXED_AFFINE if inverse else MOVING_AFFINE, FIXED_SHAPE if inverse else MOVING_SHAPE)
        np.testing.assert_allclose(theirs[inside], ours[inside], rtol=0, atol=1e-3)
    # ANTs moves points with the forward field from the fixed space into the moving space: eoir's --inverse.
    p = _grid_points(FIXED_AFFINE, FIXED_SHAPE).reshape(-1, 3)[::97]
    moved = ants.apply_transforms_to_points(3, pd.DataFrame(p * RAS_TO_LPS, columns=["x", "y", "z"]),
                                            [str(folder / "warp_itk.nii.gz")])
    np.testing.assert_allclose(moved[["x", "y", "z"]].to_numpy() * RAS_TO_LPS, map_points(folder, p, inverse=True),
                               rtol=0, atol=1e-3)


def test_a_missing_reference_is_one_line_before_any_work(forward_only: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(forward_only / "warp_itk.nii.gz", tmp_path / "warp_itk.nii.gz")
    result = runner.invoke(app, ["apply", str(tmp_path), str(forward_only / "fixed.nii.gz"), "-o",
                                 str(tmp_path / "x.nii.gz"), "--inverse", "--reference", str(tmp_path / "nope.nii.gz")])
    assert result.exit_code == 1 and "no such file" in result.output
    assert "computing the inverse" not in result.output and not (tmp_path / "x.nii.gz").exists()


def test_entry_point_process_writes_the_whole_result_before_its_quick_exit(folder: Path, tmp_path: Path) -> None:
    # `eoir apply` ends with os._exit (eoir_cli.cli.quick_exit): the file must be complete and the message out.
    out = tmp_path / "w.nii.gz"
    done = subprocess.run([sys.executable, "-m", "eoir_cli.cli", "apply", str(folder), str(folder / "moving.nii.gz"),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert str(out) in done.stdout
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj),
                                  apply_to_image(folder, folder / "moving.nii.gz").data)
