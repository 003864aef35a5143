"""Affine pre-alignment helpers: centre of mass and pooling, against hand-built volumes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.affine import center_of_mass, downsample


def test_center_of_mass_of_two_point_masses() -> None:
    data = np.zeros((6, 7, 8), dtype=np.float32)
    data[1, 2, 3] = 1.0
    data[5, 6, 7] = 3.0  # weighted centre (4, 5, 6)
    data[0, 0, 0] = -5.0  # negative intensities weigh nothing
    affine = np.diag([2.0, 3.0, 0.5, 1.0])
    affine[:3, 3] = (10.0, -20.0, 1.0)
    np.testing.assert_allclose(center_of_mass(data, affine), [18.0, -5.0, 4.0], atol=1e-9)
    empty = np.zeros((3, 5, 7), dtype=np.float32)
    np.testing.assert_allclose(center_of_mass(empty, np.eye(4)), [1.0, 2.0, 3.0])


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)), seed=st.integers(0, 1000))
def test_center_of_mass_matches_the_float64_definition(shape: tuple[int, int, int], seed: int) -> None:
    data = np.random.default_rng(seed).random(shape, dtype=np.float32) ** 3
    weights = data.astype(np.float64)
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    expected = [float((weights * g).sum() / weights.sum()) for g in grids]
    np.testing.assert_allclose(center_of_mass(data, np.eye(4)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 12, 16), (9, 13, 10)])
def test_downsample_averages_blocks_and_replicates_the_border(shape: tuple[int, int, int]) -> None:
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    pooled, affine = downsample(data, np.eye(4), (2, 4, 2))
    padded = np.pad(data, [(0, (-n) % k) for n, k in zip(shape, (2, 4, 2), strict=True)], mode="edge")
    d, h, w = padded.shape
    expected = padded.reshape(d // 2, 2, h // 4, 4, w // 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(affine[:3, 3], [0.5, 1.5, 0.5])  # a pooled voxel sits at its block's centre


# ------------------------------------------------------------------------ resampling through an index map


def _scipy_resample(data: np.ndarray, index_map: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.affine_transform(data, index_map[:3, :3], offset=index_map[:3, 3], output_shape=shape,
                                    order=order, mode="constant", cval=0.0, prefilter=False)


def _inside(index_map: np.ndarray, shape: tuple[int, ...], source: tuple[int, ...], margin: float) -> np.ndarray:
    """Target voxels whose source point lies at least ``margin`` inside the source grid."""
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")).reshape(3, -1)
    src = index_map[:3, :3] @ idx + index_map[:3, 3, None]
    hi = np.asarray(source, dtype=float)[:, None] - 1 - margin
    return np.all((src >= margin) & (src <= hi), axis=0).reshape(shape)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), shear=st.floats(-0.15, 0.15), zoom=st.floats(0.7, 1.4))
def test_resample_affine_matches_scipy_inside_the_source(seed: int, shear: float, zoom: float) -> None:
    """The PyTorch sampler is scipy's affine_transform (trilinear, and nearest for labels) wherever the
    source point is inside the source grid; outside it is 0."""
    from eoir_cli.preprocess import resample_affine

    rng = np.random.default_rng(seed)
    data = rng.random((14, 17, 12), dtype=np.float32)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag([zoom, 1.0, 1 / zoom]) + shear * rng.uniform(-1, 1, (3, 3))
    index_map[:3, 3] = rng.uniform(-2, 2, 3)
    shape = (12, 15, 13)
    inside = _inside(index_map, shape, data.shape, 1e-3)
    got = resample_affine(data, index_map, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got[inside], _scipy_resample(data, index_map, shape, 1)[inside], atol=2e-5)
    assert np.all(got[~_inside(index_map, shape, data.shape, -1.0)] == 0)  # a voxel or more beyond: zero
    labels = rng.integers(0, 6, data.shape).astype(np.int16)
    nearest = resample_affine(labels, index_map, shape, order=0)
    assert nearest.dtype == np.int16
    # nearest neighbour: equal except where a source point sits on a rounding tie (none at random maps)
    agree = nearest[inside] == _scipy_resample(labels, index_map, shape, 0)[inside]
    assert agree.mean() > 0.99


def test_resample_affine_prefilter_is_a_nearest_border_gaussian() -> None:
    from scipy import ndimage

    from eoir_cli.preprocess import resample_affine

    data = np.random.default_rng(2).random((16, 18, 14), dtype=np.float32)
    index_map = np.diag([2.0, 1.0, 1.5, 1.0])  # downsampling along two axes
    shape = (8, 18, 9)
    sigma = np.array([0.8, 0.0, 0.6])
    got = resample_affine(data, index_map, shape, sigma=sigma)
    expected = _scipy_resample(ndimage.gaussian_filter(data, sigma, mode="nearest", truncate=4.0), index_map, shape, 1)
    inside = _inside(index_map, shape, data.shape, 1e-3)
    np.testing.assert_allclose(got[inside], expected[inside], atol=2e-5)
