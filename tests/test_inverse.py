"""Inverting displacement fields: goldens with known inverses, strongly compressive fields, velocities."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.config import ModelConfig
from eoir_cli.inverse import (
    fit_inverse,
    inverse_residual,
    invert_disp,
    invert_pyramid,
    invert_velocity,
    sample_border,
)
from eoir_cli.model import EOIR
from eoir_cli.spatial import identity_grid, integrate, jacobian_determinant, resize, spatial_gradient


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_constant_shift_inverts_to_the_opposite_shift_along_the_same_axis(axis: int) -> None:
    size = (12, 14, 16)
    disp = torch.zeros(1, 3, *size)
    disp[:, axis] = 1.5
    inv = invert_disp(disp).inverse
    expected = torch.zeros_like(disp)
    expected[:, axis] = -1.5  # border-extended field: x + 1.5 everywhere, so y - 1.5 everywhere
    torch.testing.assert_close(inv, expected, rtol=0, atol=1e-4)


def test_smooth_shear_has_its_exact_analytic_inverse() -> None:
    # disp_0(x) = 3·sin(2π x_2 / 24) depends on x_2 only, so the inverse is exactly -disp.
    size = (20, 18, 24)
    grid = identity_grid(size)
    disp = torch.zeros(1, 3, *size)
    disp[:, 0] = 3.0 * torch.sin(2 * math.pi * grid[:, 2] / 24)
    inv = invert_disp(disp).inverse
    torch.testing.assert_close(inv, -disp, rtol=0, atol=2e-3)


def _compressive_field(size: tuple[int, int, int]) -> torch.Tensor:
    """A smooth diffeomorphism with local compression ``|∇disp| > 1`` (where plain fixed points diverge)."""
    torch.manual_seed(2)  # seed and amplitude chosen so that |∇disp| reaches 2.3 with det(J) > 0
    velocity = resize(torch.randn(1, 3, 4, 4, 4), size=size) * 3.0
    return integrate(velocity, 7)


def test_newton_inverts_a_strongly_compressive_field() -> None:
    size = (32, 32, 32)
    disp = _compressive_field(size)
    grads = spatial_gradient(disp)
    steepest = max(float(g.abs().max()) for g in grads)
    assert steepest > 1.0, "the test field must reach |∇disp| > 1 to exercise Newton"
    assert float(jacobian_determinant(disp).min()) > 0
    result = invert_disp(disp, fine_iterations=4)
    residual = inverse_residual(disp, result.inverse)[0, 2:-2, 2:-2, 2:-2]
    assert float(residual.mean()) < 2e-3
    assert float(torch.quantile(residual.flatten(), 0.95)) < 1e-2
    # ... and it is the inverse both ways (g(f(x)) = x), up to interpolating g between its grid
    # points, which is coarse where f compresses (g stretches there).
    loc = identity_grid(size) + disp
    back = (disp + sample_border(result.inverse, loc)).norm(dim=1)[0, 4:-4, 4:-4, 4:-4]
    assert float(back.mean()) < 0.05 < float(disp.norm(dim=1).mean())


def test_negated_velocity_inverts_its_exponential() -> None:
    size = (24, 24, 24)
    torch.manual_seed(1)
    velocity = resize(torch.randn(1, 3, 4, 4, 4), size=size) * 2.0
    disp = integrate(velocity, 7)
    residual = inverse_residual(disp, invert_velocity(velocity, 7))[0, 2:-2, 2:-2, 2:-2]
    assert float(residual.mean()) < 0.05
    # Far better than leaving the field uninverted (residual |disp + disp(x - disp)| ~ |disp|).
    assert float(residual.mean()) < 0.2 * float(disp.norm(dim=1).mean())


def test_pyramid_inverse_of_a_network_output() -> None:
    torch.manual_seed(0)
    model = EOIR(ModelConfig(channels=4, levels=3, int_steps=7)).eval()
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        # Scale the estimators so the random network produces a visible field (max ~1.4 voxels, det(J) > 0.4).
        for est in model.estimators:
            est.to_velocity.weight.mul_(3.0)
        pyramid = model.forward_pyramid(moving, fixed)
        disp = model(moving, fixed)
        inverse = invert_pyramid(model, pyramid.velocities, (16, 16, 16))
    assert float(disp.abs().max()) > 1.0
    residual = inverse_residual(disp, inverse)[0, 2:-2, 2:-2, 2:-2]
    uninverted = inverse_residual(disp, torch.zeros_like(disp))[0, 2:-2, 2:-2, 2:-2]
    # Not exact on a grid (squaring and upsampling between levels): ~0.08 voxels against ~0.8.
    assert float(residual.mean()) < 0.15 * float(uninverted.mean())


def test_spatial_gradient_matches_torch_gradient_and_keeps_autograd() -> None:
    field = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    for ours, ref in zip(spatial_gradient(field), torch.gradient(field, dim=(2, 3, 4)), strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    small = torch.randn(1, 3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: sum(g.pow(2).sum() for g in spatial_gradient(f)), (small,))


def test_invert_disp_rejects_a_field_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"expected \(N, 3, D, H, W\), got shape \(1, 2, 4, 4, 4\)"):
        invert_disp(torch.zeros(1, 2, 4, 4, 4))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), amplitude=st.floats(0.2, 1.5))
def test_inverse_of_any_smooth_diffeomorphism_is_its_inverse(seed: int, amplitude: float) -> None:
    torch.manual_seed(seed)
    disp = integrate(resize(torch.randn(1, 3, 3, 3, 3), size=(20, 20, 20)) * amplitude, 7)
    if float(jacobian_determinant(disp).min()) <= 0.05:  # folds have no inverse
        return
    residual = inverse_residual(disp, invert_disp(disp, fine_iterations=3).inverse)[0, 2:-2, 2:-2, 2:-2]
    # Isolated voxels can stay unconverged (seed 610, amplitude 1.5: 13 of 4096 above 0.02 voxels,
    # Newton stuck on a trilinear cell boundary), so the bound is on the mean and the 99th percentile.
    assert float(residual.mean()) < 0.005
    assert float(torch.quantile(residual.flatten(), 0.99)) < 0.02


def _round_trips(disp: torch.Tensor, inverse: torch.Tensor, seed: int = 0, n: int = 20000) -> tuple[float, float]:
    """Mean ``|g(f(x)) - x|`` and ``|f(g(y)) - y|`` at random points between voxels (both fields trilinear)."""
    gen = torch.Generator().manual_seed(seed)
    size = torch.tensor(disp.shape[2:], dtype=torch.float32).view(1, 3, 1, 1, 1)
    pts = 4 + torch.rand(1, 3, n, 1, 1, generator=gen) * (size - 9)  # away from the border extension
    there = pts + sample_border(disp, pts)
    forth_back = (there + sample_border(inverse, there) - pts).norm(dim=1).mean()
    back = pts + sample_border(inverse, pts)
    back_forth = (back + sample_border(disp, back) - pts).norm(dim=1).mean()
    return float(forth_back), float(back_forth)


def _samples(disp: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels ``x`` of ``disp``'s grid (those in ``keep``) as samples of the inverse: at ``x + disp(x)``,
    value ``-disp(x)``, each ``(1, 3, P, 1, 1)``."""
    at, value = identity_grid(disp.shape[2:]) + disp, -disp
    chosen = torch.ones(disp.shape[2:], dtype=torch.bool) if keep is None else keep
    return tuple(t[0][:, chosen].reshape(1, 3, -1, 1, 1) for t in (at, value))  # type: ignore[return-value]


