"""The coordinate module: index <-> [-1, 1], affines, RAS <-> LPS, physical Jacobian, one network-on-a-pair path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.backends import open_backend
from eoir_cli.config import resolve_config
from eoir_cli.coords import (
    apply_affine,
    identity_grid,
    index_grid,
    index_to_normalized,
    normalized_to_index,
    physical_jacobian,
    ras_to_lps,
    sample_at,
    voxel_spacing,
)
from eoir_cli.devices import resolve_device
from eoir_cli.errors import EoirError
from eoir_cli.inference import centred_padding, predict_disp, run_pair
from eoir_cli.model import EOIR


def test_identity_grids_agree_and_are_indexed_by_axis() -> None:
    grid = identity_grid((2, 3, 4))[0]
    assert grid.shape == (3, 2, 3, 4)
    # channel c counts along array axis c only: grid[1][d, h, w] = h
    assert grid[1, 1, 2, 3] == 2 and grid[0, 1, 2, 3] == 1 and grid[2, 1, 2, 3] == 3
    np.testing.assert_array_equal(index_grid((2, 3, 4)), grid.numpy())


def test_index_to_normalized_golden_and_axis_order() -> None:
    # Size (5, 3, 2): index (4, 1, 0) is the last voxel along D (+1), the middle along H (0), the first along W (-1).
    index = torch.tensor([4.0, 1.0, 0.0]).view(3, 1, 1, 1)
    grid = index_to_normalized(index, (5, 3, 2))
    assert grid.shape == (1, 1, 1, 3)
    # grid_sample lists (x, y, z) = (W, H, D): a swapped axis would put +1 elsewhere.
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(normalized_to_index(grid, (5, 3, 2))[:, 0, 0, 0], index[:, 0, 0, 0])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sample_at_reads_the_voxel_it_is_given(axis: int) -> None:
    size = (4, 5, 6)
    volume = (100 * identity_grid(size)[0, 0] + 10 * identity_grid(size)[0, 1] + identity_grid(size)[0, 2])[None, None]
    index = identity_grid((1, 1, 1))[0].clone()
    index[axis] += 1.5  # half-way between voxels 1 and 2 along one axis only
    value = float(sample_at(volume, index)[0, 0, 0, 0])
    assert value == pytest.approx((100.0, 10.0, 1.0)[axis] * 1.5, abs=1e-4)


def test_apply_affine_torch_and_numpy_agree() -> None:
    matrix = np.array([[0, 2.0, 0, 10], [1.0, 0, 0, -5], [0, 0, -3.0, 1], [0, 0, 0, 1]])
    points = index_grid((2, 2, 2))
    # point (i, j, k) -> (2j + 10, i - 5, -3k + 1)
    out = apply_affine(matrix, points)
    np.testing.assert_allclose(out[:, 1, 1, 1], [12.0, -4.0, -2.0])
    np.testing.assert_allclose(apply_affine(matrix, torch.from_numpy(points)).numpy(), out, atol=1e-6)
    assert voxel_spacing(matrix) == (1.0, 2.0, 3.0)


def test_ras_to_lps_flips_x_and_y_only() -> None:
    np.testing.assert_array_equal(ras_to_lps(np.array([1.0, 2.0, 3.0])), [-1.0, -2.0, 3.0])
    t = ras_to_lps(torch.ones(3, 2, 2, 2))
    assert t[0].eq(-1).all() and t[1].eq(-1).all() and t[2].eq(1).all()


def test_physical_jacobian_is_one_for_identity_between_different_grids() -> None:
    fixed = np.diag([1.0, 1.0, 1.0, 1.0])
    moving = np.diag([-2.0, 2.0, 2.0, 1.0])  # 2 mm voxels, x axis flipped (an LPS-like array)
    # The identity in mm from a 1 mm grid onto a 2 mm grid: moving index j = i / 2 along every axis (x flipped).
    i = index_grid((6, 6, 6)).transpose(1, 2, 3, 0)
    j = i * np.array([-0.5, 0.5, 0.5])
    jac = physical_jacobian((j - i).astype(np.float32), fixed, moving)
    np.testing.assert_allclose(jac, 1.0, atol=1e-5)


def test_device_resolver() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(EoirError, match="expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


def test_centred_padding_golden() -> None:
    config = resolve_config("lumir", levels=3)  # sizes must divide by 4
    # 10 -> 12 (pad 1 before, 1 after); 9 -> 12 (1 before, 2 after); 8 stays.
    assert centred_padding((10, 9, 8), config) == ((12, 12, 8), (1, 1, 0))


def test_run_pair_and_predict_disp_give_the_same_field_for_an_odd_size() -> None:
    torch.manual_seed(0)
    model = EOIR(resolve_config("lumir", channels=2, levels=3)).eval()
    moving, fixed = torch.rand(1, 1, 10, 9, 8), torch.rand(1, 1, 10, 9, 8)
    with torch.no_grad():
        reference = predict_disp(model, moving, fixed)[0].numpy()
        padded = model(*(torch.nn.functional.pad(x, (0, 0, 1, 2, 1, 1)) for x in (moving, fixed)))
    np.testing.assert_allclose(reference, padded[0, :, 1:11, 1:10, :].numpy(), atol=1e-6)
    net = open_backend(model, device="cpu")
    disp = run_pair(net, moving[0, 0].numpy(), fixed[0, 0].numpy())
    assert disp.shape == (3, 10, 9, 8)
    np.testing.assert_allclose(disp, reference, atol=1e-5)


@pytest.mark.parametrize(("depth", "threads"), [(40, 2), (39, 2), (42, 3), (40, 1)])
@pytest.mark.parametrize(("mode", "padding"), [("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "border")])
def test_grid_sample_split_over_threads_equals_one_call(depth: int, threads: int, mode: str, padding: str) -> None:
    """The slab-split sampler gives F.grid_sample's numbers and gradients exactly (odd depths fall back)."""
    import torch.nn.functional as F

    from eoir_cli.coords import MIN_SPLIT_VOXELS, grid_sample

    gen = torch.Generator().manual_seed(depth * threads)
    volume = torch.randn(1, 3, 20, 24, 18, generator=gen).requires_grad_(True)
    grid = (torch.rand(1, depth, 32, 28, 3, generator=gen) * 2.4 - 1.2).requires_grad_(True)  # some outside
    assert grid[0, ..., 0].numel() >= MIN_SPLIT_VOXELS
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = grid_sample(volume, grid, mode, padding)
        ours.pow(2).sum().backward()
        grads = [volume.grad.clone(), grid.grad.clone()]
        volume.grad = grid.grad = None
        ref = F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)
        ref.pow(2).sum().backward()
    finally:
        torch.set_num_threads(before)
    assert ours.shape == ref.shape == (1, 3, depth, 32, 28)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], volume.grad, rtol=1e-5, atol=1e-5)  # summed over slabs: float order
    torch.testing.assert_close(grads[1], grid.grad, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), start=st.integers(0, 5), planes=st.integers(1, 4))
