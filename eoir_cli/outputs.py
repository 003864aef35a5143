"""What a registration produces (:class:`RegistrationResult`) and writing it atomically.

Outputs are staged in a hidden folder and moved in place when all succeeded.

Every output of one pair is first written into ``<out>/.eoir-partial-<host>-<pid>-XXXX/``; only when
all of them exist are they renamed into ``<out>`` (same file system: each rename is atomic),
``metrics.json`` last, so its presence marks a finished pair (what a resumed batch skips). On any
error, Ctrl-C included, the staging folder is removed (and ``<out>`` too when this call created it and
it is still empty). A process killed outright (SIGKILL, power loss) cannot clean up: the next run
into the same folder removes staging folders whose process, on this host, is gone
(:func:`clean_stale_staging`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eoir_cli.errors import EoirError
from eoir_cli.io import Volume, save_volume
from eoir_cli.preprocess import NetworkGrid

log = logging.getLogger(__name__)

STAGING_PREFIX = ".eoir-partial-"
STALE_UNKNOWN_OWNER_S = 24 * 3600  # a staging folder without a readable owner is stale after a day
OUTPUT_NAMES = ("warped.nii.gz", "disp.nii.gz", "warp_itk.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz",
                "inverse_warped.nii.gz", "inverse_disp.nii.gz", "inverse_warp_itk.nii.gz", "affine_itk.txt",
                "metrics.json", "qc.png")
DONE_MARKER = "metrics.json"  # written last: its presence means the pair finished
# What ``--outputs`` chooses from (metrics.json is always written). ``inverse``: the three
# inverse_*.nii.gz on the moving grid, opt-in (2-3 s of a 2-core CPU at 160×224×192 and as much
# again to write); affine_itk.txt comes with ``warp_itk`` or ``inverse``.
OUTPUT_KINDS = ("warped", "disp", "warp_itk", "warped_seg", "jacobian", "inverse", "qc")
DEFAULT_OUTPUTS = tuple(k for k in OUTPUT_KINDS if k != "inverse")


def parse_outputs(outputs: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"warped,disp"`` or ``["warped", "disp"]`` -> the chosen output kinds.

    None or ``"default"``: :data:`DEFAULT_OUTPUTS` (all but the inverse); ``"all"``: every kind;
    ``"none"``: nothing but ``metrics.json``.

    Raises:
        EoirError: an unknown kind (the message lists the known ones).
    """
    if outputs is None:
        return DEFAULT_OUTPUTS
    items = outputs.split(",") if isinstance(outputs, str) else list(outputs)
    chosen = [v.strip().removesuffix(".nii.gz").removesuffix(".png") for v in items if v.strip()]
    unknown = [v for v in chosen if v not in OUTPUT_KINDS and v not in ("none", "all", "default")]
    if unknown:
        raise EoirError(f"outputs: expected a comma-separated subset of {','.join(OUTPUT_KINDS)} (or all, default, "
                        f"none), got {','.join(unknown)}")
    if "all" in chosen:
        return OUTPUT_KINDS
    if "default" in chosen:
        chosen += DEFAULT_OUTPUTS
    return tuple(v for v in OUTPUT_KINDS if v in chosen)


