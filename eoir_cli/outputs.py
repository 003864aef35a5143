"""What a registration produces (:class:`RegistrationResult`) and writing it atomically.

Outputs are staged in a hidden folder and moved in place when all succeeded.

Every output of one pair is first written into ``<out>/.eoir-partial-XXXX/``; only when all of them
exist are they renamed into ``<out>`` (same file system: each rename is atomic), ``metrics.json``
last, so its presence marks a finished pair (what a resumed batch skips). On any error the staging
folder is removed (and ``<out>`` too when this call created it and it is still empty).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eoir_cli.errors import EoirError
from eoir_cli.io import Volume, save_volume
from eoir_cli.preprocess import NetworkGrid

OUTPUT_NAMES = ("warped.nii.gz", "disp.nii.gz", "warp_itk.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz",
                "inverse_warped.nii.gz", "inverse_disp.nii.gz", "inverse_warp_itk.nii.gz", "affine_itk.txt",
                "metrics.json", "qc.png")
DONE_MARKER = "metrics.json"  # written last: its presence means the pair finished
# What ``--outputs`` chooses from (metrics.json is always written); the default is all of them.
OUTPUT_KINDS = ("warped", "disp", "warp_itk", "warped_seg", "jacobian", "inverse", "qc")  # inverse: the
# three inverse_*.nii.gz on the moving grid and affine_itk.txt
DEFAULT_OUTPUTS = OUTPUT_KINDS


def parse_outputs(outputs: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"warped,disp"`` or ``["warped", "disp"]`` -> the chosen output kinds (None: all of them).

    Raises:
        EoirError: an unknown kind (the message lists the known ones).
    """
    if outputs is None:
        return DEFAULT_OUTPUTS
    items = outputs.split(",") if isinstance(outputs, str) else list(outputs)
    chosen = [v.strip().removesuffix(".nii.gz").removesuffix(".png") for v in items if v.strip()]
    unknown = [v for v in chosen if v not in OUTPUT_KINDS and v != "none"]
    if unknown:
        raise EoirError(f"outputs: expected a comma-separated subset of {','.join(OUTPUT_KINDS)} (or none), "
                        f"got {','.join(unknown)}")
    return tuple(v for v in OUTPUT_KINDS if v in chosen)