def test_fit_makes_the_inverse_right_between_voxels_both_ways() -> None:
    size = (32, 32, 32)
    disp = _compressive_field(size)
    newton = invert_disp(disp, fine_iterations=4).inverse
    fitted = fit_inverse(newton, *_samples(disp), iterations=2)
    before, after = _round_trips(disp, newton), _round_trips(disp, fitted)
    # Newton is exact at its grid points only; the fit is better at random points in both directions.
    assert after[0] < 0.8 * before[0]
    assert after[1] < 0.8 * before[1]
    assert fitted.shape == newton.shape


def test_fit_keeps_an_inverse_that_trilinear_interpolation_already_represents() -> None:
    # An affine map's inverse is affine: Newton's field is exact everywhere, nothing to fit.
    size = (20, 22, 24)
    grid = identity_grid(size)
    disp = torch.stack([0.1 * grid[:, 0] + 0.05 * grid[:, 1] - 1.0, -0.08 * grid[:, 1] + 0.5,
                        0.06 * grid[:, 2] - 0.04 * grid[:, 0]], 1)
    newton = invert_disp(disp, fine_iterations=4).inverse
    fitted = fit_inverse(newton, *_samples(disp), iterations=3)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    torch.testing.assert_close(fitted[inner], newton[inner], rtol=0, atol=2e-3)


def test_fit_leaves_nodes_no_sample_reaches() -> None:
    size = (24, 24, 24)
    disp = _compressive_field(size) * 0.3
    newton = invert_disp(disp).inverse
    keep = torch.zeros(size, dtype=torch.bool)
    keep[..., :8] = True  # samples only from the first third along the last axis
    fitted = fit_inverse(newton, *_samples(disp, keep))
    reach = int((identity_grid(size) + disp)[0, 2][keep].max().ceil()) + 1
    torch.testing.assert_close(fitted[..., reach:], newton[..., reach:], rtol=0, atol=0)
    assert not torch.equal(fitted[..., :reach], newton[..., :reach])
    assert fit_inverse(newton, *_samples(disp), iterations=0) is newton


def test_fit_rejects_mismatched_samples() -> None:
    inverse = torch.zeros(1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="fit_inverse"):
        fit_inverse(inverse, torch.zeros(1, 3, 5, 1, 1), torch.zeros(1, 3, 4, 1, 1))
    with pytest.raises(ValueError, match="fit_inverse"):
        fit_inverse(torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 3, 4, 1, 1), torch.zeros(1, 3, 4, 1, 1))


def test_jacobian_step_is_the_per_voxel_matrix_product() -> None:
    """(I + J) f from the 9 row-major channels or from the columns spatial_gradient gives, = the 3x3 product."""
    from eoir_cli.coords import spatial_gradient
    from eoir_cli.inverse import _jacobian_step, inverse_gradient

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64)
    f = torch.randn(2, 3, 5, 6, 4, generator=gen, dtype=torch.float64)
    jac = inverse_gradient(w)
    matrices = jac.permute(0, 2, 3, 4, 1).reshape(-1, 3, 3)
    vectors = f.permute(0, 2, 3, 4, 1).reshape(-1, 3, 1)
    expected = (vectors + matrices @ vectors).reshape(2, 5, 6, 4, 3).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(_jacobian_step(jac, f), expected)
    torch.testing.assert_close(_jacobian_step(spatial_gradient(w), f), expected)
