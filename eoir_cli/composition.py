"""Native-grid composition: every stage of a registration as ONE map, sampled on the fixed image's own grid.

Composition, for a fixed native voxel index ``i`` (all matrices 4×4, homogeneous):

    p  = A_fixed · i                 fixed RAS mm
    x  = N⁻¹ · p                     network-grid index
    x' = x + u(x)                    u = network (+ refine) displacement, trilinear, border-extended
    q  = T · N · x'                  moving RAS mm (T = affine pre-alignment, fixed mm -> moving mm)
    j  = A_moving⁻¹ · q              moving native voxel index (continuous)

``disp = j - i`` (voxels), ``warped = moving sampled at j`` (trilinear, zeros outside the moving
volume), ``warp_itk`` = ``LPS(q) - LPS(p)`` in mm on the fixed grid. Outside the network grid
``u`` takes the value at the nearest grid border, so the map stays continuous there. Index,
``[-1, 1]`` and RAS/LPS arithmetic come from :mod:`eoir_cli.coords`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from eoir_cli.coords import RAS_TO_LPS, affine_points, apply_affine, sample_at
from eoir_cli.io import Volume
from eoir_cli.preprocess import NetworkGrid


@dataclass
class NativeMaps:
    """What :func:`compose_to_native` samples on the fixed native grid ``(D, H, W)``.

    Attributes:
        disp: ``(D, H, W, 3)`` float32 voxels, ``j - i`` (a view of a channel-first array: the
            torch passes, the Jacobian and the NIfTI writer's transpose read it without a copy).
        warp_itk: ``(D, H, W, 3)`` float32 LPS mm, ``LPS(q) - LPS(p)`` (channel-first like ``disp``).
        warped: ``(D, H, W)`` float32 moving intensities (raw) at ``j``.
        before: ``(D, H, W)`` float32 moving intensities in [0, 1] at scanner coordinates (no registration).
        net_coords: ``(3, D, H, W)`` float32 displaced network-grid index ``x'`` (for the QC grid lines).
        warped_seg: ``(D, H, W)`` int32 moving labels at ``j`` (nearest), or None.
        before_seg: ``(D, H, W)`` int32 moving labels at scanner coordinates, or None.
    """

    disp: np.ndarray
    warp_itk: np.ndarray
    warped: np.ndarray
    before: np.ndarray
    net_coords: np.ndarray
    warped_seg: np.ndarray | None
    before_seg: np.ndarray | None


def compose_to_native(
    fixed: Volume, moving: Volume, grid: NetworkGrid, network_disp: np.ndarray, transform: np.ndarray,
    moving01: np.ndarray, moving_seg: np.ndarray | None = None, slab: int = 16,
) -> NativeMaps:
    """Compose every stage into the fixed-native -> moving-native voxel map and sample the outputs.

    Args:
        fixed: the fixed volume (its grid is the output grid).
        moving: the moving volume (raw intensities are warped).
        grid: the network grid ``N``.
        network_disp: ``(3, d, h, w)`` network (+ refine) displacement ``u``, network-grid voxels.
        transform: ``(4, 4)`` affine pre-alignment ``T``, fixed RAS mm -> moving RAS mm.
        moving01: moving intensities in [0, 1] (for the "before" picture).
        moving_seg: moving label map (native grid) or None.
        slab: planes of the fixed grid processed at once along axis 0 (bounds memory on large scans).
    """
    import torch

    shape = fixed.shape
    to_net = np.linalg.inv(grid.affine) @ fixed.affine
    net_to_moving = np.linalg.inv(moving.affine) @ transform @ grid.affine
    physical = np.linalg.inv(moving.affine) @ fixed.affine  # scanner coordinates, no registration
    u = torch.from_numpy(np.ascontiguousarray(network_disp, np.float32))[None]
    mov = torch.from_numpy(np.ascontiguousarray(moving.data, np.float32))[None, None]
    seg = torch.from_numpy(moving_seg.astype(np.float32))[None, None] if moving_seg is not None else None
    # Common special cases sampled by indexing instead of interpolation (same numbers, a fraction of
    # the time): a fixed grid that is the network grid up to a whole-voxel crop/pad, and a moving
    # image on the fixed image's own grid (the "before" picture is then the moving image itself).
    shift = integer_shift(to_net)
    physical_shift = integer_shift(physical)
    same_grid = fixed.shape == moving.shape and physical_shift is not None and not physical_shift.any()
    out = NativeMaps(
        disp=np.empty((3,) + shape, np.float32).transpose(1, 2, 3, 0),
        warp_itk=np.empty((3,) + shape, np.float32).transpose(1, 2, 3, 0),
        warped=np.empty(shape, np.float32),
        before=np.asarray(moving01, np.float32) if same_grid else np.empty(shape, np.float32),
        net_coords=np.empty((3,) + shape, np.float32),
        warped_seg=np.empty(shape, np.int32) if seg is not None else None,
        before_seg=(None if seg is None else np.asarray(moving_seg, np.int32) if same_grid
                    else np.empty(shape, np.int32)),
    )
    disp_first, itk_first = (torch.from_numpy(a.transpose(3, 0, 1, 2)) for a in (out.disp, out.warp_itk))
    lps = torch.tensor(RAS_TO_LPS, dtype=torch.float32).view(3, 1, 1, 1)
    mov01 = None if same_grid else torch.from_numpy(np.ascontiguousarray(moving01, np.float32))[None, None]
    # float32 is ample: index error ~ 3e-5 voxels at 500 voxels from the origin.
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        x = affine_points(to_net, shape, start, stop)
        if shift is not None:
            x += _take_clamped(u[0], [np.arange(start, stop), np.arange(shape[1]), np.arange(shape[2])], shift)
        else:
            x += sample_at(u, x, "bilinear", "border")
        j = apply_affine(net_to_moving, x)
        # j - i and LPS(A_moving j - A_fixed i), written straight into the channel-first outputs
        torch.sub(j, affine_points(np.eye(4), shape, start, stop), out=disp_first[:, start:stop])
        q_minus_p = apply_affine(moving.affine, j).sub_(affine_points(fixed.affine, shape, start, stop))
        torch.mul(q_minus_p, lps, out=itk_first[:, start:stop])
        out.net_coords[:, start:stop] = x.numpy()
        out.warped[start:stop] = sample_at(mov, j, "bilinear", "zeros")[0].numpy()
        if seg is not None:
            out.warped_seg[start:stop] = sample_at(seg, j, "nearest", "zeros")[0].round().int().numpy()
        if same_grid:
            continue
        j0 = affine_points(physical, shape, start, stop)
        out.before[start:stop] = sample_at(mov01, j0, "bilinear", "zeros")[0].numpy()
        if seg is not None:
            out.before_seg[start:stop] = sample_at(seg, j0, "nearest", "zeros")[0].round().int().numpy()
    return out


def integer_shift(index_map: np.ndarray, tol: float = 1e-6) -> np.ndarray | None:
    """The offset of a 4×4 index map that is a whole-voxel translation (identity linear part), else None."""
    lin, off = index_map[:3, :3], index_map[:3, 3]
    if np.allclose(lin, np.eye(3), atol=tol) and np.allclose(off, np.round(off), atol=tol):
        return np.round(off).astype(np.int64)
    return None


def _take_clamped(field: Any, axes: list[np.ndarray], shift: np.ndarray) -> Any:
    """``field[:, a0 + s0, a1 + s1, a2 + s2]`` on the outer product of the index ``axes``, indices
    clamped to the field (the border extension of ``sample_at(..., "border")`` at whole voxels)."""
    import torch

    out = field
    for a, index in enumerate(axes):
        clamped = np.clip(index + int(shift[a]), 0, field.shape[1 + a] - 1)
        out = out.index_select(1 + a, torch.from_numpy(clamped))
    return out


@dataclass
class InverseMaps:
    """What :func:`compose_inverse_to_native` samples on the moving native grid ``(D', H', W')``.

    Attributes:
        disp: ``(D', H', W', 3)`` float32 voxels, ``i - j``: the fixed voxel index each moving voxel
            samples minus the moving voxel index (``disp.nii.gz``'s convention, on the moving grid).
        warp_itk: ``(D', H', W', 3)`` float32 LPS mm, ``LPS(p) - LPS(q)``.
        warped: ``(D', H', W')`` float32 fixed intensities (raw) at ``i`` (zeros outside the fixed volume),
            or None when not asked for.
    """

    disp: np.ndarray
    warp_itk: np.ndarray
    warped: np.ndarray | None


def compose_inverse_to_native(
    fixed: Volume, moving: Volume, grid: NetworkGrid, network_disp: np.ndarray, inverse_disp: np.ndarray,
    transform: np.ndarray, slab: int = 16, warp_fixed: bool = True, forward: np.ndarray | None = None,
    fit_mask: np.ndarray | None = None, fit_iterations: int = 1,
) -> InverseMaps:
    """The inverse chain, from every moving native voxel ``j`` back to a fixed native voxel ``i``.

    ``q = A_moving · j`` -> ``y = N⁻¹ · T⁻¹ · q`` -> ``x = y + w(y)`` -> ``i = A_fixed⁻¹ · N · x``, where
    ``w`` inverts the network (+ refine) displacement ``u``: ``y = x + u(x)``. ``w(y)`` is the
    inverse on the network grid interpolated at ``y`` and polished there by one Newton step
    (:func:`eoir_cli.inverse.invert_at`), so the chain is exact to ~0.01 voxels at every moving voxel,
    not only where ``y`` falls on a network voxel. With ``forward`` (the forward map on the fixed
    grid) the result is then fitted to be right *between* moving voxels too, where users interpolate
    it trilinearly (:func:`eoir_cli.inverse.fit_inverse`: ~0.03 mm off at the voxels, ~40 % closer
    between them), and the ITK field and the fixed image on the moving grid follow the fitted field.

    Args:
        fixed: the fixed volume (raw intensities are warped onto the moving grid).
        moving: the moving volume (its grid is the output grid).
        grid: the network grid ``N``.
        network_disp: ``(3, d, h, w)`` ``u``, network-grid voxels.
        inverse_disp: ``(3, d, h, w)`` its inverse on the network grid (:func:`eoir_cli.inverse.invert_disp`).
        transform: ``(4, 4)`` the affine pre-alignment ``T``, fixed RAS mm -> moving RAS mm.
        slab: planes of the moving grid processed at once along axis 0.
        warp_fixed: also resample the fixed image onto the moving grid (``warped``).
        forward: ``(D, H, W, 3)`` fixed-grid voxels, ``disp.nii.gz`` (moving index minus fixed index), or
            None for no fit.
        fit_mask: ``(D, H, W)`` bool, the fixed voxels the fit uses (None: all), e.g. the foreground:
            a quarter of the samples on a brain, the same fit where the tissue is.
        fit_iterations: :func:`eoir_cli.inverse.fit_inverse` steps (0: Newton's field as it is).
    """
    import torch

    from eoir_cli.inverse import fit_inverse, inverse_gradient, invert_at

    shape = moving.shape
    to_net = np.linalg.inv(grid.affine) @ np.linalg.inv(transform) @ moving.affine
    net_to_fixed = np.linalg.inv(fixed.affine) @ grid.affine
    u = torch.from_numpy(np.ascontiguousarray(network_disp, np.float32))[None]
    w = torch.from_numpy(np.ascontiguousarray(inverse_disp, np.float32))[None]
    w_grad = inverse_gradient(w)
    disp = torch.empty((3,) + tuple(shape), dtype=torch.float32)  # i - j, channel first until the end
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        y = affine_points(to_net, shape, start, stop)
        y += invert_at(u, w, w_grad, y[None])[0]
        disp[:, start:stop] = apply_affine(net_to_fixed, y).sub_(affine_points(np.eye(4), shape, start, stop))
    del u, w, w_grad
    if forward is not None and fit_iterations > 0:
        at, value = _inverse_samples(forward, fit_mask)
        disp = fit_inverse(disp[None], at, value, fit_iterations)[0]
        del at, value
    # warp_itk = LPS(A_fixed · i - A_moving · j) with i = j + disp: (A_fixed - A_moving) · j + L_fixed · disp.
    of_disp = fixed.affine.copy()
    of_disp[:3, 3] = 0.0  # L_fixed: disp is a vector, no translation
    of_index = fixed.affine - moving.affine
    fix = torch.from_numpy(np.ascontiguousarray(fixed.data, np.float32))[None, None] if warp_fixed else None
    out = InverseMaps(disp=disp.numpy().transpose(1, 2, 3, 0),  # channel-first underneath, like NativeMaps
                      warp_itk=np.empty((3,) + shape, np.float32).transpose(1, 2, 3, 0),
                      warped=np.empty(shape, np.float32) if warp_fixed else None)
    itk_first = torch.from_numpy(out.warp_itk.transpose(3, 0, 1, 2))
    lps = torch.tensor(RAS_TO_LPS, dtype=torch.float32).view(3, 1, 1, 1)
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        part = disp[:, start:stop]
        itk = affine_points(of_index, shape, start, stop)
        itk += apply_affine(of_disp, part)
        torch.mul(itk, lps, out=itk_first[:, start:stop])
        if out.warped is not None:
            jdx = affine_points(np.eye(4), shape, start, stop)
            out.warped[start:stop] = sample_at(fix, jdx.add_(part), "bilinear", "zeros")[0].numpy()
    return out


def _inverse_samples(forward: np.ndarray, mask: np.ndarray | None) -> tuple[Any, Any]:
    """Samples of the inverse from a forward map ``(D, H, W, 3)``: positions ``j = x + forward(x)`` and
    values ``x - j = -forward(x)`` for the voxels ``x`` in ``mask``, each ``(1, 3, P, 1, 1)``.

    ``P`` is made even (one more sample at the last position) so that a 2-thread grid sampler can
    split them in halves (:func:`eoir_cli.coords.grid_sample`).
    """
    import torch

    if mask is None:
        mask = np.ones(forward.shape[:3], bool)
    index = np.nonzero(mask)
    value = forward[index]  # (P, 3)
    at = np.stack(index, 1).astype(np.float32) + value
    if len(at) % 2:
        at, value = np.concatenate([at, at[-1:]]), np.concatenate([value, value[-1:]])
    shape = (1, 3, len(at), 1, 1)
    return (torch.from_numpy(np.ascontiguousarray(at.T)).reshape(shape),
            torch.from_numpy(np.ascontiguousarray(-value.T)).reshape(shape))
