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
from eoir_cli.errors import InputError
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


def load_itk_displacement(path: str | os.PathLike[str], what: str = "field") -> tuple[np.ndarray, np.ndarray, Any]:
    """Read an ITK/ANTs displacement field (``warp_itk.nii.gz`` and the like).

    Args:
        path: a NIfTI file holding ``(X, Y, Z, 1, 3)`` (ITK's layout) or ``(X, Y, Z, 3)`` vectors.
        what: name used in messages.

    Returns:
        ``(disp_lps, affine, header)``: ``(X, Y, Z, 3)`` float32 LPS mm, the ``(4, 4)`` grid affine
        (index -> RAS mm) and the header.

    Raises:
        VolumeError: missing or unreadable file, or not a 3-D field of 3-vectors.
    """
    import gzip
    import zlib

    import nibabel as nib

    from eoir_cli.io import VolumeError, is_nifti_path

    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{what} {path}: no such file")
    if not is_nifti_path(path):
        raise VolumeError(f"{what} {path}: expected a NIfTI displacement field (.nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as err:
        text = str(err).strip().splitlines()
        raise VolumeError(f"{what} {path}: not a readable NIfTI file ({text[0] if text else type(err).__name__})") \
            from None
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 3:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] != 3:
        raise VolumeError(f"{what} {path}: expected a displacement field of shape (X, Y, Z, 1, 3), "
                          f"got shape {tuple(data.shape)}")
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise VolumeError(f"{what} {path}: expected finite displacements, got NaN/Inf")
    return data, np.asarray(img.affine, dtype=np.float64), img.header


# ITK's affine transform files: the linear part row by row, then the translation, about a centre
# of (0, 0, 0) (FixedParameters), acting on LPS points of the fixed image.
ITK_AFFINE_NAME = "AffineTransform_double_3_3"


def ras_to_lps_matrix(transform_ras: np.ndarray) -> np.ndarray:
    """A ``(4, 4)`` RAS mm -> RAS mm map as the same map on LPS points: ``F · T · F``, F = diag(-1, -1, 1, 1)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(transform_ras, dtype=np.float64) @ flip


def save_itk_affine(path: str | os.PathLike[str], transform_ras: np.ndarray) -> Path:
    """Write eoir's affine ``T`` (fixed RAS mm -> moving RAS mm) as an ITK transform file.

    ``.txt`` is ITK's text format, ``.mat`` the MATLAB v4 file ANTs writes; SimpleITK
    (``sitk.ReadTransform``), ``antsApplyTransforms -t`` and ITK-SNAP read both. The file maps a
    fixed LPS point to the moving LPS point it samples, ITK's direction for resampling the moving
    image onto the fixed grid (the same direction as ``warp_itk.nii.gz``).
    """
    from eoir_cli.fileio import atomic_path, write_text_atomic

    path = Path(path)
    m = ras_to_lps_matrix(transform_ras)
    params = np.concatenate([m[:3, :3].ravel(), m[:3, 3]])
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == ".tfm":
        text = ("#Insight Transform File V1.0\n#Transform 0\n"
                f"Transform: {ITK_AFFINE_NAME}\n"
                f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
                "FixedParameters: 0 0 0\n")
        return write_text_atomic(path, text)
    if suffix == ".mat":
        from scipy.io import savemat

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                savemat(f, {ITK_AFFINE_NAME: params.reshape(12, 1), "fixed": np.zeros((3, 1))}, format="4")
        return path
    raise InputError(f"{path}: expected an ITK transform suffix .txt, .tfm or .mat, got {path.suffix!r}")
