"""Register two NIfTI scans end to end: the pipeline behind ``eoir register`` and :func:`register`.

Pipeline: load and validate -> intensities to [0, 1] -> the network grid (fixed image's closest
canonical orientation at the model spacing, cropped/padded around the foreground) -> affine
pre-alignment of moving to fixed (optional) -> moving resampled onto the network grid through the
affine -> the network -> instance optimisation (``refine`` steps, optional) -> everything composed
into ONE map from every fixed native voxel to a continuous moving native voxel index, from which
all outputs are computed.

Composition, for a fixed native voxel index ``i`` (all matrices 4×4, homogeneous):

    p  = A_fixed · i                 fixed RAS mm
    x  = N⁻¹ · p                     network-grid index
    x' = x + u(x)                    u = network (+ refine) displacement, trilinear, border-extended
    q  = T · N · x'                  moving RAS mm (T = affine pre-alignment, fixed mm -> moving mm)
    j  = A_moving⁻¹ · q              moving native voxel index (continuous)

``disp = j - i`` (voxels), ``warped = moving sampled at j`` (trilinear, zeros outside the moving
volume), ``warp_itk`` = ``LPS(q) - LPS(p)`` in mm on the fixed grid. Outside the network grid
``u`` takes the value at the nearest grid border, so the map stays continuous there.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eoir_cli.config import PIPELINE
from eoir_cli.errors import EoirError
from eoir_cli.io import Volume, check_same_grid, load_volume, save_volume
from eoir_cli.preprocess import (
    LUMIR_SHAPE,
    NetworkGrid,
    antialias_sigma,
    normalize_intensity,
    plan_grid,
    resample_affine,
)

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("warped.nii.gz", "disp.nii.gz", "warp_itk.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz",
                "metrics.json", "qc.png")
DONE_MARKER = "metrics.json"  # written last: its presence means the pair finished
BRAIN_MODELS = ("default", "lumir", "oasis")  # run on the LUMIR grid unless told otherwise
PRESET_SPACING = {"abdomen": 2.0}
BACKEND_NAMES = ("auto", "torch", "onnx", "tensorrt")


@dataclass
class RegistrationResult:
    """Everything one registration produced (arrays on the fixed image's native grid).

    Attributes:
        warped: ``(D, H, W)`` float32 moving image resampled onto the fixed grid.
        disp: ``(D, H, W, 3)`` float32 voxels: moving voxel index sampled minus fixed voxel index.
        warp_itk: ``(D, H, W, 3)`` float32 ITK displacement, LPS mm (see :mod:`eoir_cli.itk`).
        jacobian: ``(D, H, W)`` float32 determinant of the physical (mm -> mm) transform's Jacobian.
        warped_seg: ``(D, H, W)`` int32 warped moving labels (None without ``moving_seg``).
        affine: ``(4, 4)`` the affine pre-alignment ``T`` (fixed RAS mm -> moving RAS mm).
        network_disp: ``(3, d, h, w)`` float32 network (+ refine) displacement, network-grid voxels.
        grid: the network grid.
        metrics: what ``metrics.json`` holds.
        paths: output name -> path (empty without ``out_dir``).
    """

    warped: np.ndarray
    disp: np.ndarray
    warp_itk: np.ndarray
    jacobian: np.ndarray
    warped_seg: np.ndarray | None
    affine: np.ndarray
    network_disp: np.ndarray
    grid: NetworkGrid
    metrics: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)
    qc_png: bytes | None = None


class ModuleBackend:
    """Adapter running an in-memory EOIR module with the :class:`export.backends.Backend` interface."""

    name = "torch"

    def __init__(self, model: Any, device: str = "cpu", precision: str = "fp32") -> None:
        self.model = model.eval()
        self.device = str(next(model.parameters()).device) if device == "auto" else device
        self.model.to(self.device)
        self.precision = precision
        self.input_shape = None
        self.config = model.config
        info = getattr(model, "checkpoint_info", {}) or {}
        self.metadata = {"normalization": info.get("normalization"), "source": "module"}

    def __call__(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        import torch

        dev = torch.device(self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        m = torch.from_numpy(np.ascontiguousarray(moving, np.float32))[None, None].to(dev)
        f = torch.from_numpy(np.ascontiguousarray(fixed, np.float32))[None, None].to(dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            disp = self.model(m, f)
        return disp[0].float().cpu().numpy()


def open_backend(model: Any = "default", backend: str = "auto", device: str = "auto", precision: str = "fp32") -> Any:
    """Open a model once (for one or many pairs).

    Args:
        model: ``"default"``, a preset name, a ``.pt``/``.pth``/``.safetensors``/``.onnx``/``.engine``
            path, an ``EOIR`` module, or an already opened backend.
        backend: ``"auto"`` (by suffix) or the runtime the file must match.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (PyTorch; exported files carry their own).

    Raises:
        EoirError: unknown suffix, missing/corrupt/hostile file, backend mismatch, no GPU.
    """
    import torch

    if backend not in BACKEND_NAMES:
        raise EoirError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    if isinstance(model, torch.nn.Module):
        return ModuleBackend(model, "cpu" if device == "auto" else device, precision)
    if callable(model) and hasattr(model, "input_shape"):
        return model
    from eoir_cli.checkpoint import CheckpointError
    from eoir_cli.config import PRESETS
    from export.backends import backend_kind, load_backend

    name = str(model)
    kind = backend_kind(name)
    if backend != "auto" and backend != kind:
        raise EoirError(f"--backend {backend}: the model {name} is a {kind} model (by its suffix); "
                        f"export it with `eoir export` or use --backend auto")
    if name != "default" and name not in PRESETS and not Path(name).is_file():
        raise EoirError(f"model {name}: no such file (expected 'default', a preset {sorted(PRESETS)} or a model file)")
    if kind != "torch" and precision != "fp32":
        log.warning("--precision %s ignored: %s files carry their own precision", precision, kind)
    try:
        return load_backend(name, device=device, precision=precision)
    except CheckpointError as err:
        raise EoirError(str(err)) from None


def _model_name(model: Any) -> str:
    return model if isinstance(model, str) else Path(model).name if isinstance(model, os.PathLike) else "module"


def _grid_request(backend: Any, model: Any, spacing: float | Sequence[float] | None,
                  shape: Sequence[int] | None) -> tuple[Any, tuple[int, ...] | None, tuple[int, int, int]]:
    """Spacing (mm), shape (or None = fit) and size multiple of the network grid."""
    config = backend.config
    meta = getattr(backend, "metadata", {}) or {}
    name = _model_name(model)
    if shape is None:
        shape = backend.input_shape or (LUMIR_SHAPE if name in BRAIN_MODELS else None)
    if spacing is None:
        spacing = meta.get("spacing") or PRESET_SPACING.get(name, 1.0)
    scale = config.input_scale
    multiple = tuple(int(math.ceil(m / scale)) for m in config.size_multiple())
    return spacing, (tuple(int(s) for s in shape) if shape is not None else None), multiple  # type: ignore[return-value]


def _as_volume(x: Volume | str | os.PathLike[str] | None, kind: str, what: str) -> Volume | None:
    if x is None or isinstance(x, Volume):
        return x
    return load_volume(x, kind=kind, what=what)  # type: ignore[arg-type]


def _sample(volume: Any, index: Any, mode: str, padding: str) -> Any:
    """Sample ``(1, C, D, H, W)`` at continuous indices ``(3, n, h, w)`` (align_corners=True)."""
    import torch
    import torch.nn.functional as F

    size = volume.shape[2:]
    norm = [2 * index[a] / max(size[a] - 1, 1) - 1 for a in range(3)]
    grid = torch.stack(norm[::-1], dim=-1)[None].to(volume.dtype)
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)[0]


def _apply(matrix: np.ndarray, points: Any) -> Any:
    """Apply a 4×4 affine to ``(3, ...)`` torch points (in their dtype)."""
    import torch

    m = torch.from_numpy(matrix).to(points.dtype)
    return torch.einsum("ij,j...->i...", m[:3, :3], points) + m[:3, 3].reshape(3, *([1] * (points.dim() - 1)))


@dataclass
class _Native:
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
) -> _Native:
    """Compose every stage into the fixed-native -> moving-native voxel map and sample the outputs.

    Processes the fixed grid in slabs of ``slab`` planes along axis 0 so memory stays bounded for
    large scans. See the module docstring for the chain of maps.
    """
    import torch

    shape = fixed.shape
    to_net = np.linalg.inv(grid.affine) @ fixed.affine
    net_to_moving = np.linalg.inv(moving.affine) @ transform @ grid.affine
    physical = np.linalg.inv(moving.affine) @ fixed.affine  # scanner coordinates, no registration
    u = torch.from_numpy(np.ascontiguousarray(network_disp, np.float32))[None]
    mov = torch.from_numpy(np.ascontiguousarray(moving.data, np.float32))[None, None]
    mov01 = torch.from_numpy(np.ascontiguousarray(moving01, np.float32))[None, None]
    seg = torch.from_numpy(moving_seg.astype(np.float32))[None, None] if moving_seg is not None else None
    out = _Native(
        disp=np.empty(shape + (3,), np.float32), warp_itk=np.empty(shape + (3,), np.float32),
        warped=np.empty(shape, np.float32), before=np.empty(shape, np.float32),
        net_coords=np.empty((3,) + shape, np.float32),
        warped_seg=np.empty(shape, np.int32) if seg is not None else None,
        before_seg=np.empty(shape, np.int32) if seg is not None else None,
    )
    # float32 is ample: index error ~ 3e-5 voxels at 500 voxels from the origin.
    lps = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1, 1)
    axes = [torch.arange(s, dtype=torch.float32) for s in shape]
    for start in range(0, shape[0], slab):
        stop = min(start + slab, shape[0])
        idx = torch.stack(torch.meshgrid(axes[0][start:stop], axes[1], axes[2], indexing="ij"))
        x = _apply(to_net, idx)
        x = x + _sample(u, x, "bilinear", "border")
        j = _apply(net_to_moving, x)
        p = _apply(fixed.affine, idx)
        q = _apply(moving.affine, j)
        out.disp[start:stop] = (j - idx).permute(1, 2, 3, 0).numpy()
        out.warp_itk[start:stop] = ((q - p) * lps).permute(1, 2, 3, 0).numpy()
        out.net_coords[:, start:stop] = x.numpy()
        jf = j
        out.warped[start:stop] = _sample(mov, jf, "bilinear", "zeros")[0].numpy()
        j0 = _apply(physical, idx)
        out.before[start:stop] = _sample(mov01, j0, "bilinear", "zeros")[0].numpy()
        if seg is not None:
            out.warped_seg[start:stop] = _sample(seg, jf, "nearest", "zeros")[0].round().int().numpy()
            out.before_seg[start:stop] = _sample(seg, j0, "nearest", "zeros")[0].round().int().numpy()
    return out


def physical_jacobian(disp: np.ndarray, fixed_affine: np.ndarray, moving_affine: np.ndarray) -> np.ndarray:
    """Jacobian determinant of the mm -> mm transform from a native voxel field ``(D, H, W, 3)``.

    ``det(I + ∇disp)`` (central differences) times ``det(A_moving) / det(A_fixed)`` so that grids of
    different voxel size or handedness (RAS vs LPS arrays) give 1 for the identity.
    """
    import torch

    from eoir_cli.spatial import jacobian_determinant

    t = torch.from_numpy(np.ascontiguousarray(disp.transpose(3, 0, 1, 2)))[None]
    det = jacobian_determinant(t)[0].numpy()
    ratio = np.linalg.det(moving_affine[:3, :3]) / np.linalg.det(fixed_affine[:3, :3])
    return (det * ratio).astype(np.float32)


def _total_net_field(network_disp: np.ndarray, grid: NetworkGrid, transform: np.ndarray) -> np.ndarray:
    """The whole transform as a self-map of the network grid, ``(3, d, h, w)`` voxels (for NDV etc.)."""
    m = np.linalg.inv(grid.affine) @ transform @ grid.affine
    ident = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in grid.shape], indexing="ij"))
    moved = ident + network_disp
    out = np.einsum("ij,j...->i...", m[:3, :3].astype(np.float32), moved)
    out += m[:3, 3].astype(np.float32)[:, None, None, None]
    return (out - ident).astype(np.float32)


def _seg_metrics(before: np.ndarray, after: np.ndarray, fixed_seg: np.ndarray, moving_seg: np.ndarray,
                 spacing: Sequence[float], hd95: bool, labels: Sequence[int] | None = None) -> dict[str, Any]:
    from eoir_cli import metrics

    if labels is None:
        labels = sorted((set(np.unique(fixed_seg).tolist()) | set(np.unique(moving_seg).tolist())) - {0})
    labels = [int(v) for v in labels]
    out: dict[str, Any] = {"labels": labels}
    for tag, pred in (("before", before), ("after", after)):
        dice = metrics.dice_per_label(pred, fixed_seg, labels)
        out[f"dice_{tag}"] = {str(k): v for k, v in dice.items()}
        out[f"dice_{tag}_mean"] = float(np.mean(list(dice.values()))) if dice else float("nan")
        if hd95:
            hd = metrics.hd95_per_label(pred, fixed_seg, labels, spacing=tuple(spacing))
            finite = [v for v in hd.values() if np.isfinite(v)]
            out[f"hd95_{tag}"] = {str(k): v for k, v in hd.items()}
            out[f"hd95_{tag}_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def lumir_id(path: str | os.PathLike[str] | None) -> str:
    """The 4-digit subject id of a LUMIR-style name (``LUMIRMRI_3454_0000.nii.gz`` -> ``3454``)."""
    name = Path(str(path)).name if path is not None else "array"
    match = re.search(r"_(\d{4})_\d{4}\.nii(\.gz)?$", name) or re.search(r"(\d{4})(?!.*\d)", name)
    return match.group(1) if match else re.sub(r"\.nii(\.gz)?$", "", name)


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
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


def _check_outputs_are_not_inputs(out_dir: Path, inputs: Sequence[Volume | None], names: Sequence[str]) -> None:
    targets = {(out_dir / n).resolve() for n in names}
    for vol in inputs:
        if vol is not None and vol.path is not None and vol.path.resolve() in targets:
            raise EoirError(f"output folder {out_dir} would overwrite the input {vol.path}; choose another -o")


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = round(self.times.get(stage, 0.0) + time.perf_counter() - start, 4)


def register(
    fixed: Volume | str | os.PathLike[str],
    moving: Volume | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    model: Any = "default",
    backend: str = "auto",
    device: str = "auto",
    moving_seg: Volume | str | os.PathLike[str] | None = None,
    fixed_seg: Volume | str | os.PathLike[str] | None = None,
    affine: bool = True,
    refine: int | None = None,
    precision: str = "fp32",
    lumir: bool = False,
    *,
    spacing: float | Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    window: tuple[float, float] | None = None,
    refine_weight: float = PIPELINE.refine_weight,
    refine_lr: float = PIPELINE.refine_lr,
    refine_scale: float | None = None,
    refine_window: int = PIPELINE.refine_window,
    refine_int_steps: int = PIPELINE.refine_int_steps,
    hd95: bool = True,
    qc: bool = True,
    labels: Sequence[int] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` and (with ``out_dir``) write every output atomically.

    Args:
        fixed: fixed image (path or :class:`~eoir_cli.io.Volume`); outputs live on its grid.
        moving: moving image; any orientation, spacing and shape.
        out_dir: folder for the outputs (None: return arrays only). Files appear only after
            every computation succeeded; nothing partial is left behind on error.
        model: ``"default"``, a preset, a model file (``.pt``/``.pth``/``.safetensors``/``.onnx``/
            ``.engine``), an ``EOIR`` module or an opened backend (:func:`open_backend`).
        backend: ``"auto"``, ``"torch"``, ``"onnx"`` or ``"tensorrt"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        moving_seg: label map on the moving grid -> ``warped_seg.nii.gz`` (nearest neighbour).
        fixed_seg: label map on the fixed grid -> Dice/HD95 before and after in the metrics.
        affine: run the affine pre-alignment (else scanner coordinates are trusted as they are).
        refine: instance-optimisation steps after the network (0 = none; None = the pipeline
            default, ``eoir_cli.config.PIPELINE.refine``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for PyTorch models.
        lumir: the inputs are on the LUMIR grid (160×224×192, 1 mm); the network runs on the fixed
            grid as is and ``disp_<fixed id>_<moving id>.nii.gz`` is written too.
        spacing: network voxel size in mm (default: the model's, 1 mm for brain models).
        shape: network input size (default: the model's, else the fixed foreground rounded up).
        window: ``(low, high)`` intensity window (CT in HU) instead of 0.5/99.5 percentiles.
        refine_weight: smoothness weight of the refinement.
        refine_lr: Adam learning rate of the refinement (voxels per step).
        refine_scale: refinement grid / network grid (None: 1 up to 2 M voxels, else 1/2).
        refine_window: local NCC window of the refinement (voxels of its grid).
        refine_int_steps: scaling-and-squaring steps of the refinement.
        hd95: compute HD95 (slower) when both label maps are given.
        labels: label values scored by Dice/HD95 (default: every non-zero label in either map).
        qc: draw ``qc.png``.

    Returns:
        A :class:`RegistrationResult`.

    Raises:
        EoirError: any bad input (one line), before anything is written.
    """
    import torch

    timer = _Timer()
    t_start = time.perf_counter()
    with timer("load"):
        fixed_v = _as_volume(fixed, "image", "fixed")
        moving_v = _as_volume(moving, "image", "moving")
        mseg = _as_volume(moving_seg, "label", "moving-seg")
        fseg = _as_volume(fixed_seg, "label", "fixed-seg")
        assert fixed_v is not None and moving_v is not None
        if mseg is not None:
            check_same_grid(mseg, moving_v, "moving-seg")
        if fseg is not None:
            check_same_grid(fseg, fixed_v, "fixed-seg")
        if lumir:
            for what, vol in (("fixed", fixed_v), ("moving", moving_v)):
                if vol.shape != LUMIR_SHAPE:
                    raise EoirError(f"--lumir: expected {what} on the LUMIR grid {LUMIR_SHAPE}, got shape {vol.shape}")
        names = list(OUTPUT_NAMES)
        if lumir:
            names.append(f"disp_{lumir_id(fixed_v.path)}_{lumir_id(moving_v.path)}.nii.gz")
        if out_dir is not None:
            _check_outputs_are_not_inputs(Path(out_dir), [fixed_v, moving_v, mseg, fseg], names)
    if refine is None:
        refine = PIPELINE.refine
    if refine < 0:
        raise EoirError(f"refine: expected >= 0 steps, got {refine}")
    with timer("model"):
        net = open_backend(model, backend, device, precision)
    req_spacing, req_shape, multiple = _grid_request(net, model, spacing, shape)
    if lumir and net.input_shape is not None and tuple(net.input_shape) != LUMIR_SHAPE:
        raise EoirError(f"model {_model_name(model)} was built for input shape {tuple(net.input_shape)}, "
                        f"but --lumir inputs are {LUMIR_SHAPE}; export it for that shape or drop --lumir")

    with timer("preprocess"):
        fixed01 = normalize_intensity(fixed_v.data, window=window)
        moving01 = normalize_intensity(moving_v.data, window=window)
        if lumir:
            grid = NetworkGrid(shape=fixed_v.shape, affine=fixed_v.affine.copy())
        else:
            grid = plan_grid(fixed_v.affine, fixed_v.shape, fixed01, req_spacing, req_shape, multiple)
        from eoir_cli.spatial import check_size

        if net.input_shape is None:
            check_size(grid.shape, multiple, "network grid")
        fixed_net = resample_affine(fixed01, np.linalg.inv(fixed_v.affine) @ grid.affine, grid.shape,
                                    sigma=antialias_sigma(fixed_v.spacing, grid.spacing))
    with timer("affine"):
        from eoir_cli.affine import affine_align

        transform = affine_align(fixed_net, grid.affine, moving01, moving_v.affine,
                                 spacing=float(np.mean(grid.spacing)), optimize=affine) if affine else np.eye(4)
    with timer("preprocess"):
        moving_net = resample_affine(moving01, np.linalg.inv(moving_v.affine) @ transform @ grid.affine, grid.shape,
                                     sigma=antialias_sigma(moving_v.spacing, grid.spacing))
    with timer("network"):
        network_disp = np.asarray(net(moving_net, fixed_net), dtype=np.float32)
    if network_disp.shape != (3, *grid.shape):
        raise EoirError(f"model output: expected a displacement of shape {(3, *grid.shape)}, got {network_disp.shape}")
    with timer("refine"):
        if refine > 0:
            from eoir_cli.refine import refine as refine_fn

            dev = torch.device(net.device if str(net.device).startswith("cuda") else "cpu")

            def as_t(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a)).to(dev)[None]

            refined = refine_fn(as_t(fixed_net[None]), as_t(moving_net[None]), as_t(network_disp), refine,
                                lr=refine_lr, weight=refine_weight, scale=refine_scale, window=refine_window,
                                int_steps=refine_int_steps)
            network_disp = refined[0].cpu().numpy().astype(np.float32)
    with timer("compose"):
        native = compose_to_native(fixed_v, moving_v, grid, network_disp, transform, moving01,
                                   mseg.data if mseg is not None else None)
        jacobian = physical_jacobian(native.disp, fixed_v.affine, moving_v.affine)
    with timer("metrics"):
        from eoir_cli import metrics

        field_stats = metrics.field_metrics(_total_net_field(network_disp, grid, transform))
        seg_stats = (_seg_metrics(native.before_seg, native.warped_seg, fseg.data, mseg.data, fixed_v.spacing, hd95,
                                  labels)
                     if fseg is not None and mseg is not None and native.warped_seg is not None else None)
    png = None
    if qc:
        with timer("qc"):
            from eoir_cli.qc import render_qc

            warped01 = normalize_intensity(native.warped, window=window) if window else np.clip(
                (native.warped - float(np.percentile(moving_v.data, 0.5)))
                / max(float(np.percentile(moving_v.data, 99.5) - np.percentile(moving_v.data, 0.5)), 1e-12), 0, 1)
            png = render_qc(fixed01, native.before, warped01, native.net_coords, jacobian, fixed_v.affine)

    result_metrics: dict[str, Any] = {
        "fixed": str(fixed_v.path) if fixed_v.path else None,
        "moving": str(moving_v.path) if moving_v.path else None,
        "backend": getattr(net, "name", "torch"),
        "device": str(getattr(net, "device", "cpu")),
        "model": _model_name(model) if not isinstance(model, (str, os.PathLike)) else str(model),
        "precision": getattr(net, "precision", precision),
        "network_grid": {"shape": list(grid.shape), "spacing_mm": [round(s, 6) for s in grid.spacing],
                         "affine": np.round(grid.affine, 6).tolist()},
        "affine_ras": np.round(transform, 8).tolist(),
        "refine_steps": int(refine),
        "field": field_stats,
        "jacobian_native": {"min": float(jacobian.min()), "max": float(jacobian.max()),
                            "nonpositive_percent": float((jacobian <= 0).mean() * 100)},
    }
    if seg_stats is not None:
        result_metrics["segmentation"] = seg_stats
    result = RegistrationResult(
        warped=native.warped, disp=native.disp, warp_itk=native.warp_itk, jacobian=jacobian,
        warped_seg=native.warped_seg, affine=transform, network_disp=network_disp, grid=grid,
        metrics=result_metrics, qc_png=png,
    )
    if out_dir is not None:
        with timer("write"):
            result.paths = _write_outputs(Path(out_dir), result, fixed_v, mseg, names, lumir, timer, t_start)
    else:
        result_metrics["timings_s"] = dict(timer.times, total=round(time.perf_counter() - t_start, 4))
    return result


