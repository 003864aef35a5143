"""Reading and writing NIfTI volumes with one clear error line for every bad input.

Convention: a :class:`Volume` holds the array in the file's own voxel order (``data[i, j, k]``)
and the 4×4 ``affine`` that maps a voxel index ``(i, j, k, 1)`` to scanner RAS+ millimetres
(nibabel's convention). Nothing is reoriented here; :mod:`eoir_cli.preprocess` does that.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eoir_cli.errors import EoirError
from eoir_cli.fileio import atomic_path

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
Kind = Literal["image", "label"]
GZIP_LEVEL = 1  # zlib's fastest level: float fields shrink to ~80 % at any level; level 6 costs ~4x the time
GZIP_CHUNK = 8 << 20  # bytes per gzip member


class VolumeError(EoirError):
    """An input volume that cannot be used (missing, not NIfTI, wrong dimensionality, bad values)."""


@dataclass
class Volume:
    """One 3-D volume as read from disk.

    Attributes:
        data: ``(D, H, W)`` array in file voxel order; float32 for images, int32 for label maps.
        affine: ``(4, 4)`` float64, voxel index -> RAS+ mm.
        header: the original nibabel header (copied; used to write outputs on the same grid).
        path: the file it came from (None for in-memory volumes).
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along array axes 0, 1, 2 (column norms of the affine)."""
        from eoir_cli.coords import voxel_spacing

        return voxel_spacing(self.affine)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<array>"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """True for names ending in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike[str], kind: Kind = "image", what: str | None = None) -> Volume:
    """Read a 3-D NIfTI file and validate it.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` (float32; rejects NaN/Inf and constant images) or ``"label"`` (int32;
            rejects non-integer values).
        what: name used in messages (e.g. ``"fixed"``); defaults to ``kind``.

    Returns:
        The :class:`Volume`. A 4-D file whose 4th axis has length 1 is squeezed to 3-D.

    Raises:
        VolumeError: one line naming the file and the problem ("expected ..., got ...").
    """
    import nibabel as nib

    what = what or kind
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{what} {path}: no such file")
    if path.is_dir():
        raise VolumeError(f"{what} {path}: is a directory, expected a .nii or .nii.gz file")
    if not is_nifti_path(path):
        suffix = "".join(path.suffixes) or "(none)"
        raise VolumeError(f"{what} {path}: expected a NIfTI file (.nii or .nii.gz), got suffix {suffix!r}")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(f"{what} {path}: expected a NIfTI image, got {type(img).__name__}")
        raw = np.asanyarray(img.dataobj)
    except VolumeError:
        raise
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError, MemoryError, TypeError) as err:
        raise VolumeError(f"{what} {path}: not a readable NIfTI file ({_first_line(err)})") from None
    shape = raw.shape
    if raw.ndim == 4 and shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise VolumeError(f"{what} {path}: expected a 3-D volume, got {raw.ndim}-D shape {tuple(shape)}")
    if min(raw.shape) < 2:
        raise VolumeError(f"{what} {path}: expected at least 2 voxels along every axis, got shape {raw.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{what} {path}: the header's affine is not invertible or not finite")
    data = _check_values(raw, kind, f"{what} {path}")
    return Volume(data=data, affine=affine, header=img.header.copy(), path=path)


def _check_values(raw: np.ndarray, kind: Kind, name: str) -> np.ndarray:
    if raw.dtype.kind not in "biuf":
        raise VolumeError(f"{name}: expected a numeric voxel type, got {raw.dtype}")
    if kind == "label":
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)):
                raise VolumeError(f"{name}: expected integer labels, got NaN/Inf voxels")
            if not np.array_equal(raw, np.round(raw)):
                raise VolumeError(f"{name}: expected integer labels, got fractional values")
        return np.ascontiguousarray(raw, dtype=np.int32)
    # C order once here (nibabel hands over the file's x-fastest order): every later step (torch,
    # slabs along axis 0) would otherwise make its own transposing copy.
    data = np.ascontiguousarray(raw, dtype=np.float32)
    if raw.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - finite.sum())
            raise VolumeError(f"{name}: expected finite intensities, got {bad} NaN/Inf voxels")
    if float(data.max()) == float(data.min()):
        raise VolumeError(f"{name}: expected an image with contrast, got a constant image "
                          f"(all voxels = {data.flat[0]:g})")
    return data


def check_same_grid(label: Volume, image: Volume, what: str, tol_mm: float = 1e-3) -> None:
    """Raise when a label map is not on its image's voxel grid (shape and affine)."""
    if label.shape != image.shape:
        raise VolumeError(f"{what} {label.name}: expected the shape of its image {image.shape}, got {label.shape}")
    if not np.allclose(label.affine, image.affine, atol=tol_mm):
        raise VolumeError(f"{what} {label.name}: geometry (affine) differs from its image {image.name} "
                          f"by up to {np.abs(label.affine - image.affine).max():.3g} mm")


