"""Evaluation metrics: hand-computed goldens for Dice, HD95, NDV, |J|, SDlogJ, TRE and landmarks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eoir_cli.metrics import (
    dice_per_label,
    dice_per_label_each,
    field_metrics,
    hd95_per_label,
    inverse_consistency,
    jacobian_nonpositive_percent,
    landmarks_from_label_image,
    mean_dice,
    ndv,
    sdlogj,
    tetrahedra_determinants,
    tre_mm,
)
from eoir_cli.spatial import integrate


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    pred = np.zeros((12, 8, 8), dtype=np.int32)
    target = np.zeros_like(pred)
    pred[2:6, 2:6, 2:6] = 1  # 4³ cube
    target[4:8, 2:6, 2:6] = 1  # the same cube moved 2 voxels along axis 0: overlap 2·4·4 = 32
    return pred, target


def test_dice_goldens() -> None:
    pred, target = _cubes()
    # 2·32 / (64 + 64) = 0.5
    assert dice_per_label(pred, target) == {1: 0.5}
    pred[0, 0, 0] = 5  # in pred only: Dice 0
    target[11, 7, 7] = 9  # in target only: Dice 0
    scores = dice_per_label(pred, target, labels=[1, 5, 9, 42])  # 42 absent from both: skipped
    assert scores == {1: 0.5, 5: 0.0, 9: 0.0}
    assert mean_dice(pred, target, labels=[1, 42]) == 0.5
    assert math.isnan(mean_dice(pred, target, labels=[42]))
    # Background counted when asked: 2·(1152 - 96 - 2) / (2·(1152 - 64 - 1)) ... computed directly:
    bg = dice_per_label(pred, target, labels=[0])[0]
    p0, t0 = pred == 0, target == 0
    assert bg == pytest.approx(2 * (p0 & t0).sum() / (p0.sum() + t0.sum()))


def test_dice_of_several_maps_is_each_maps_dice() -> None:
    """dice_per_label_each (before and after against one target) = dice_per_label of each, including a
    label present in one of the maps only."""
    pred, target = _cubes()
    other = np.roll(pred, 1, axis=0)
    other[0, 0, 0] = 7  # only in this map
    for labels in (None, [1, 7, 42]):
        assert dice_per_label_each([pred, other], target, labels) == [dice_per_label(pred, target, labels),
                                                                       dice_per_label(other, target, labels)]
    assert dice_per_label_each([other], target)[0] == {1: 2 * 48 / 128, 7: 0.0}  # overlap 3·4·4
    assert dice_per_label_each([], target) == []


def test_dice_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"label images: expected equal shapes, got \(4, 4, 4\) vs \(4, 4, 5\)"):
        dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_hd95_of_shifted_cube_with_anisotropic_spacing() -> None:
    pred, target = _cubes()
    # Shift of 2 voxels along axis 0 at 2 mm/voxel: the far faces are 2·2 = 4 mm apart, and 16 of the
    # 56 surface voxels (> 5 %) sit at that distance in each direction.
    assert hd95_per_label(pred, target, spacing=(2.0, 1.0, 1.0)) == {1: pytest.approx(4.0)}
    # The same shift with isotropic 1 mm spacing: 2 mm; a swapped spacing axis would give 2 mm too,
    # but spacing on axis 1 only must leave it at 2 mm (not 4).
    assert hd95_per_label(pred, target, spacing=(1.0, 2.0, 1.0)) == {1: pytest.approx(2.0)}


def test_hd95_absent_labels() -> None:
    pred, target = _cubes()
    pred[0, 0, 0] = 5
    scores = hd95_per_label(pred, target, labels=[1, 5, 42])
    assert set(scores) == {1, 5}
    assert math.isnan(scores[5])
    assert hd95_per_label(target, target) == {1: 0.0}


def _linear_disp(size: tuple[int, int, int], axis: int, slope: float) -> np.ndarray:
    disp = np.zeros((3, *size))
    coords = np.arange(size[axis], dtype=np.float64)
    shape = [1, 1, 1]
    shape[axis] = size[axis]
    disp[axis] = slope * coords.reshape(shape)
    return disp


def test_identity_field_is_perfectly_regular() -> None:
    assert field_metrics(np.zeros((3, 8, 9, 10))) == {"ndv_percent": 0.0, "jac_nonpos_percent": 0.0, "sdlogj": 0.0}


def test_tetrahedra_of_identity_have_the_reference_volumes() -> None:
    dets = tetrahedra_determinants(np.zeros((3, 5, 5, 5)))
    # 6 × volume: 1 for the 8 corner tetrahedra, 2 for the 2 central ones (1/6 and 1/3 of a unit cube).
    assert [float(d.mean()) for d in dets] == [1.0] * 8 + [2.0] * 2
    # Per cube, each five-tetrahedra split sums to the cube's volume: (4·1 + 2)/6 = 1.


def test_reversed_axis_is_fully_non_diffeomorphic() -> None:
    # x0 -> x0 - 2·x0 = -x0 everywhere: every tetrahedron is inverted; per voxel the 8 corner
    # tetrahedra (1/6 each) and 2 central ones (1/3 each), halved over the two splits: (8/6 + 2/3)/2 = 1,
    # i.e. 100 % of the volume.
    disp = _linear_disp((10, 6, 6), 0, -2.0)
    assert ndv(disp) == pytest.approx(100.0)
    assert jacobian_nonpositive_percent(disp) == 100.0


def test_folded_slab_has_positive_ndv_and_nonpositive_jacobians() -> None:
    size = (12, 8, 8)
    disp = np.zeros((3, *size))
    # Inside the slab x0 in [4, 7] the map x0 -> x0 - 2·(x0 - 4) runs backwards: a fold.
    x0 = np.arange(size[0], dtype=np.float64)
    fold = np.where((x0 >= 4) & (x0 <= 7), -2.0 * (x0 - 4), np.where(x0 > 7, -6.0, 0.0))
    disp[0] = fold[:, None, None]
    metrics = field_metrics(disp)
    assert metrics["ndv_percent"] > 0
    assert metrics["jac_nonpos_percent"] > 0
    assert metrics["sdlogj"] > 0
    # A mask outside the fold sees no folding.
    mask = np.zeros(size)
    mask[:3] = 1
    assert ndv(disp, mask) == 0.0
    assert jacobian_nonpositive_percent(disp, mask) == 0.0


def test_smooth_invertible_field_has_zero_ndv() -> None:
    size = (16, 16, 16)
    grid = np.stack(np.meshgrid(*[np.arange(s) / (s - 1) * np.pi for s in size], indexing="ij"))
    # Vanishes on the border (where scaling and squaring would sample zero padding).
    bump = np.sin(grid[0]) * np.sin(grid[1]) * np.sin(grid[2])
    velocity = 3.0 * np.stack([bump, bump * np.cos(grid[0]), -bump])
    disp = integrate(torch.from_numpy(velocity[None]).float(), 7)[0].numpy()
    assert np.abs(disp).max() > 1.0
    assert ndv(disp) == 0.0
    assert jacobian_nonpositive_percent(disp) == 0.0
    assert 0.0 < sdlogj(disp) < 1.0


def test_sdlogj_of_uniform_scaling_is_zero() -> None:
    # x0 -> 1.5·x0: |J| = 1.5 everywhere, so log|J| is constant and its std is 0.
    assert sdlogj(_linear_disp((8, 8, 8), 0, 0.5)) == pytest.approx(0.0, abs=1e-12)


def test_field_metrics_reject_channels_last() -> None:
    with pytest.raises(ValueError, match=r"disp: expected \(3, D, H, W\) in voxels, got shape \(8, 8, 8, 3\)"):
        ndv(np.zeros((8, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"mask: expected shape \(8, 8, 8\)"):
        ndv(np.zeros((3, 8, 8, 8)), mask=np.ones((8, 8, 9)))


def test_tre_of_constant_shift() -> None:
    disp = np.zeros((3, 6, 6, 6))
    disp[1] = 1.0  # 1 voxel along axis 1
    points = np.array([[1.0, 1.0, 1.0], [2.5, 3.25, 4.0]])
    # Landmarks unchanged between images: the error is the shift, 1 voxel · 2 mm = 2 mm on axis 1.
    np.testing.assert_allclose(tre_mm(points, points, disp, spacing=(1.0, 2.0, 3.0)), [2.0, 2.0])
    # Moving landmarks one voxel further along axis 1: a perfect registration, TRE 0.
    np.testing.assert_allclose(tre_mm(points, points + [0, 1, 0], disp, spacing=(1.0, 2.0, 3.0)), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"fixed_points: expected \(K, 3\) voxel positions"):
        tre_mm(points[:, :2], points, disp)


def test_landmarks_from_label_image() -> None:
    label = np.zeros((6, 6, 6), dtype=np.int16)
    label[1, 2, 3] = 4
    label[4:6, 0, 0] = 9  # two voxels: centroid (4.5, 0, 0)
    marks = landmarks_from_label_image(label)
    assert sorted(marks) == [4, 9]
    np.testing.assert_allclose(marks[4], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(marks[9], [4.5, 0.0, 0.0])
    assert landmarks_from_label_image(np.zeros((3, 3, 3))) == {}


def test_hd95_in_the_bounding_box_equals_the_whole_volume_computation() -> None:
    # Two blobs near a corner (one touching the volume border): the bounding-box shortcut must give the
    # distances of the plain whole-volume definition.
    from scipy import ndimage

    from eoir_cli.metrics import _surface

    rng = np.random.default_rng(3)
    pred = np.zeros((20, 24, 18), dtype=np.int16)
    target = np.zeros_like(pred)
    pred[0:6, 3:11, 2:9] = 1
    target[1:8, 5:12, 0:7] = 1
    pred[rng.random(pred.shape) > 0.97] = 0  # ragged surfaces
    expected = []
    for a, b in ((pred == 1, target == 1), (target == 1, pred == 1)):
        dist = ndimage.distance_transform_edt(~_surface(b), sampling=(2.0, 1.0, 1.5))[_surface(a)]
        expected.append(np.percentile(dist, 95))
    got = hd95_per_label(pred, target, [1], spacing=(2.0, 1.0, 1.5))[1]
    assert got == pytest.approx(max(expected), abs=1e-9)


@pytest.mark.parametrize("between", [0, 5000])
def test_inverse_consistency_goldens_at_and_between_voxels(between: int) -> None:
    shape = (10, 12, 14)
    fixed_affine = np.diag([2.0, 1.0, 1.5, 1.0])
    moving_affine = fixed_affine.copy()
    disp = np.zeros(shape + (3,), np.float32)
    disp[..., 1] = 1.5  # fixed voxel i samples moving voxel i + (0, 1.5, 0): 1.5 mm along the second axis
    mask = np.zeros(shape, bool)
    mask[2:8, 2:8, 2:10] = True
    exact = inverse_consistency(disp, fixed_affine, mask, -disp, moving_affine, mask, between=between)
    wrong = inverse_consistency(disp, fixed_affine, mask, np.zeros_like(disp), moving_affine, mask,
                                        between=between)
    for direction in ("fixed_to_moving_to_fixed", "moving_to_fixed_to_moving"):
        assert exact[direction]["max_mm"] < 1e-5
        assert wrong[direction]["mean_mm"] == pytest.approx(1.5, abs=1e-5)  # off by the whole shift
        assert exact[direction]["fraction_inside"] == 1.0
