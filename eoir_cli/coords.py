"""Coordinates: the one place that says how voxel indices, ``[-1, 1]`` coordinates and mm relate.

Convention (every other module imports these functions instead of writing the arithmetic again):
    * A voxel index ``i`` along an array axis of length ``n`` is the voxel *centre*; indices are
      continuous (``2.5`` is half-way between voxels 2 and 3).
    * ``grid_sample`` coordinates (``align_corners=True``): index ``i`` of an axis of length ``n``
      sits at ``2 i / (n - 1) - 1`` (``-1`` = first voxel centre, ``+1`` = last), and the last
      dimension of a sampling grid lists the axes backwards, ``(x, y, z) = (W, H, D)``.
    * A point set is ``(3, ...)``: channel ``c`` is the coordinate along array axis ``c``
      (indices) or along R/A/S (mm), so a voxel-index field and its mm image share one layout.
    * ``affine`` (4×4, nibabel's) maps a voxel index ``(i, j, k, 1)`` to RAS+ millimetres; its
      column norms are the voxel spacing in mm.
    * ITK/ANTs points are LPS: ``LPS = RAS * (-1, -1, 1)`` for points and vectors alike.
    * The physical Jacobian of a map given as a voxel displacement ``disp`` (moving index minus
      fixed index, ``(D, H, W, 3)``) is ``det(I + ∇disp) · det(A_moving) / det(A_fixed)``: 1 for
      the identity even between grids of different voxel size or handedness.

Tested with single-axis shifts (``tests/test_coords.py``), which fail if two axes are swapped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def identity_grid(size: Sequence[int], device: Any = None, dtype: Any = None) -> Any:
    """Voxel index of every voxel as a torch tensor ``(1, 3, *size)``; channel c = index along axis c.

    Args:
        size: ``(D, H, W)``.
        device: torch device (default CPU).
        dtype: torch dtype (default float32).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    axes = [torch.arange(s, device=device, dtype=dtype) for s in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def index_grid(shape: Sequence[int], dtype: Any = np.float32) -> np.ndarray:
    """Voxel index of every voxel as a numpy array ``(3, *shape)`` (the numpy twin of :func:`identity_grid`)."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=dtype) for s in shape], indexing="ij"))


def index_to_normalized(index: Any, size: Sequence[int]) -> Any:
    """``grid_sample`` grid ``(..., 3)`` in ``(x, y, z)`` order from indices ``(N, 3, ...)`` or ``(3, ...)``.

    Args:
        index: continuous voxel indices of the image grid, channel c along array axis c (dim 1 of
            a batched ``(N, 3, ...)`` tensor, dim 0 of an unbatched ``(3, ...)`` one).
        size: ``(D, H, W)`` of the image being sampled.

    Returns:
        The same points in ``[-1, 1]`` (align_corners=True), last dim ``(W, H, D)``.
    """
    import torch

    batched = index.dim() == 5
    # The original EOIR arithmetic, 2 * (p / (n - 1) - 0.5), so warps match it bit for bit.
    if torch.is_grad_enabled() and index.requires_grad:
        norm = [2 * ((index[:, a] if batched else index[a]) / max(size[a] - 1, 1) - 0.5) for a in range(3)]
        return torch.stack(norm[::-1], dim=-1)
    # Without a graph: the same three operations, the last one written into the grid (no stacked copy).
    channels = [index[:, a] if batched else index[a] for a in range(3)]
    out = torch.empty((*channels[0].shape, 3), dtype=index.dtype, device=index.device)
    for a, channel in enumerate(channels):
        torch.mul(channel.div(max(size[a] - 1, 1)).sub_(0.5), 2, out=out[..., 2 - a])
    return out


def normalized_to_index(grid: Any, size: Sequence[int]) -> Any:
    """Inverse of :func:`index_to_normalized` for an unbatched grid ``(..., 3)``: indices ``(3, ...)``."""
    import torch

    return torch.stack([(grid[..., 2 - a] + 1) * (max(size[a] - 1, 1) / 2) for a in range(3)])


def normalized_scale(size: Sequence[int], device: Any = None) -> Any:
    """Per-grid-axis factor ``2 / (n - 1)`` in ``(x, y, z)`` order: a voxel displacement times it is a
    ``grid_sample`` displacement (float32 torch tensor of 3 values)."""
    import torch

    return torch.tensor([2.0 / max(n - 1, 1) for n in tuple(size)[::-1]], dtype=torch.float32, device=device)


MIN_SPLIT_VOXELS = 32_768  # output voxels below which a grid sample is not worth splitting across threads


def _onnx_exporting() -> bool:
    """Inside ``torch.onnx.export`` (without importing ``torch.onnx`` where nothing exports: ~25 ms)."""
    import sys

    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def grid_sample(volume: Any, grid: Any, mode: str = "bilinear", padding: str = "zeros", out: Any = None) -> Any:
    """``F.grid_sample(..., align_corners=True)`` with a CPU volume's output spread over PyTorch's threads.

    PyTorch's CPU 3-D grid sampler parallelises over the batch only, so one volume is sampled on one
    thread however many there are. Here a single volume's output grid is cut along its first axis
    into as many equal slabs as there are threads (a divisor of that axis), run as a batch against
    the same volume (``expand``: no copy of it): the same numbers, ~2x faster on 2 cores (forward
    and backward at 80×112×96). GPUs, batches, small grids and traced/exported graphs take the
    plain call. ``out`` (no autograd): a contiguous tensor of the result's shape that receives it,
    instead of a new tensor for the slabs' reassembly.
    """
    import torch
    import torch.nn.functional as F

    depth = grid.shape[1]
    threads = torch.get_num_threads()
    if (threads > 1 and grid.shape[0] == 1 and volume.shape[0] == 1 and grid.device.type == "cpu"
            and grid.numel() // 3 >= MIN_SPLIT_VOXELS and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not _onnx_exporting()):
        parts = next(k for k in range(min(threads, depth), 0, -1) if depth % k == 0)
        if parts > 1:
            slabs = grid.reshape(parts, depth // parts, *grid.shape[2:])
            sampled = F.grid_sample(volume.expand(parts, -1, -1, -1, -1), slabs, mode=mode, padding_mode=padding,
                                    align_corners=True)
            if out is None:
                return sampled.transpose(0, 1).reshape(1, sampled.shape[1], depth, *grid.shape[2:4])
            out.view(sampled.shape[1], parts, *sampled.shape[2:]).copy_(sampled.transpose(0, 1))
            return out
    sampled = F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)
    return sampled if out is None else out.copy_(sampled)


def sample_at(volume: Any, index: Any, mode: str = "bilinear", padding: str = "zeros") -> Any:
    """Sample ``volume`` ``(1, C, D, H, W)`` at continuous voxel indices ``(3, d, h, w)``.

    Trilinear (``bilinear``) or ``nearest``; ``padding`` is ``"zeros"`` or ``"border"`` (outside
    points take the nearest border value). Returns ``(C, d, h, w)`` in the volume's dtype.
    """
    grid = index_to_normalized(index, volume.shape[2:])[None].to(volume.dtype)
    return grid_sample(volume, grid, mode, padding)[0]


def sample_points(field: np.ndarray, index: np.ndarray, dtype: Any = None) -> np.ndarray:
    """Trilinear sample of a channel-last ``(X, Y, Z, C)`` numpy field at ``(n, 3)`` continuous indices.

    Beyond the grid the nearest border value is taken (the way fields are extended everywhere in
    eoir). Computed channel by channel in ``dtype`` (default: the field's; float64 where points must
    keep sub-micrometre precision). Returns ``(n, C)``.
    """
    from scipy import ndimage

    coords = np.clip(index, 0, np.array(field.shape[:3], dtype=np.float64) - 1).T
    return np.stack([ndimage.map_coordinates(field[..., c].astype(dtype or field.dtype, copy=False), coords, order=1,
                                             mode="nearest") for c in range(field.shape[-1])], axis=-1)


def apply_affine(matrix: np.ndarray, points: Any) -> Any:
    """Apply a 4×4 affine to a point set ``(3, ...)`` (torch tensor, computed in its dtype; or numpy)."""
    if isinstance(points, np.ndarray):
        m = matrix.astype(points.dtype, copy=False)
        return np.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].reshape(3, *([1] * (points.ndim - 1)))
    import torch

    m = torch.from_numpy(np.asarray(matrix)).to(points.dtype)
    return torch.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].reshape(3, *([1] * (points.dim() - 1)))


def affine_points(matrix: np.ndarray, shape: Sequence[int], start: int = 0, stop: int | None = None) -> Any:
    """``matrix @ (i, j, k, 1)`` at every voxel of planes ``start:stop`` of a ``shape`` grid, a float32
    torch tensor ``(3, stop - start, H, W)``.

    The points :func:`apply_affine` gives on :func:`identity_grid` (shifted by ``start``), built as a
    broadcast sum of one term per axis (each computed in float64): no index grid, no 3×3 product per
    voxel, two passes over the output.
    """
    import torch

    stop = int(shape[0]) if stop is None else int(stop)
    m = np.asarray(matrix, dtype=np.float64)
    axes = (np.arange(start, stop, dtype=np.float64), np.arange(shape[1], dtype=np.float64),
            np.arange(shape[2], dtype=np.float64))
    out = torch.empty((3, stop - start, int(shape[1]), int(shape[2])), dtype=torch.float32)
    for c in range(3):
        terms = [torch.from_numpy(m[c, a] * axes[a] + (m[c, 3] if a == 0 else 0.0)).float().view(
            *[-1 if b == a else 1 for b in range(3)]) for a in range(3)]
        out[c].copy_(terms[0] + terms[1]).add_(terms[2])
    return out


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along array axes 0, 1, 2 (the column norms of the affine)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))  # type: ignore


def ras_to_lps(vectors: Any) -> Any:
    """RAS -> LPS (and back: the map is its own inverse) for points or vectors with xyz in the last axis,
    or in axis 0 for torch ``(3, ...)`` point sets."""
    if isinstance(vectors, np.ndarray):
        return vectors * RAS_TO_LPS.astype(vectors.dtype, copy=False)
    import torch

    sign = torch.tensor(RAS_TO_LPS, dtype=vectors.dtype, device=vectors.device)
    return vectors * sign.view(3, *([1] * (vectors.dim() - 1)))


def spatial_gradient(field: Any) -> list[Any]:
    """Central differences (one-sided at the borders) along array axes 0, 1, 2 of ``(N, C, D, H, W)``.

    The same numbers as ``torch.gradient(field, dim=(2, 3, 4))`` in half its time (slices written
    in place instead of its general-spacing arithmetic: 0.35 s vs 0.71 s for a 3-channel
    160×224×192 field on one CPU thread).
    """
    import torch

    if field.requires_grad:  # out= below does not record autograd
        return list(torch.gradient(field, dim=(2, 3, 4)))
    out = []
    for dim in (2, 3, 4):
        n = field.shape[dim]
        if n < 2:
            raise ValueError(f"field: expected at least 2 voxels along dim {dim}, got shape {tuple(field.shape)}")
        grad = torch.empty_like(field)
        torch.sub(field.narrow(dim, 1, 1), field.narrow(dim, 0, 1), out=grad.narrow(dim, 0, 1))
        torch.sub(field.narrow(dim, n - 1, 1), field.narrow(dim, n - 2, 1), out=grad.narrow(dim, n - 1, 1))
        if n > 2:
            inner = grad.narrow(dim, 1, n - 2)
            torch.sub(field.narrow(dim, 2, n - 2), field.narrow(dim, 0, n - 2), out=inner)
            inner.mul_(0.5)
        out.append(grad)
    return out


def jacobian_determinant(disp: Any) -> Any:
    """Determinant of the Jacobian of ``x -> x + disp(x)`` by central differences (one-sided at the borders).

    The determinant is unit-free: a voxel-unit field gives the same value as its mm version.

    Args:
        disp: ``(N, 3, D, H, W)`` torch displacement in voxels.

    Returns:
        ``(N, D, H, W)``; 1 for the identity, <= 0 where the map folds.
    """
    import torch

    grads = spatial_gradient(disp)  # grads[j][:, i] = d disp_i / d x_j

    def entry(i: int, j: int) -> torch.Tensor:
        return grads[j][:, i] + 1.0 if i == j else grads[j][:, i]

    # The cofactor expansion written out: several times faster than a batched torch.linalg.det
    # (one LU factorisation per voxel) on the 7 M voxels of the LUMIR grid; equal to float rounding.
    a = [[entry(i, j) for j in range(3)] for i in range(3)]
    return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))


def physical_jacobian(disp: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """Jacobian determinant of the mm -> mm transform from a native voxel field ``(D, H, W, 3)``.

    ``det(I + ∇disp)`` (central differences) times ``det(A_moving) / det(A_fixed)`` so that grids of
    different voxel size or handedness (RAS vs LPS arrays) give 1 for the identity.

    Returns:
        ``(D, H, W)`` float32.
    """
    import torch

    t = torch.from_numpy(np.ascontiguousarray(disp.transpose(3, 0, 1, 2)))[None]
    det = jacobian_determinant(t)[0].numpy()
    ratio = np.linalg.det(moving_affine[:3, :3]) / np.linalg.det(fixed_affine[:3, :3])
    return (det * ratio).astype(np.float32)