def with_inverse(chosen: Sequence[str], inverse: bool | None) -> tuple[str, ...]:
    """``chosen`` with the ``inverse`` kind added (True), removed (False) or left as it is (None)."""
    if inverse is None:
        return tuple(chosen)
    return tuple(k for k in OUTPUT_KINDS if (k in chosen and k != "inverse") or (k == "inverse" and inverse))


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


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_staging(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders in ``out_dir`` left by processes that died without cleaning up.

    A folder ``.eoir-partial-<host>-<pid>-XXXX`` is stale when ``<host>`` is this machine and no
    process ``<pid>`` runs; one whose owner cannot be read (an older name) when it is older than
    ``STALE_UNKNOWN_OWNER_S``. Folders of live processes, or of other hosts sharing the folder, are
    left alone.

    Returns:
        The removed folders.
    """
    out_dir = Path(out_dir)
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    host = _host()
    for stage in out_dir.glob(STAGING_PREFIX + "*"):
        if not stage.is_dir():
            continue
        parts = stage.name[len(STAGING_PREFIX):].rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit():
            stale = parts[0] == host and not _process_alive(int(parts[1]))
        else:
            stale = time.time() - stage.stat().st_mtime > STALE_UNKNOWN_OWNER_S
        if stale:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
            log.info("removed %s: staging folder of a run that ended without cleaning up", stage)
    return removed


def check_output_folder(out_dir: str | os.PathLike[str], names: Sequence[str], overwrite: bool) -> Path:
    """Check an output folder before any computation: a folder that can be created and written,
    not holding the outputs of an earlier registration unless ``overwrite``.

    Raises:
        EoirError: naming the folder and what is wrong.
    """
    from eoir_cli.fileio import check_output_dir

    out = check_output_dir(out_dir, "output folder")
    if not overwrite and out.is_dir():
        found = [n for n in names if (out / n).exists()]
        if found:
            raise EoirError(f"output folder {out} already holds registration results ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}); pass --overwrite (overwrite=True) to replace "
                            "them, or choose another folder")
    return out


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden folder inside ``out_dir``, named after this host and process (see the module
    docstring); on error it is removed (and ``out_dir`` if we made it empty)."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host()}-{os.getpid()}-", dir=out_dir))
    try:
        yield stage
    except BaseException:
        if created and out_dir.exists() and not any(p != stage for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_outputs_are_not_inputs(out_dir: Path, inputs: Sequence[Volume | str | os.PathLike[str] | None],
                                 names: Sequence[str]) -> None:
    """Refuse an output folder where an output name would replace one of the input files (volumes or paths)."""
    targets = {(out_dir / n).resolve() for n in names}
    for item in inputs:
        path = item.path if isinstance(item, Volume) else Path(item) if item is not None else None
        if path is not None and path.resolve() in targets:
            raise EoirError(f"output folder {out_dir} would overwrite the input {path}; choose another -o")


class EarlyWriter:
    """Starts ``write(ready)`` on a thread at once, for a writer that calls ``ready()`` once its
    large files are written and before it needs the rest of the result (metrics, picture).

    ``ready()`` waits for :meth:`release` (the writer then finishes and :meth:`release` returns its
    paths or raises its error) or :meth:`abandon` (``ready()`` raises, so the writer's staging
    folder is removed and nothing reaches the output folder). The thread is not a daemon: an
    interpreter that exits while a released writer runs lets it finish its renames.
    """

    class Abandoned(Exception):
        """Raised in the writer by ``ready()`` after :meth:`abandon`."""

    def __init__(self, write: Callable[[Callable[[], None]], dict[str, Path]]) -> None:
        self._go = threading.Event()
        self._abandoned = False
        self._paths: dict[str, Path] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name="eoir-writer")
        self._thread.start()

    def _ready(self) -> None:
        self._go.wait()
        if self._abandoned:
            raise EarlyWriter.Abandoned

    def _run(self, write: Callable[[Callable[[], None]], dict[str, Path]]) -> None:
        try:
            self._paths = write(self._ready)
        except BaseException as err:  # handed to the caller by release()
            self._error = err

    def release(self) -> dict[str, Path]:
        """Let the writer finish; its paths, or its error raised here."""
        self._go.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._paths

    def abandon(self) -> None:
        """Stop the writer at ``ready()`` and wait until its staging folder is gone."""
        self._abandoned = True
        self._go.set()
        self._thread.join()


def write_outputs(out_dir: Path, result: RegistrationResult, fixed: Volume, mseg: Volume | None,
                  names: Sequence[str], lumir: bool, finish_metrics: Callable[[], None],
                  moving: Volume | None = None, outputs: Sequence[str] = DEFAULT_OUTPUTS,
                  ready: Callable[[], None] | None = None) -> dict[str, Path]:
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
        ready: called after the images and fields are staged, before ``result.qc_png`` and
            ``result.metrics`` are read (see :class:`EarlyWriter`); raising there abandons the write.

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
        if "inverse" in chosen or "warp_itk" in chosen:
            save_itk_affine(stage / "affine_itk.txt", result.affine)
        if "inverse" in chosen:
            if moving is not None and result.inverse_disp is not None:
                mhdr = moving.header
                save_volume(stage / "inverse_warped.nii.gz", result.inverse_warped, moving.affine, mhdr, np.float32)
                save_volume(stage / "inverse_disp.nii.gz", result.inverse_disp, moving.affine, mhdr, np.float32)
                save_itk_displacement(stage / "inverse_warp_itk.nii.gz", result.inverse_warp_itk, moving.affine,
                                      mhdr)
        if ready is not None:
            ready()
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
