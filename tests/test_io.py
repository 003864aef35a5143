"""eoir_cli.io: NIfTI round trip and one clear error for every bad input file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from eoir_cli.io import Volume, VolumeError, check_same_grid, load_volume, save_volume

AFFINE = np.array([[-2.0, 0, 0, 10], [0, -3.0, 0, 20], [0, 0, 4.0, -30], [0, 0, 0, 1]])


def _write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _image(shape=(6, 7, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_round_trip_keeps_data_affine_and_dtype(tmp_path: Path) -> None:
    data = _image()
    save_volume(tmp_path / "a.nii.gz", data, AFFINE)
    vol = load_volume(tmp_path / "a.nii.gz")
    assert vol.data.dtype == np.float32 and vol.shape == (6, 7, 8)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    # spacing = column norms of the affine: 2, 3, 4 mm
    assert vol.spacing == pytest.approx((2.0, 3.0, 4.0))


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    save_volume(tmp_path / "b.nii.gz", _image(), AFFINE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.nii.gz"]


def test_label_maps_load_as_int32(tmp_path: Path) -> None:
    labels = np.zeros((4, 5, 6), np.int16)
    labels[1:3, 1:3, 1:3] = 7
    vol = load_volume(_write(tmp_path / "s.nii.gz", labels), kind="label")
    assert vol.data.dtype == np.int32 and int(vol.data.max()) == 7


def test_singleton_fourth_axis_is_squeezed(tmp_path: Path) -> None:
    vol = load_volume(_write(tmp_path / "x.nii.gz", _image((5, 6, 7, 1))))
    assert vol.shape == (5, 6, 7)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.write_text("hello, not an image\n"), p)[1], "not a readable NIfTI"),
        (lambda p: (p.with_suffix("").write_bytes(np.random.default_rng(0).bytes(2000)), p.with_suffix(""))[1],
         "not a readable NIfTI"),
        (lambda p: (p.write_bytes(gzip.compress(np.random.default_rng(1).bytes(5000))), p)[1], "not a readable NIfTI"),
        (lambda p: _write(p, _image((6, 7))), "expected a 3-D volume"),
        (lambda p: _write(p, _image((5, 6, 7, 2))), "expected a 3-D volume"),
        (lambda p: _write(p, np.where(_image() > 5, _image(), np.nan).astype(np.float32)), "NaN/Inf"),
        (lambda p: _write(p, np.where(_image() > 5, _image(), np.inf).astype(np.float32)), "NaN/Inf"),
        (lambda p: _write(p, np.full((5, 6, 7), 3.0, np.float32)), "constant image"),
        (lambda p: (p.with_name("x.mgz").write_bytes(b"\0" * 400), p.with_name("x.mgz"))[1], "expected a NIfTI"),
    ],
    ids=["missing", "text", "random-bytes", "not-nifti-gzip", "2d", "4d", "nan", "inf", "constant", "suffix"],
)
def test_bad_inputs_raise_one_clear_line(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match=message) as info:
        load_volume(path, what="fixed")
    assert "\n" not in str(info.value) and str(info.value).startswith("fixed ")


def test_truncated_gzip_is_rejected(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    blob = good.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(VolumeError, match="not a readable NIfTI"):
        load_volume(bad)


def test_fractional_labels_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="fractional"):
        load_volume(_write(tmp_path / "s.nii.gz", _image() / 7), kind="label")


def test_label_grid_must_match_its_image() -> None:
    image = Volume(_image(), AFFINE)
    with pytest.raises(VolumeError, match="shape of its image"):
        check_same_grid(Volume(np.zeros((6, 7, 9), np.int32), AFFINE), image, "moving-seg")
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.5
    with pytest.raises(VolumeError, match=r"geometry \(affine\) differs .* 1\.5 mm"):
        check_same_grid(Volume(np.zeros((6, 7, 8), np.int32), shifted), image, "moving-seg")
    check_same_grid(Volume(np.zeros((6, 7, 8), np.int32), AFFINE), image, "moving-seg")
