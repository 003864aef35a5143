"""The total transform as an ITK/ANTs displacement field (``warp_itk.nii.gz``).

ITK convention: a ``DisplacementFieldTransform`` maps a point ``p`` of the fixed (output) image,
in physical LPS millimetres, to ``p + d(p)`` in the moving image; ``Resample(moving, fixed, tx)``
samples the moving image there (a pull-back, like eoir's own fields). The field lives on the fixed
image's voxel grid and is stored as a 5-D NIfTI ``(X, Y, Z, 1, 3)`` with intent ``vector`` (1007),
the layout ITK, ANTs (``antsApplyTransforms -t warp_itk.nii.gz``) and SimpleITK read as a vector
image. NIfTI affines are RAS, ITK points LPS: both the points and the vectors change the sign of
their x and y components.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from eoir_cli.coords import ras_to_lps
from eoir_cli.io import save_volume


def itk_displacement(fixed_points_ras: np.ndarray, moving_points_ras: np.ndarray) -> np.ndarray:
    """ITK displacement vectors (LPS mm) from matching fixed/moving RAS points.

    Args:
        fixed_points_ras: ``(..., 3)`` physical RAS mm of fixed voxels.
        moving_points_ras: ``(..., 3)`` the moving RAS mm point each fixed voxel samples.

    Returns:
        ``(..., 3)`` float32 ``d = LPS(moving) - LPS(fixed)``.
    """
    return ras_to_lps(moving_points_ras - fixed_points_ras).astype(np.float32)


def to_itk_layout(disp_lps: np.ndarray) -> np.ndarray:
    """``(X, Y, Z, 3)`` -> the 5-D NIfTI vector layout ``(X, Y, Z, 1, 3)``."""
    if disp_lps.ndim != 4 or disp_lps.shape[-1] != 3:
        raise ValueError(f"disp_lps: expected (X, Y, Z, 3), got shape {disp_lps.shape}")
    return disp_lps[:, :, :, None, :]


def save_itk_displacement(
    path: str | os.PathLike[str], disp_lps: np.ndarray, fixed_affine: np.ndarray, header: Any = None
) -> Path:
    """Write an ``(X, Y, Z, 3)`` LPS-mm field on the fixed grid as an ITK displacement field."""
    hdr = None
    if header is not None:
        hdr = header.copy()
        hdr.set_intent("none", (), "")
    return save_volume(path, to_itk_layout(disp_lps), fixed_affine, header=hdr, dtype=np.float32, intent="vector")