@dataclass
class RegistrationResult:
    """Everything one registration produced (arrays on the fixed image's native grid).

    Attributes:
        warped: ``(D, H, W)`` float32 moving image resampled onto the fixed grid.
        disp: ``(D, H, W, 3)`` float32 voxels: moving voxel index sampled minus fixed voxel index.
        warp_itk: ``(D, H, W, 3)`` float32 ITK displacement, LPS mm (see :mod:`eoir_cli.itk`).
        jacobian: ``(D, H, W)`` float32 determinant of the physical (mm -> mm) transform's Jacobian
            (None when neither ``jacobian`` nor ``qc`` was among the outputs).
        warped_seg: ``(D, H, W)`` int32 warped moving labels (None without ``moving_seg``).
        affine: ``(4, 4)`` the affine pre-alignment ``T`` (fixed RAS mm -> moving RAS mm).
        network_disp: ``(3, d, h, w)`` float32 network (+ refine) displacement, network-grid voxels.
        grid: the network grid.
        metrics: what ``metrics.json`` holds.
        paths: output name -> path (empty without ``out_dir``).
        qc_png: the QC picture (PNG bytes) or None.
        inverse_warped: ``(D', H', W')`` float32 fixed image resampled onto the moving grid (None
            without the inverse).
        inverse_disp: ``(D', H', W', 3)`` float32 voxels on the moving grid: fixed voxel index
            sampled minus moving voxel index.
        inverse_warp_itk: ``(D', H', W', 3)`` float32 ITK displacement of the inverse, LPS mm, moving grid.
    """

    warped: np.ndarray
    disp: np.ndarray
    warp_itk: np.ndarray
    jacobian: np.ndarray | None
    warped_seg: np.ndarray | None
    affine: np.ndarray
    network_disp: np.ndarray
    grid: NetworkGrid
    metrics: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    qc_png: bytes | None = None
    inverse_warped: np.ndarray | None = None
    inverse_disp: np.ndarray | None = None
    inverse_warp_itk: np.ndarray | None = None
    write: Callable[[], dict[str, Path]] | None = None  # pending writer (``register(..., write_later=True)``)


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden folder inside ``out_dir``; on error it is removed (and ``out_dir`` if we made it empty)."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".eoir-partial-", dir=out_dir))
    try:
        yield stage
    except BaseException:
        if created and out_dir.exists() and not any(p != stage for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_outputs_are_not_inputs(out_dir: Path, inputs: Sequence[Volume | None], names: Sequence[str]) -> None:
    """Refuse an output folder where an output name would replace one of the input files."""
    targets = {(out_dir / n).resolve() for n in names}
    for vol in inputs:
        if vol is not None and vol.path is not None and vol.path.resolve() in targets:
            raise EoirError(f"output folder {out_dir} would overwrite the input {vol.path}; choose another -o")


def write_outputs(out_dir: Path, result: RegistrationResult, fixed: Volume, mseg: Volume | None,
                  names: Sequence[str], lumir: bool, finish_metrics: Callable[[], None],
                  moving: Volume | None = None, outputs: Sequence[str] = DEFAULT_OUTPUTS) -> dict[str, Path]:
    """Write every output of ``result`` on the fixed grid (see the module docstring for the order).

    Args:
        out_dir: destination folder.
        result: what :func:`eoir_cli.pipeline.register` computed.
        fixed: the fixed volume (affine and header of every output).
        mseg: the moving label map (its integer dtype is kept for ``warped_seg``), or None.
        names: output file names (``OUTPUT_NAMES`` plus the LUMIR submission name with ``lumir``).
        lumir: also write ``names[-1]`` (the LUMIR submission field: a hard link to ``disp.nii.gz``,
            so the field is compressed and stored once).
        finish_metrics: called just before ``metrics.json`` is written (to stamp total timings).
        moving: the moving volume (affine and header of the inverse outputs, on its grid).
        outputs: the output kinds to write (:data:`OUTPUT_KINDS`); ``metrics.json`` always.

    Returns:
        Output name -> final path.
    """
    from eoir_cli.fileio import write_json_atomic
    from eoir_cli.itk import save_itk_affine, save_itk_displacement

    paths: dict[str, Path] = {}
    with staging(out_dir) as stage:
        hdr = fixed.header
        chosen = set(outputs)
        if "warped" in chosen:
            save_volume(stage / "warped.nii.gz", result.warped, fixed.affine, hdr, np.float32)
        if "disp" in chosen or lumir:
            disp_name = "disp.nii.gz" if "disp" in chosen else names[-1]
            save_volume(stage / disp_name, result.disp, fixed.affine, hdr, np.float32)
            if lumir and disp_name != names[-1]:
                link_or_copy(stage / disp_name, stage / names[-1])
        if "warp_itk" in chosen and result.warp_itk is not None:
            save_itk_displacement(stage / "warp_itk.nii.gz", result.warp_itk, fixed.affine, hdr)
        if "jacobian" in chosen and result.jacobian is not None:
            save_volume(stage / "jacobian.nii.gz", result.jacobian, fixed.affine, hdr, np.float32)
        if "warped_seg" in chosen and result.warped_seg is not None and mseg is not None:
            dtype = mseg.header.get_data_dtype() if mseg.header is not None else np.int32
            dtype = dtype if np.dtype(dtype).kind in "iu" else np.int32
            save_volume(stage / "warped_seg.nii.gz", result.warped_seg, fixed.affine, hdr, dtype)
        if "inverse" in chosen:
            save_itk_affine(stage / "affine_itk.txt", result.affine)
            if moving is not None and result.inverse_disp is not None:
                mhdr = moving.header
                save_volume(stage / "inverse_warped.nii.gz", result.inverse_warped, moving.affine, mhdr, np.float32)
                save_volume(stage / "inverse_disp.nii.gz", result.inverse_disp, moving.affine, mhdr, np.float32)
                save_itk_displacement(stage / "inverse_warp_itk.nii.gz", result.inverse_warp_itk, moving.affine,
                                      mhdr)
        if "qc" in chosen and result.qc_png is not None:
            (stage / "qc.png").write_bytes(result.qc_png)
        finish_metrics()
        write_json_atomic(stage / DONE_MARKER, jsonable(result.metrics))
        for name in names:
            src = stage / name
            if src.exists() and name != DONE_MARKER:
                os.replace(src, out_dir / name)
                paths[name] = out_dir / name
        os.replace(stage / DONE_MARKER, out_dir / DONE_MARKER)  # last: marks the pair finished
        paths[DONE_MARKER] = out_dir / DONE_MARKER
    return paths


def copy_atomic(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` so that ``dst`` appears complete or not at all: a hard link
    when both are on one file system (no second copy of a 60 MB field), else a copy."""
    from eoir_cli.fileio import atomic_path

    with atomic_path(dst) as tmp:
        link_or_copy(src, tmp)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (replacing ``dst``), or copy it where links are not possible."""
    try:
        if dst.exists():
            dst.unlink()
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def jsonable(x: Any) -> Any:
    """Plain JSON data: numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x