def test_affine_points_are_the_affine_of_the_index_grid(seed: int, start: int, planes: int) -> None:
    from eoir_cli.coords import affine_points, apply_affine, identity_grid

    matrix = np.eye(4)
    matrix[:3] = np.random.default_rng(seed).uniform(-3, 3, (3, 4))
    shape = (start + planes + 2, 7, 5)
    index = identity_grid((planes, 7, 5))[0]
    index[0] += start
    expected = apply_affine(matrix, index.double()).float()
    got = affine_points(matrix, shape, start, start + planes)
    assert got.shape == (3, planes, 7, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(affine_points(matrix, shape)[:, start:start + planes], got)


@pytest.mark.parametrize("batched", [False, True])
def test_index_to_normalized_is_the_original_arithmetic_with_and_without_a_graph(batched: bool) -> None:
    """Bit for bit 2 * (p / (n - 1) - 0.5), stacked in (W, H, D) order, whether or not autograd records it."""
    from eoir_cli.coords import index_to_normalized

    gen = torch.Generator().manual_seed(1)
    index = torch.randn(*((2,) if batched else ()), 3, 4, 5, 6, generator=gen) * 60
    size = (160, 1, 192)  # an axis of one voxel divides by 1
    channels = [index[:, a] if batched else index[a] for a in range(3)]
    expected = torch.stack([2 * (c / max(n - 1, 1) - 0.5) for c, n in zip(channels, size, strict=True)][::-1], -1)
    assert torch.equal(index_to_normalized(index, size), expected)
    traced = index_to_normalized(index.clone().requires_grad_(True), size)
    assert traced.requires_grad and torch.equal(traced.detach(), expected)