def _write_outputs(out_dir: Path, result: RegistrationResult, fixed: Volume, mseg: Volume | None,
                   names: list[str], lumir: bool, timer: _Timer, t_start: float) -> dict[str, Path]:
    from eoir_cli.fileio import write_json_atomic
    from eoir_cli.itk import save_itk_displacement

    paths: dict[str, Path] = {}
    with _staging(out_dir) as stage:
        hdr = fixed.header
        save_volume(stage / "warped.nii.gz", result.warped, fixed.affine, hdr, np.float32)
        save_volume(stage / "disp.nii.gz", result.disp, fixed.affine, hdr, np.float32)
        save_itk_displacement(stage / "warp_itk.nii.gz", result.warp_itk, fixed.affine, hdr)
        save_volume(stage / "jacobian.nii.gz", result.jacobian, fixed.affine, hdr, np.float32)
        if result.warped_seg is not None and mseg is not None:
            dtype = mseg.header.get_data_dtype() if mseg.header is not None else np.int32
            dtype = dtype if np.dtype(dtype).kind in "iu" else np.int32
            save_volume(stage / "warped_seg.nii.gz", result.warped_seg, fixed.affine, hdr, dtype)
        if lumir:
            shutil.copyfile(stage / "disp.nii.gz", stage / names[-1])
        if result.qc_png is not None:
            (stage / "qc.png").write_bytes(result.qc_png)
        result.metrics["timings_s"] = dict(timer.times, total=round(time.perf_counter() - t_start, 4))
        write_json_atomic(stage / DONE_MARKER, _jsonable(result.metrics))
        for name in names:
            src = stage / name
            if src.exists() and name != DONE_MARKER:
                os.replace(src, out_dir / name)
                paths[name] = out_dir / name
        os.replace(stage / DONE_MARKER, out_dir / DONE_MARKER)  # last: marks the pair finished
        paths[DONE_MARKER] = out_dir / DONE_MARKER
    return paths


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class Pair:
    """One registration job of a batch (paths absolute)."""

    fixed: Path
    moving: Path
    fixed_seg: Path | None = None
    moving_seg: Path | None = None
    name: str = ""


