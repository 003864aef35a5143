"""Inverting displacement fields: Newton's method for any field, and the inverse of velocity fields.

Convention (that of :mod:`eoir_cli.spatial`): a displacement ``disp`` is ``(N, 3, D, H, W)`` in
**voxels** of its own grid and stands for the pull-back map ``f(x) = x + disp(x)``. Its inverse is
returned in the same convention: ``g(y) = y + inverse(y)`` with ``f(g(y)) = y``. Between grid
points a field is trilinear; beyond the grid it takes the value at the nearest border (the way
``eoir register`` extends the network's field), so ``f`` is defined everywhere.

Two ways to invert; ``eoir register`` uses the first, chosen by measurement (README, "The inverse
transform"):

* :func:`invert_disp`, for any field: Newton's method on ``w + disp(y + w) = 0``, coarse to fine
  (most iterations on grids 4x and 2x coarser, 1-2 cheap steps at full size), then
  :func:`invert_at` at the exact points where the inverse is needed. The plain fixed point
  ``w <- -disp(y + w)`` diverges where ``|∇disp| > 1``, which the default pipeline's brain fields
  reach (strong local compression, det(J) down to 0.05); Newton does not.
* :func:`invert_velocity` / :func:`invert_pyramid`, for stationary velocity fields: ``exp(v)⁻¹ =
  exp(-v)``, and a pyramid ``φ = up(φ_coarse) ∘ exp(v)`` inverts as ``exp(-v) ∘ up(φ_coarse⁻¹)``.
  Exact in the continuum; on the grid limited by scaling and squaring and by upsampling a field
  (which does not commute with inversion): on the sample brains ~40x less accurate than Newton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from eoir_cli.coords import grid_sample, identity_grid, index_to_normalized, spatial_gradient
from eoir_cli.spatial import compose, integrate, resize_disp

log = logging.getLogger(__name__)


def sample_border(field: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of ``field`` ``(N, C, D, H, W)`` at voxel positions ``loc`` ``(N, 3, ...)``.

    Positions are indices of ``field``'s grid (align_corners=True geometry); beyond the grid the
    nearest border value is used.
    """
    grid = index_to_normalized(loc, field.shape[2:]).to(field.dtype)
    return grid_sample(field, grid, "bilinear", "border")