def save_volume(
    path: str | os.PathLike[str],
    data: np.ndarray,
    affine: np.ndarray,
    header: Any = None,
    dtype: np.dtype | type | None = None,
    intent: str | None = None,
    compression: int = GZIP_LEVEL,
) -> Path:
    """Write a NIfTI file atomically (whole or not at all).

    Args:
        path: target ``.nii``/``.nii.gz``.
        data: array to store (3-D, 4-D or 5-D).
        affine: ``(4, 4)`` voxel -> RAS+ mm written to both qform and sform.
        header: a header to copy units/codes from (e.g. the fixed image's); None for a fresh one.
        dtype: on-disk dtype (default: ``data.dtype``).
        intent: NIfTI intent name (e.g. ``"vector"`` for displacement fields).
        compression: zlib level for ``.nii.gz`` (1 = fastest; the file is written by
            :func:`write_gzip_parallel`).
    """
    import nibabel as nib

    path = Path(path)
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=hdr)
    img.header.set_data_dtype(data.dtype)
    # Raw values: any scaling from the source header would rescale our floats.
    img.header.set_slope_inter(1.0, 0.0)
    qcode = int(img.header["qform_code"]) or 1
    scode = int(img.header["sform_code"]) or 1
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    if intent is not None:
        img.header.set_intent(intent, (), "")
    with atomic_path(path) as tmp:
        if str(path).lower().endswith(".gz"):
            write_gzip_parallel(tmp, nifti_parts(img, data), level=compression)
        else:
            nib.save(img, str(tmp))
    log.info("wrote %s", path)
    return path


def nifti_parts(img: Any, data: np.ndarray) -> tuple[bytes, memoryview]:
    """The bytes of a single-file NIfTI of ``data`` as nibabel's ``img.to_bytes()`` lays them out, in two parts:
    the header (with extensions, padded to its ``vox_offset``) and a view of the voxel data in file order.

    ``img`` must carry ``data``'s shape, its on-disk dtype (any byte order) and slope 1 / intercept 0
    (:func:`save_volume` sets them). The data is one transposing copy at most (none for an array
    already in Fortran order and the file's dtype), and the parts are compressed as they are: no
    buffer joins the header and an 80 MB field.
    """
    from io import BytesIO

    img.update_header()
    hdr = img.header
    head = BytesIO()
    hdr.write_to(head)
    offset = int(hdr.get_data_offset())
    if head.tell() > offset:
        raise ValueError(f"NIfTI header: {head.tell()} bytes do not fit before vox_offset {offset}")
    head.write(bytes(offset - head.tell()))
    body = np.asfortranarray(data, dtype=hdr.get_data_dtype())
    return head.getvalue(), memoryview(body.T.reshape(-1)).cast("B")


def write_gzip_parallel(path: str | os.PathLike[str], data: Any, level: int = GZIP_LEVEL,
                        threads: int | None = None, chunk: int = GZIP_CHUNK) -> None:
    """Write ``data`` gzip-compressed, compressing ``chunk``-byte pieces on ``threads`` threads.

    The file is a sequence of complete gzip members (RFC 1952 §2.2), which every gzip reader
    decompresses as one stream (Python's ``gzip``/nibabel, zlib's ``gzread`` in ITK, ANTs, FSL,
    ``gunzip``). zlib releases the GIL while it deflates, so the pieces compress in parallel.

    Args:
        path: target file (written directly; wrap in :func:`eoir_cli.fileio.atomic_path`).
        data: the uncompressed bytes: one bytes-like object, or a tuple of them written one after
            the other (e.g. :func:`nifti_parts`: no copy joins them).
        level: zlib level 0-9.
        threads: compression threads (None: :func:`eoir_cli.threads.num_threads`).
        chunk: uncompressed bytes per member.
    """
    import zlib

    from eoir_cli.threads import num_threads

    try:  # Intel ISA-L (the isal package): a standard deflate stream, ~4x faster than zlib's level 1
        from isal import isal_zlib
    except ImportError:  # a platform without its wheel: zlib
        isal_zlib = None

    def member(view: memoryview) -> bytes:
        # wbits 16 + 15: a gzip header and trailer. isal level 1 gives zlib level 1's size (disp
        # 68.6 MB from 82.6 MB in 0.17 s against 0.69 s). zlib's Z_RLE (matches of the previous byte
        # only) compresses ~3x faster than its default strategy at level 1 to within 1 % of its size.
        if isal_zlib is not None and level > 0:
            return isal_zlib.compress(view, min(level, isal_zlib.ISAL_BEST_COMPRESSION), wbits=31)
        comp = zlib.compressobj(level, zlib.DEFLATED, 31, 8, zlib.Z_RLE)
        return comp.compress(view) + comp.flush()

    parts = [memoryview(part).cast("B") for part in (data if isinstance(data, tuple) else (data,))]
    pieces = [part[start:start + chunk] for part in parts for start in range(0, len(part), chunk)] or [parts[0]]
    workers = max(1, min(threads or num_threads(), len(pieces)))
    with open(path, "wb") as f:
        if workers == 1:
            for piece in pieces:
                f.write(member(piece))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            for packed in pool.map(member, pieces):
                f.write(packed)
