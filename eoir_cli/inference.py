"""Running a network on one pair: the single path used by ``register``, ``test``, ``bench`` and training validation.

Convention: ``moving`` and ``fixed`` are ``(D, H, W)`` intensities already normalised to [0, 1]
on the same grid; the result is the displacement ``(3, D, H, W)`` float32 in **voxels** of that
grid (channel c along array axis c, pull-back; see :mod:`eoir_cli.spatial`). A size the network
cannot take is zero-padded *centred* on every axis to the next size it can (:func:`padded_size`),
and the displacement is cropped back; voxel displacements do not change under that shift, so a
pair gives the same field whichever command runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def padded_size(size: Sequence[int], multiple: Sequence[int], scale: float) -> tuple[int, int, int]:
    """Smallest size >= ``size`` that ``scale`` maps to whole multiples of ``multiple``, at least two
    of them where the pyramid halves (its coarsest level needs 2 voxels per axis, as
    :func:`eoir_cli.spatial.check_size` requires).

    Example: size 150, multiple 16, scale 0.5 -> 160 (160 * 0.5 = 80 = 5 * 16); size 17 -> 64 (32 = 2 * 16).
    """
    out = []
    for n, m in zip(size, multiple, strict=True):
        p = max(int(n), 1)
        least = 2 * m if m > 1 else 1
        while True:
            net = p * scale
            if abs(net - round(net)) < 1e-6 and round(net) % m == 0 and round(net) >= least:
                break
            p += 1
        out.append(p)
    return tuple(out)  # type: ignore[return-value]


def centred_padding(size: Sequence[int], config: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(target size, padding before)`` per axis for a network of ``config`` (a ModelConfig)."""
    target = padded_size(size, config.size_multiple(), config.input_scale)
    before = tuple((t - n) // 2 for n, t in zip(size, target, strict=True))
    return target, before  # type: ignore[return-value]


def predict_disp(model: Any, moving: Any, fixed: Any) -> Any:
    """Displacement ``(N, 3, D, H, W)`` in voxels from an ``EOIR`` module, for inputs of any size.

    Args:
        model: an EOIR (eval mode and ``no_grad`` are the caller's choice).
        moving: ``(N, 1, D, H, W)`` torch tensor in [0, 1].
        fixed: ``(N, 1, D, H, W)`` in [0, 1], same shape.
    """
    import torch.nn.functional as F

    size = tuple(int(s) for s in moving.shape[2:])
    target, before = centred_padding(size, model.config)
    if target == size:
        return model(moving, fixed)
    pad: list[int] = []
    for n, t, b in zip(reversed(size), reversed(target), reversed(before), strict=True):
        pad += [b, t - n - b]  # F.pad lists the last axis first
    disp = model(F.pad(moving, pad), F.pad(fixed, pad))
    return disp[:, :, before[0]:before[0] + size[0], before[1]:before[1] + size[1], before[2]:before[2] + size[2]]


def run_pair(backend: Any, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Run an opened backend (:func:`eoir_cli.backends.open_backend`) on one normalised pair.

    Args:
        backend: a :class:`eoir_cli.backends.Backend`.
        moving: ``(D, H, W)`` float32 in [0, 1].
        fixed: ``(D, H, W)`` float32 in [0, 1], same shape.

    Returns:
        ``(3, D, H, W)`` float32 voxels on the input grid. A backend exported for one fixed
        size is run as is (it refuses another size with a clear message).
    """
    size = tuple(int(s) for s in np.shape(fixed))
    if backend.input_shape is not None or len(size) != 3:
        return np.asarray(backend(moving, fixed), dtype=np.float32)
    target, before = centred_padding(size, backend.config)
    if target == size:
        return np.asarray(backend(moving, fixed), dtype=np.float32)
    widths = [(b, t - n - b) for n, t, b in zip(size, target, before, strict=True)]
    disp = np.asarray(backend(np.pad(moving, widths), np.pad(fixed, widths)), dtype=np.float32)
    crop = tuple(slice(b, b + n) for b, n in zip(before, size, strict=True))
    return np.ascontiguousarray(disp[(slice(None), *crop)])