def inverse_residual(disp: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``|f(g(y)) - y|`` in voxels at every grid point ``y``: ``(N, D, H, W)``."""
    loc = identity_grid(inverse.shape[2:], inverse.device, inverse.dtype) + inverse
    return (inverse + sample_border(disp, loc)).norm(dim=1)


@dataclass
class Inversion:
    """Result of :func:`invert_disp`.

    Attributes:
        inverse: ``(N, 3, D, H, W)`` voxels, the inverse displacement.
        iterations: fixed-point iterations per resolution, coarse to fine.
        max_residual: largest component of ``f(g(y)) - y`` (voxels) over the grid, measured before
            the last step.
    """

    inverse: torch.Tensor
    iterations: list[int]
    max_residual: float


def _solve3(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``a x = b`` per voxel by Cramer's rule: ``a`` ``(N, 9, ...)`` row-major, ``b`` ``(N, 3, ...)``.

    Returns ``(x, det)``. Cramer's rule on channels is ~10x faster than ``torch.linalg.solve`` on
    millions of batched 3x3 systems and exact enough for a Newton step.
    """
    a00, a01, a02, a10, a11, a12, a20, a21, a22 = a.unbind(1)
    c00 = a11 * a22 - a12 * a21
    c01 = a12 * a20 - a10 * a22
    c02 = a10 * a21 - a11 * a20
    det = a00 * c00 + a01 * c01 + a02 * c02
    b0, b1, b2 = b.unbind(1)
    safe = torch.where(det.abs() > 1e-6, det, torch.ones_like(det))
    x0 = (b0 * c00 + b1 * (a02 * a21 - a01 * a22) + b2 * (a01 * a12 - a02 * a11)) / safe
    x1 = (b0 * c01 + b1 * (a00 * a22 - a02 * a20) + b2 * (a02 * a10 - a00 * a12)) / safe
    x2 = (b0 * c02 + b1 * (a01 * a20 - a00 * a21) + b2 * (a00 * a11 - a01 * a10)) / safe
    return torch.stack([x0, x1, x2], 1), det


def _newton(disp: torch.Tensor, start: torch.Tensor, iterations: int, tolerance: float,
            max_step: float = 2.0) -> tuple[torch.Tensor, int, float]:
    """Newton on ``F(w) = w + disp(y + w) = 0`` per grid point ``y``; returns (w, iterations, max |F|).

    The plain fixed point ``w <- -disp(y + w)`` diverges where ``|∇disp| > 1``, which the
    default pipeline's brain fields reach in ~1 % of the brain (strong local compression);
    Newton's step ``(I + ∇disp)⁻¹ F`` converges wherever the map does not fold. Steps are
    clipped to ``max_step`` voxels and fall back to the fixed-point step where the Jacobian is
    near singular.
    """
    n = disp.shape[0]
    grads = spatial_gradient(disp)  # grads[j][:, i] = d disp_i / d x_j
    jac = torch.stack([grads[j][:, i] for i in range(3) for j in range(3)], 1)  # row-major (i, j)
    both = torch.cat([disp, jac], 1)
    del grads, jac
    eye = torch.eye(3, dtype=disp.dtype, device=disp.device).reshape(1, 9, *([1] * (disp.dim() - 2)))
    ident = identity_grid(disp.shape[2:], disp.device, disp.dtype)
    inverse = start
    residual = float("inf")
    for k in range(1, iterations + 1):
        sampled = sample_border(both, ident.expand(n, -1, -1, -1, -1) + inverse)
        f = inverse + sampled[:, :3]
        residual = float(f.abs().max())
        if residual <= tolerance:
            return inverse, k - 1, residual
        step, det = _solve3(sampled[:, 3:] + eye, f)
        step = torch.where((det > 0.05).unsqueeze(1), step, f).clamp(-max_step, max_step)
        inverse = inverse - step
    return inverse, iterations, residual


def _jacobian_step(jac: torch.Tensor | list[torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    """``(I + J) f`` per voxel for a row-major ``J`` ``(N, 9, ...)`` (or its columns, ``J[:, j::3]``
    for ``j = 0, 1, 2``, e.g. :func:`~eoir_cli.coords.spatial_gradient`) and ``f`` ``(N, 3, ...)``.

    Three multiply-adds over 3-channel maps: a per-voxel 3×3 product as a batched matrix product
    (einsum) took 81 ms at 160×224×192, this ~25 ms.
    """
    columns = jac if isinstance(jac, list) else [jac[:, j::3] for j in range(3)]
    out = f.clone()
    for j, column in enumerate(columns):
        out.addcmul_(column, f[:, j:j + 1])
    return out


def _polish(disp: torch.Tensor, inverse: torch.Tensor, iterations: int, tolerance: float) -> tuple[
        torch.Tensor, int, float]:
    """Newton steps that take the Jacobian from the current inverse: ``w <- w - (I + ∇w) F``.

    ``(I + ∇disp(g(y)))⁻¹ = I + ∇w(y)`` for the exact inverse, so near the solution this is
    Newton's step at the cost of one 3-channel sample and a finite difference of ``w`` (no
    9-channel sample, no 3x3 solve): a third of :func:`_newton`'s time on a full-size grid.
    """
    ident = identity_grid(disp.shape[2:], disp.device, disp.dtype)
    residual = float("inf")
    for k in range(1, iterations + 1):
        f = inverse + sample_border(disp, ident + inverse)
        residual = float(f.abs().max())
        if residual <= tolerance:
            return inverse, k - 1, residual
        inverse = inverse - _jacobian_step(spatial_gradient(inverse), f)  # columns of ∇w: no 9-channel stack
    return inverse, iterations, residual


def invert_disp(
    disp: torch.Tensor,
    iterations: int = 10,
    tolerance: float = 0.01,
    levels: int | None = None,
    polish_iterations: int = 3,
    fine_iterations: int = 1,
) -> Inversion:
    """Invert a displacement by Newton's method, coarse to fine.

    The coarsest level runs full Newton steps ``w <- w - (I + ∇disp(y + w))⁻¹ (w + disp(y + w))``
    (a 9-channel sample and a 3x3 solve per voxel, cheap on a grid 64x smaller); each finer level
    starts from the upsampled result and runs :func:`_polish` steps, which take the Jacobian from
    ``w`` itself for a third of the cost. A level stops when no component of ``f(g(y)) - y``
    exceeds ``tolerance`` voxels (of that level) or at its cap.

    Measured on the sample brains' default-pipeline fields (README, "The inverse transform"):
    10 Newton steps at 1/4, 3 at 1/2 and 1 at full size leave ``|f(g(y)) - y|`` at ~0.01 voxels
    on average in the brain, the same as 10 Newton steps at every level for a third of the time.

    Args:
        disp: ``(N, 3, D, H, W)`` voxels, a pull-back map that is invertible (no folding).
        iterations: cap of Newton steps at the coarsest level.
        tolerance: stop a level when ``max |f(g(y)) - y|`` (per component) is below this.
        levels: coarse levels below full resolution (each halves every axis); default: as many
            as keep the coarsest at 16 voxels per axis or more, at most 2.
        polish_iterations: cap at the intermediate levels.
        fine_iterations: cap at full resolution (the costly level).

    Returns:
        An :class:`Inversion`; ``max_residual`` is measured before the last step (an upper bound).
    """
    if disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"disp: expected (N, 3, D, H, W), got shape {tuple(disp.shape)}")
    size = tuple(disp.shape[2:])
    if levels is None:
        levels = 0
        while levels < 2 and min(size) // 2 ** (levels + 1) >= 16:
            levels += 1
    sizes = [tuple(max(2, round(s / 2**k)) for s in size) for k in range(levels, -1, -1)]
    inverse = None
    counts = []
    residual = float("inf")
    with torch.no_grad():
        for k, level_size in enumerate(sizes):
            field = disp if level_size == size else resize_disp(disp, level_size)
            if inverse is None:
                inverse, n, residual = _newton(field, -field, iterations, tolerance)
            else:
                cap = fine_iterations if k == len(sizes) - 1 else polish_iterations
                inverse, n, residual = _polish(field, resize_disp(inverse, level_size), cap, tolerance)
            counts.append(n)
    log.debug("invert_disp: iterations %s, max residual %.4g voxels", counts, residual)
    assert inverse is not None
    return Inversion(inverse, counts, residual)


def inverse_gradient(inverse: torch.Tensor) -> torch.Tensor:
    """``∇w`` as 9 channels ``(N, 9, D, H, W)``, row-major: channel ``3 i + j`` is ``∂w_i/∂y_j``."""
    grads = spatial_gradient(inverse)  # grads[j][:, i] = d w_i / d y_j
    return torch.stack([grads[j][:, i] for i in range(3) for j in range(3)], 1)


def invert_at(disp: torch.Tensor, inverse: torch.Tensor, gradient: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The inverse at arbitrary points ``y``: ``w(y)`` interpolated, then one Newton step there.

    Interpolating ``w`` between grid points costs accuracy where ``disp`` compresses (``w``
    stretches): on the sample brains ~0.06 voxels mean at off-grid points against 0.006 at grid
    points. One step ``w <- w - (I + ∇w) (w + disp(y + w))`` at the points themselves brings it
    back to ~0.008; ``∇w`` is taken at the nearest grid point (as good as trilinear here, and a
    nearest sample of 9 channels costs less than a trilinear one).

    Args:
        disp: ``(1, 3, D, H, W)`` the forward displacement (voxels).
        inverse: ``(1, 3, D, H, W)`` its inverse on the same grid (:func:`invert_disp`).
        gradient: ``(1, 9, D, H, W)`` :func:`inverse_gradient` of ``inverse``.
        points: ``(1, 3, ...)`` voxel positions of the grid.

    Returns:
        ``(1, 3, ...)`` the inverse displacement at ``points`` (voxels).
    """
    w = sample_border(inverse, points)
    f = w + sample_border(disp, points + w)
    grid = index_to_normalized(points, gradient.shape[2:]).to(gradient.dtype)
    jac = grid_sample(gradient, grid, "nearest", "border")
    return w - _jacobian_step(jac, f)


def fit_inverse(inverse: torch.Tensor, at: torch.Tensor, value: torch.Tensor, iterations: int = 1,
                prior: float = 1.0) -> torch.Tensor:
    """The inverse as the trilinear field that best undoes the forward map between its nodes, not only at them.

    Newton (:func:`invert_disp`, :func:`invert_at`) makes ``inverse`` exact at its own grid points;
    between them a user's trilinear interpolation of it errs where the forward map compresses
    (the inverse stretches and bends there). Every voxel ``x`` of the forward grid is a sample of
    the inverse: it must send ``j = x + forward(x)`` back to ``x``, i.e. ``inverse(j) = -forward(x)``.
    This fits the node values to such samples by least squares, a penalty ``prior`` (in samples)
    holding each node to its Newton value where samples are few, with damped Jacobi steps
    ``w <- w - (Sᵀ r + prior (w - w₀)) / (Sᵀ 1 + prior)`` (``S``: trilinear sampling at the ``j``,
    ``Sᵀ`` its splat; the lumped diagonal makes every step a contraction).

    Measured on the sample brains (README, "The inverse transform"): the round trip at random
    points of both spaces (not the samples, not grid points) drops by ~40 % in both directions; the
    error at the inverse's own grid points rises from ~0.004 to ~0.03 mm, the price of being right
    between them.

    Args:
        inverse: ``(1, 3, D', H', W')`` voxels on the target grid: ``j -> j + inverse(j)`` indexes the
            forward grid (Newton's answer: the start and the prior).
        at: ``(1, 3, ...)`` the samples' positions ``j`` (target-grid indices, any layout).
        value: ``(1, 3, ...)`` what ``inverse`` should be there, ``x - j`` (forward-grid index minus ``j``).
        iterations: Jacobi steps (1 reaches ~95 % of the converged gain on the sample brains).
        prior: weight of the Newton values, in samples per node.

    Returns:
        ``(1, 3, D', H', W')`` the fitted inverse (voxels). Nodes no sample reaches keep their value.
    """
    if inverse.dim() != 5 or inverse.shape[:2] != (1, 3) or at.shape != value.shape or at.shape[:2] != (1, 3):
        raise ValueError(f"fit_inverse: expected an inverse (1, 3, D, H, W) and samples (1, 3, ...) of one shape, "
                         f"got {tuple(inverse.shape)}, {tuple(at.shape)} and {tuple(value.shape)}")
    if iterations <= 0 or at.numel() == 0:
        return inverse
    size = inverse.shape[2:]
    with torch.no_grad():
        hi = torch.tensor([s - 1 for s in size], dtype=at.dtype, device=at.device).view(1, 3, *([1] * (at.dim() - 2)))
        inside = ((at >= 0) & (at <= hi)).all(1, keepdim=True).to(inverse.dtype)
        grid = index_to_normalized(at, size).to(inverse.dtype)
    start = inverse.detach()

    def sample(nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``S nodes`` at the samples, with the graph whose backward is the splat ``Sᵀ``."""
        nodes = nodes.detach().requires_grad_(True)
        with torch.enable_grad():
            return nodes, grid_sample(nodes, grid, "bilinear", "zeros")

    # The first step also splats the samples' count (Sᵀ 1) as a fourth channel: one pass, not two.
    nodes, sampled = sample(torch.cat([start, torch.zeros_like(start[:, :1])], 1))
    residual = (sampled[:, :3].detach() - value) * inside
    (both,) = torch.autograd.grad(sampled, nodes, torch.cat([residual, inside], 1))
    weight = both[:, 3:] + prior
    fitted = start - both[:, :3] / weight
    del both, residual, sampled, nodes
    for _ in range(iterations - 1):
        nodes, sampled = sample(fitted)
        residual = (sampled.detach() - value) * inside
        (step,) = torch.autograd.grad(sampled, nodes, residual)
        with torch.no_grad():
            fitted = fitted - (step + prior * (fitted - start)) / weight
    return fitted


def invert_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """``exp(v)⁻¹ = exp(-v)`` as a displacement in voxels (scaling and squaring, ``steps`` squarings)."""
    return integrate(-velocity, steps)


def invert_pyramid(model: Any, velocities: list[torch.Tensor], size: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of an :class:`~eoir_cli.model.EOIR` network's output from its per-level velocities.

    The network builds ``φ_l = up(φ_{l+1}) ∘ exp(v_l)`` from the coarsest level down (see
    ``EOIR.forward_pyramid``); this builds ``φ_l⁻¹ = exp(-v_l) ∘ up(φ_{l+1}⁻¹)`` in the same order
    and applies the same final upsampling, so the result is on the network's input grid.

    Args:
        model: the ``EOIR`` module that produced ``velocities`` (its config and upsampling).
        velocities: ``PyramidOutput.velocities`` (index 0 = finest), voxels of each level.
        size: the input images' size when the model resamples them (``input_scale`` < 1).

    Returns:
        ``(N, 3, D, H, W)`` voxels, the inverse of ``model(moving, fixed)``.
    """
    steps = model.config.int_steps
    inverse = None
    for level in reversed(range(len(velocities))):
        step = invert_velocity(velocities[level], steps)
        inverse = step if inverse is None else compose(step, model._upsample(inverse))
    assert inverse is not None
    if model.config.feature_halving:
        inverse = model._upsample(inverse)
    if size is not None and tuple(size) != tuple(inverse.shape[2:]):
        inverse = resize_disp(inverse, tuple(size))
    return inverse