def _seg_beside(image: Path) -> Path | None:
    """LUMIR/Learn2Reg layout: the label map is the image path with ``images`` -> ``labels``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].startswith("images"):
            candidate = Path(*parts[:i], "labels" + parts[i][len("images"):], *parts[i + 1:])
            return candidate if candidate.is_file() else None
    return None


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a batch: ``pairs.csv`` (columns fixed, moving[, fixed_seg, moving_seg, name]; paths
    relative to the CSV) or a Learn2Reg ``dataset.json`` (``test`` or ``validation`` entries with
    ``fixed``/``moving``; paths beginning with ``/`` are under the JSON's folder; label maps are
    taken from ``labels*`` beside ``images*`` when present).

    Raises:
        EoirError: unreadable file, missing columns/keys or no pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise EoirError(f"--pairs {path}: no such file")
    root = path.parent
    rows: list[dict[str, str]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EoirError(f"--pairs {path}: not valid JSON ({err})") from None
        entries = None
        for key in ("test", "validation", "pairs", "eval_pairs"):
            candidate = data.get(key) if isinstance(data, dict) else None
            if isinstance(candidate, list) and candidate and all(
                    isinstance(e, dict) and "fixed" in e and "moving" in e for e in candidate):
                entries = candidate
                break
        if entries is None:
            raise EoirError(f"--pairs {path}: expected a list of {{'fixed', 'moving'}} entries under 'test', "
                            "'validation', 'pairs' or 'eval_pairs'")
        rows = [{k: str(v) for k, v in e.items()} for e in entries]
        auto_seg = True
    elif path.suffix.lower() == ".csv":
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
                fields = set(reader.fieldnames or [])
        except (UnicodeDecodeError, csv.Error) as err:
            raise EoirError(f"--pairs {path}: not a readable CSV ({err})") from None
        if not {"fixed", "moving"} <= {f.strip() for f in fields}:
            raise EoirError(f"--pairs {path}: expected a header with columns fixed,moving; got {sorted(fields)}")
        auto_seg = False
    else:
        raise EoirError(f"--pairs {path}: expected a .csv or .json file, got {path.suffix!r}")

    def resolve(p: str | None) -> Path | None:
        if not p:
            return None
        q = Path(p)
        if q.is_absolute() and not q.exists() and (root / p.lstrip("/")).exists():
            return root / p.lstrip("/")
        return q if q.is_absolute() else root / q

    pairs = []
    for r in rows:
        f, m = resolve(r.get("fixed")), resolve(r.get("moving"))
        assert f is not None and m is not None
        fseg, mseg = resolve(r.get("fixed_seg")), resolve(r.get("moving_seg"))
        if auto_seg:
            fseg, mseg = fseg or _seg_beside(f), mseg or _seg_beside(m)
        name = r.get("name") or f"{lumir_id(f)}_{lumir_id(m)}"
        pairs.append(Pair(f, m, fseg, mseg, re.sub(r"[^\w.-]", "_", name)))
    if not pairs:
        raise EoirError(f"--pairs {path}: no pairs found")
    return pairs


@dataclass
class PairOutcome:
    """Summary row of one batch pair."""

    name: str
    status: str  # "done", "skipped" (already finished) or "failed"
    seconds: float | None = None
    dice_before: float | None = None
    dice_after: float | None = None
    ndv_percent: float | None = None
    error: str | None = None


def _outcome_from_metrics(name: str, status: str, metrics: dict[str, Any]) -> PairOutcome:
    seg = metrics.get("segmentation") or {}
    return PairOutcome(name, status, (metrics.get("timings_s") or {}).get("total"), seg.get("dice_before_mean"),
                       seg.get("dice_after_mean"), (metrics.get("field") or {}).get("ndv_percent"))


def register_pairs(
    pairs: Sequence[Pair],
    out_dir: str | os.PathLike[str],
    model: Any = "default",
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    progress: Callable[[int, int, PairOutcome], None] | None = None,
    **options: Any,
) -> list[PairOutcome]:
    """Register many pairs with one loaded model, into ``out_dir/<pair name>/``.

    Pairs whose folder already holds ``metrics.json`` are skipped (the batch is resumable); a pair
    that fails is reported and the batch goes on. ``summary.csv`` is written to ``out_dir``.
    With ``lumir=True`` each ``disp_<fixed>_<moving>.nii.gz`` is also placed in ``out_dir`` itself
    (the flat layout a LUMIR submission expects).

    Args:
        options: forwarded to :func:`register` (``affine``, ``refine``, ``lumir``, ``spacing``, ...).
    """
    out = Path(out_dir)
    # Open the model once, and only when some pair is left to do; a model that cannot be opened
    # fails the whole batch (one line), not every pair in turn.
    todo = [not (out / p.name / DONE_MARKER).is_file() for p in pairs]
    net = open_backend(model, backend, device, precision) if any(todo) else None
    outcomes: list[PairOutcome] = []
    for n, pair in enumerate(pairs):
        pair_dir = out / pair.name
        if not todo[n]:
            try:
                outcome = _outcome_from_metrics(pair.name, "skipped", json.loads((pair_dir / DONE_MARKER).read_text()))
            except (json.JSONDecodeError, OSError):
                outcome = PairOutcome(pair.name, "skipped")
        else:
            try:
                result = register(pair.fixed, pair.moving, pair_dir, model=net, moving_seg=pair.moving_seg,
                                  fixed_seg=pair.fixed_seg, **options)
                if options.get("lumir"):
                    lumir_name = f"disp_{lumir_id(pair.fixed)}_{lumir_id(pair.moving)}.nii.gz"
                    _copy_atomic(result.paths[lumir_name], out / lumir_name)
                outcome = _outcome_from_metrics(pair.name, "done", result.metrics)
            except (EoirError, ValueError, OSError, RuntimeError) as err:
                text = str(err).strip()
                outcome = PairOutcome(pair.name, "failed", error=text.splitlines()[0] if text else type(err).__name__)
        outcomes.append(outcome)
        if progress is not None:
            progress(n + 1, len(pairs), outcome)
    _write_summary(out / "summary.csv", outcomes)
    return outcomes


def _copy_atomic(src: Path, dst: Path) -> None:
    from eoir_cli.fileio import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_summary(path: Path, outcomes: Sequence[PairOutcome]) -> None:
    import io

    from eoir_cli.fileio import write_text_atomic

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "status", "seconds", "dice_before", "dice_after", "ndv_percent", "error"])
    for o in outcomes:
        writer.writerow([o.name, o.status, o.seconds, o.dice_before, o.dice_after, o.ndv_percent, o.error or ""])
    write_text_atomic(path, buf.getvalue())
