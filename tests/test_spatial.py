"""Spatial core: warp convention goldens, sampler parity, gradcheck, integration, resizing, Jacobian."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.spatial import (
    compose,
    identity_grid,
    integrate,
    jacobian_determinant,
    resize_disp,
    sample_gather,
    sample_rows,
    sample_torch,
    warp,
)

SAMPLERS = ("torch", "gather")
# Axis-coded image: value = 100·d + 10·h + w, so a shift along axis c adds 0.5·(100, 10, 1)[c].
WEIGHTS = (100.0, 10.0, 1.0)


def _coded_image(size: tuple[int, int, int] = (4, 5, 6), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    grid = identity_grid(size, dtype=dtype)[0]
    return (WEIGHTS[0] * grid[0] + WEIGHTS[1] * grid[1] + WEIGHTS[2] * grid[2])[None, None]


def _shift(size: tuple[int, int, int], axis: int, amount: float) -> torch.Tensor:
    disp = torch.zeros(1, 3, *size)
    disp[:, axis] = amount
    return disp


def _check_half_voxel_shift(image: torch.Tensor, out: torch.Tensor, axis: int, atol: float) -> None:
    """``out`` = ``image`` (axis-coded) warped by +0.5 voxel along ``axis``."""
    size = image.shape[2:]
    # Interior: image(x + 0.5·e_axis) = image(x) + 0.5·WEIGHTS[axis] (linear along the axis);
    # a swapped axis would add 0.5·WEIGHTS[other] instead.
    inner = [slice(None)] * 5
    inner[2 + axis] = slice(0, size[axis] - 1)
    torch.testing.assert_close(out[tuple(inner)], (image + 0.5 * WEIGHTS[axis])[tuple(inner)], rtol=0, atol=atol)
    # Last slice along the axis samples half a voxel outside: 0.5·value(last) + 0.5·0 (zero padding).
    last = [slice(None)] * 5
    last[2 + axis] = slice(size[axis] - 1, size[axis])
    torch.testing.assert_close(out[tuple(last)], 0.5 * image[tuple(last)], rtol=0, atol=atol)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_half_voxel_shift_along_one_axis(sampler: str, axis: int) -> None:
    size = (4, 5, 6)
    image = _coded_image(size)
    _check_half_voxel_shift(image, warp(image, _shift(size, axis, 0.5), sampler), axis, 1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_ramp_golden_values(sampler: str) -> None:
    # 1D ramp along axis 0: I[d] = d for D = 4; shift +0.5 → [0.5, 1.5, 2.5, 0.5·3 = 1.5].
    image = identity_grid((4, 2, 2))[:, :1].clone()
    out = warp(image, _shift((4, 2, 2), 0, 0.5), sampler)
    expected = torch.tensor([0.5, 1.5, 2.5, 1.5]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nearest_one_voxel_shift(sampler: str, axis: int) -> None:
    size = (4, 5, 6)
    image = _coded_image(size)
    # +1.2 voxels rounds to +1: exactly image + WEIGHTS[axis] inside, 0 on the last slice.
    out = warp(image, _shift(size, axis, 1.2), sampler, mode="nearest")
    expected = torch.zeros_like(image)
    src = [slice(None)] * 5
    dst = [slice(None)] * 5
    src[2 + axis] = slice(1, None)
    dst[2 + axis] = slice(0, size[axis] - 1)
    expected[tuple(dst)] = image[tuple(src)]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _random_case(seed: int, shape: tuple[int, ...], amplitude: float, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, d, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, c, d, h, w, generator=gen)
    disp = (torch.rand(n, 3, d, h, w, generator=gen) * 2 - 1) * amplitude
    if mode == "nearest":
        # Put every sample position at a quarter-voxel offset (.125, .375, ...) so no rounding tie (.5) occurs.
        disp = torch.floor(disp * 4) / 4 + 0.125
    return image, disp


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 2),
    c=st.integers(1, 4),
    d=st.integers(2, 12),
    h=st.integers(2, 12),
    w=st.integers(2, 12),
    amplitude=st.floats(0.0, 8.0),
    mode=st.sampled_from(["bilinear", "nearest"]),
)
def test_sampler_parity_property(
    seed: int, n: int, c: int, d: int, h: int, w: int, amplitude: float, mode: str
) -> None:
    image, disp = _random_case(seed, (n, c, d, h, w), amplitude, mode)
    torch.testing.assert_close(sample_gather(image, disp, mode), sample_torch(image, disp, mode), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_sampler_parity_32_cube_with_outside_and_borders(mode: str) -> None:
    image, disp = _random_case(7, (1, 2, 32, 32, 32), 6.0, mode)
    # Slices 5, 6, 7 move along axis 0 only: onto index 0, index 31 (both borders exactly) and 31.25
    # (a quarter voxel outside: trilinear weight 0.75 on slice 31, nearest rounds to 31).
    disp[:, :, 5:8] = 0.0
    disp[:, 0, 5], disp[:, 0, 6], disp[:, 0, 7] = -5.0, 25.0, 24.25
    expected = sample_torch(image, disp, mode)
    torch.testing.assert_close(sample_gather(image, disp, mode), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(expected[:, :, 5], image[:, :, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(expected[:, :, 6], image[:, :, 31], rtol=0, atol=1e-5)
    weight = 0.75 if mode == "bilinear" else 1.0
    torch.testing.assert_close(expected[:, :, 7], weight * image[:, :, 31], rtol=0, atol=1e-5)
    assert (disp.abs() > 5).any()  # some samples fall fully outside the volume (zeros there)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rows_sampler_half_voxel_shift_golden(axis: int) -> None:
    size = (4, 5, 6)
    image = _coded_image(size).expand(1, 3, *size).contiguous(memory_format=torch.channels_last_3d)
    out = sample_rows(image, _shift(size, axis, 0.5))
    _check_half_voxel_shift(image, out, axis, 1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # Integer fields reproduce the image exactly (voxel coordinates, no [-1, 1] round trip).
    assert torch.equal(sample_rows(image, torch.zeros(1, 3, *size)), image)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), c=st.integers(1, 9), d=st.integers(2, 12), h=st.integers(2, 12),
       w=st.integers(2, 12), amplitude=st.floats(0.0, 8.0), slab=st.sampled_from([1, 2**10, 2**24]),
       channels_last=st.booleans())
def test_rows_sampler_matches_grid_sample(seed: int, c: int, d: int, h: int, w: int, amplitude: float, slab: int,
                                          channels_last: bool) -> None:
    import eoir_cli.spatial as spatial

    image, disp = _random_case(seed, (1, c, d, h, w), amplitude, "bilinear")
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    saved = spatial._ROWS_SLAB_BYTES
    spatial._ROWS_SLAB_BYTES = slab  # one plane per call, a few planes, all at once
    try:
        got = sample_rows(image, disp)
    finally:
        spatial._ROWS_SLAB_BYTES = saved
    torch.testing.assert_close(got, sample_torch(image, disp), rtol=0, atol=1e-5)


def test_rows_sampler_bfloat16_and_bad_calls() -> None:
    image, disp = _random_case(11, (1, 16, 12, 10, 9), 4.0, "bilinear")
    out = sample_rows(image.to(torch.bfloat16), disp)
    assert out.dtype == torch.bfloat16
    # bf16 storage of image and result: within a few bf16 roundings of values in [0, 1].
    torch.testing.assert_close(out.float(), sample_torch(image, disp), rtol=0, atol=2**-6)
    with pytest.raises(ValueError, match="sample_rows"):
        sample_rows(image, disp, "nearest")
    with pytest.raises(ValueError, match="sample_rows"):
        sample_rows(image, disp[:, :, :6])


def test_gather_gradcheck_image_and_disp() -> None:
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 2, 4, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    # Fractional parts in [0.3, 0.7]: away from the integer kinks of trilinear interpolation.
    base = torch.randint(-1, 2, (1, 3, 4, 4, 4), generator=gen).double()
    disp = (base + 0.3 + 0.4 * torch.rand(1, 3, 4, 4, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, u: sample_gather(i, u, "bilinear"), (image, disp), eps=1e-6, atol=1e-5)


def test_gather_gradient_matches_torch() -> None:
    image, disp = _random_case(11, (1, 2, 6, 7, 8), 2.0, "bilinear")
    grads = []
    for fn in (sample_torch, sample_gather):
        i, u = image.clone().requires_grad_(True), disp.clone().requires_grad_(True)
        fn(i, u, "bilinear").square().sum().backward()
        grads.append((i.grad, u.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=0, atol=1e-3)


def _smooth_velocity(size: tuple[int, int, int], amplitude: float) -> torch.Tensor:
    grid = identity_grid(size)[0]
    phases = [grid[i] / (size[i] - 1) * torch.pi for i in range(3)]
    v = torch.stack([
        torch.sin(phases[1]) * torch.sin(phases[2]),
        torch.sin(phases[0]) * torch.cos(phases[2]),
        torch.cos(phases[0]) * torch.sin(phases[1]),
    ])
    return amplitude * v[None]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_integrate_inverse_composes_to_identity(sampler: str) -> None:
    v = _smooth_velocity((16, 16, 16), 1.5)
    forward, backward = integrate(v, 7, sampler), integrate(-v, 7, sampler)
    assert forward.abs().max() > 1.0  # the test is not trivially satisfied by a tiny field
    residual = compose(backward, forward, sampler)
    interior = residual[:, :, 3:-3, 3:-3, 3:-3]
    assert interior.abs().max() < 0.05


def test_integrate_zero_steps_is_identity_and_rejects_negative() -> None:
    v = _smooth_velocity((8, 8, 8), 1.0)
    assert torch.equal(integrate(v, 0), v)
    with pytest.raises(ValueError, match="steps: expected >= 0, got -1"):
        integrate(v, -1)


def test_resize_disp_rescales_each_component() -> None:
    disp = torch.ones(1, 3, 5, 4, 3)
    out = resize_disp(disp, (9, 10, 5))
    # Ratios (m-1)/(n-1): (9-1)/(5-1) = 2, (10-1)/(4-1) = 3, (5-1)/(3-1) = 2, per component.
    for c, ratio in enumerate((2.0, 3.0, 2.0)):
        torch.testing.assert_close(out[:, c], torch.full((1, 9, 10, 5), ratio), rtol=0, atol=1e-6)


def test_jacobian_determinant_goldens() -> None:
    size = (6, 6, 6)
    identity = torch.zeros(1, 3, *size)
    torch.testing.assert_close(jacobian_determinant(identity), torch.ones(1, *size))
    scale = torch.zeros(1, 3, *size)
    scale[:, 0] = identity_grid(size)[0, 0]  # x0 -> 2·x0: d(disp_0)/d(x0) = 1, |J| = 2
    torch.testing.assert_close(jacobian_determinant(scale), torch.full((1, *size), 2.0))
    fold = torch.zeros(1, 3, *size)
    fold[:, 1] = -2 * identity_grid(size)[0, 1]  # x1 -> -x1: |J| = -1 everywhere
    det = jacobian_determinant(fold)
    torch.testing.assert_close(det, torch.full((1, *size), -1.0))


def test_warp_rejects_bad_shapes_and_options() -> None:
    image = torch.zeros(1, 1, 4, 4, 4)
    disp = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"image: expected \(N, C, D, H, W\), got shape \(1, 4, 4, 4\)"):
        warp(image[0], disp)
    with pytest.raises(ValueError, match=r"disp: expected \(N, 3, D, H, W\), got shape \(1, 2, 4, 4, 4\)"):
        warp(image, disp[:, :2])
    with pytest.raises(ValueError, match="batch mismatch"):
        warp(image.expand(2, 1, 4, 4, 4), disp)
    with pytest.raises(ValueError, match="mode: expected 'bilinear' or 'nearest', got 'cubic'"):
        warp(image, disp, mode="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampler: expected one of"):
        warp(image, disp, sampler="fancy")  # type: ignore[arg-type]


def test_warp_accepts_callable_sampler() -> None:
    image = _coded_image((4, 4, 4))
    calls = []

    def sampler(img: torch.Tensor, disp: torch.Tensor, mode: str) -> torch.Tensor:
        calls.append(mode)
        return sample_gather(img, disp, mode)

    out = warp(image, _shift((4, 4, 4), 2, 1.0), sampler, mode="nearest")
    assert calls == ["nearest"]
    torch.testing.assert_close(out[..., :3], image[..., 1:])


@pytest.mark.parametrize(("out_size", "in_size"),
                         [((5, 7, 6), (9, 8, 7)), ((4, 4, 4), (4, 4, 4)), ((3, 1, 2), (1, 5, 2))])
def test_cached_identity_grid_is_the_normalised_index_grid_bit_for_bit(out_size, in_size) -> None:
    from eoir_cli.coords import identity_grid, index_to_normalized
    from eoir_cli.spatial import _normalized_identity

    expected = index_to_normalized(identity_grid(out_size, dtype=torch.float64), in_size).float()
    got = _normalized_identity(out_size, in_size, "cpu")
    assert got.shape == (1, *out_size, 3) and torch.equal(got, expected)


@pytest.mark.parametrize(("shape", "size", "scale"), [((1, 3, 5, 7, 6), (17, 22, 20), None),
                                                    ((2, 1, 4, 3, 5), None, (2.0, 2.0, 2.0)),
                                                    ((1, 2, 1, 4, 3), (3, 9, 5), None)])
def test_enlarging_resize_is_pytorchs_trilinear_interpolation(shape, size, scale) -> None:
    """The one-axis-at-a-time path (inference, enlarging) gives F.interpolate's values to float32 rounding,
    and a volume that records gradients keeps PyTorch's kernel."""
    import torch.nn.functional as F

    from eoir_cli.spatial import resize

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    expected = F.interpolate(x, size=size, scale_factor=scale, mode="trilinear", align_corners=True)
    got = resize(x, size=size, scale=scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    traced = resize(x.clone().requires_grad_(True), size=size, scale=scale)
    assert traced.requires_grad
    torch.testing.assert_close(traced.detach(), expected, rtol=0, atol=0)
