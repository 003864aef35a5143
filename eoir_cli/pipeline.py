"""Register two NIfTI scans end to end: the pipeline behind ``eoir register`` and :func:`register`
(``from eoir_cli import register``; the module is not called ``register`` so that name stays the function).

Pipeline: load and validate -> intensities to [0, 1] -> the network grid (fixed image's closest
canonical orientation at the model spacing, cropped/padded around the foreground) -> affine
pre-alignment of moving to fixed (optional) -> moving resampled onto the network grid through the
affine -> the network (:func:`eoir_cli.inference.run_pair`) -> instance optimisation (``refine``
steps, optional) -> everything composed into ONE map from every fixed native voxel to a continuous
moving native voxel index (:mod:`eoir_cli.composition`, where the chain of maps is written out),
from which all outputs are computed and written (:mod:`eoir_cli.outputs`). Batches:
:mod:`eoir_cli.batch`; opening a model: :func:`eoir_cli.backends.open_backend`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from eoir_cli.config import LUMIR_SHAPE, PIPELINE
from eoir_cli.deployment import Deployment, Normalization, assumed_deployment, intensity_bounds, normalize
from eoir_cli.errors import EoirError
from eoir_cli.io import Volume, check_same_grid, load_volume
from eoir_cli.outputs import (
    OUTPUT_NAMES,
    EarlyWriter,
    RegistrationResult,
    check_output_folder,
    check_outputs_are_not_inputs,
    clean_stale_staging,
    write_outputs,
)
from eoir_cli.preprocess import (
    FOREGROUND,
    NetworkGrid,
    antialias_sigma,
    foreground_outside_grid,
    plan_grid,
    resample_affine,
)

log = logging.getLogger(__name__)



class DomainMismatch(EoirError):
    """The images are not of the kind the model was trained on (e.g. CT given to a brain MRI model)."""


def _model_name(model: Any) -> str:
    return model if isinstance(model, str) else Path(model).name if isinstance(model, os.PathLike) else "module"


def _grid_request(backend: Any, facts: Deployment, spacing: float | Sequence[float] | None,
                  shape: Sequence[int] | None,
                  fit_grid: bool) -> tuple[Any, tuple[int, ...] | None, tuple[int, int, int]]:
    """Spacing (mm; None = the fixed image's), shape (None = fit) and size multiple of the network grid.

    Read from the model's deployment facts; ``spacing``/``shape`` override them, ``fit_grid`` fits
    the grid to the image instead of the trained grid (a file exported for one shape keeps it).
    """
    config = backend.config
    if shape is None:
        shape = backend.input_shape or (None if fit_grid else facts.grid)
    if spacing is None:
        spacing = facts.spacing
    scale = config.input_scale
    multiple = tuple(int(math.ceil(m / scale)) for m in config.size_multiple())
    return spacing, (tuple(int(s) for s in shape) if shape is not None else None), multiple  # type: ignore[return-value]


def _check_domain(facts: Deployment, volumes: Sequence[Volume]) -> None:
    """Refuse images of another modality than the model's (a CT given to an MRI model and vice versa)."""
    from eoir_cli.deployment import image_modality

    expected = facts.modality
    if expected is None:
        return
    for vol in volumes:
        seen = image_modality(vol.data)
        if seen is not None and seen != expected:
            what = (f"looks like CT (values down to {float(np.min(vol.data)):.0f}, Hounsfield units)"
                    if seen == "CT" else "has no negative intensities (not CT in Hounsfield units)")
            raise DomainMismatch(f"the model was trained on {facts.domain}, but {vol.name} {what}")


def _as_volume(x: Volume | str | os.PathLike[str] | None, kind: str, what: str) -> Volume | None:
    if x is None or isinstance(x, Volume):
        return x
    return load_volume(x, kind=kind, what=what)  # type: ignore[arg-type]


class _LabelMaps:
    """The moving and fixed label maps (paths, volumes or None), files read on a thread from construction.

    ``sources`` are what the caller gave (for the output-folder check); :meth:`get` waits for the
    volumes and raises their reading errors (one line, as :func:`load_volume` words them).
    """

    def __init__(self, moving_seg: Volume | str | os.PathLike[str] | None,
                 fixed_seg: Volume | str | os.PathLike[str] | None) -> None:
        self.sources = [moving_seg, fixed_seg]
        self._args = ((moving_seg, "moving-seg"), (fixed_seg, "fixed-seg"))
        self._future = None
        if any(x is not None and not isinstance(x, Volume) for x, _ in self._args):
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(1, thread_name_prefix="eoir-labels")
            self._future = pool.submit(self._read)
            pool.shutdown(wait=False)

    def _read(self) -> tuple[Volume | None, Volume | None]:
        moving, fixed = (_as_volume(x, "label", what) for x, what in self._args)
        return moving, fixed

    def get(self) -> tuple[Volume | None, Volume | None]:
        return self._future.result() if self._future is not None else self._read()


def _seg_metrics(before: np.ndarray, after: np.ndarray, fixed_seg: np.ndarray, moving_seg: np.ndarray,
                 spacing: Sequence[float], hd95: bool, labels: Sequence[int] | None = None) -> dict[str, Any]:
    from eoir_cli import metrics

    labels = metrics.scored_labels(fixed_seg, moving_seg, labels)
    out: dict[str, Any] = {"labels": labels}
    dices = metrics.dice_per_label_each([before, after], fixed_seg, labels)
    for tag, pred, dice in (("before", before, dices[0]), ("after", after, dices[1])):
        out[f"dice_{tag}"] = {str(k): v for k, v in dice.items()}
        out[f"dice_{tag}_mean"] = float(np.mean(list(dice.values()))) if dice else float("nan")
        if hd95:
            hd = metrics.hd95_per_label(pred, fixed_seg, labels, spacing=tuple(spacing))
            finite = [v for v in hd.values() if np.isfinite(v)]
            out[f"hd95_{tag}"] = {str(k): v for k, v in hd.items()}
            out[f"hd95_{tag}_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


StageCallback = Callable[[str, float], None]


class _Timer:
    """Seconds per stage (summed when a stage is entered twice); ``progress(stage, seconds)`` is
    called as each stage finishes, so a caller can show the stages live."""

    def __init__(self, progress: StageCallback | None = None) -> None:
        self.times: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.times[stage] = round(self.times.get(stage, 0.0) + seconds, 4)
        if self.progress is not None:
            self.progress(stage, seconds)


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
    normalization: Normalization | str | None = None,
    fit_grid: bool = False,
    allow_mismatch: bool = False,
    refine_weight: float = PIPELINE.refine_weight,
    refine_lr: float = PIPELINE.refine_lr,
    refine_scale: float | None = None,
    refine_window: int = PIPELINE.refine_window,
    refine_int_steps: int = PIPELINE.refine_int_steps,
    refine_coarse: int = PIPELINE.refine_coarse,
    refine_search_int_steps: int | None = PIPELINE.refine_search_int_steps,
    refine_sigma: float = PIPELINE.refine_sigma,
    inverse_fit: int = PIPELINE.inverse_fit,
    hd95: bool = True,
    qc: bool = True,
    labels: Sequence[int] | None = None,
    inverse: bool | None = None,
    outputs: str | Sequence[str] | None = None,
    progress: StageCallback | None = None,
    write_later: bool = False,
    overwrite: bool = False,
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
        spacing: network voxel size in mm (default: the model's, from its deployment facts).
        shape: network input size (default: the model's trained grid, else the fixed foreground
            rounded up to a size the network takes).
        window: ``(low, high)`` intensity window (CT in HU) instead of the model's normalisation.
        normalization: intensity normalisation (a :class:`~eoir_cli.deployment.Normalization` or an
            alias) instead of the model's.
        fit_grid: size the network grid to the fixed image instead of the model's trained grid
            (when the trained grid does not cover the field of view).
        allow_mismatch: run even when the images are not of the model's domain (e.g. CT given to a
            brain MRI model), which is otherwise refused.
        refine_weight: smoothness weight of the refinement.
        refine_lr: Adam learning rate of the refinement (voxels per step).
        refine_scale: refinement grid / network grid (None: 1 up to 2 M voxels, else 1/2).
        refine_window: local NCC window of the refinement (voxels of its grid).
        refine_int_steps: scaling-and-squaring steps of the refinement.
        refine_coarse: refinement steps at half the refinement scale first (coarse to fine; large
            grids only, see :func:`eoir_cli.refine.refine`).
        refine_search_int_steps: squaring steps inside the refinement's optimisation (the result
            is integrated with ``refine_int_steps``; see :func:`eoir_cli.refine.refine`).
        refine_sigma: Gaussian (voxels of each refinement level) through which the refinement's
            updates pass (0 = none; see :func:`eoir_cli.refine.refine`).
        inverse_fit: least-squares steps fitting the inverse between moving voxels (0 = Newton's
            field, exact at the voxels only; see :func:`eoir_cli.inverse.fit_inverse`).
        hd95: compute HD95 (slower) when both label maps are given.
        labels: label values scored by Dice/HD95 (default: every non-zero label in either map;
            see :func:`eoir_cli.metrics.scored_labels`).
        qc: draw ``qc.png`` (when ``outputs`` includes it).
        outputs: the outputs to write, a subset of :data:`eoir_cli.outputs.OUTPUT_KINDS`
            (``"warped,disp"`` or a sequence; None = all of them; ``metrics.json`` always). Outputs
            not asked for are not computed where that saves time (the Jacobian, the QC picture).
        progress: called as ``progress(stage, seconds)`` when each stage finishes.
        write_later: with ``out_dir``, do not write yet: ``result.write()`` writes (and returns the
            paths), e.g. on another thread while the next pair of a batch is computed.
        inverse: True adds the ``inverse`` output (the inverse transform, ``inverse_*.nii.gz`` on the
            moving grid, and its inverse consistency in ``metrics.json``), False removes it, None
            leaves ``outputs`` as it is (the default outputs leave it out).
        overwrite: replace the results of an earlier registration in ``out_dir`` (else refused
            before any computation).

    Returns:
        A :class:`RegistrationResult`.

    Raises:
        EoirError: any bad input (one line), before anything is written.
    """
    import torch

    from eoir_cli.outputs import parse_outputs, with_inverse

    chosen = with_inverse(parse_outputs(outputs), inverse)
    qc = qc and "qc" in chosen
    want_jacobian = "jacobian" in chosen or qc
    timer = _Timer(progress)
    t_start = time.perf_counter()
    with timer("load"):
        fixed_v = _as_volume(fixed, "image", "fixed")
        moving_v = _as_volume(moving, "image", "moving")
        assert fixed_v is not None and moving_v is not None
        # The label maps are read on a thread while the images are normalised and the affine is fitted
        # (one core is idle then); their errors are raised before the network runs (_LabelMaps.get).
        label_maps = _LabelMaps(moving_seg, fixed_seg)
        if lumir:
            for what, vol in (("fixed", fixed_v), ("moving", moving_v)):
                if vol.shape != LUMIR_SHAPE:
                    raise EoirError(f"--lumir: expected {what} on the LUMIR grid {LUMIR_SHAPE}, got shape {vol.shape}")
        names = list(OUTPUT_NAMES)
        if lumir:
            from eoir_cli.data.datasets import case_id

            ids = [case_id(v.path) if v.path is not None else "array" for v in (fixed_v, moving_v)]
            names.append(f"disp_{ids[0]}_{ids[1]}.nii.gz")
        if out_dir is not None:
            check_outputs_are_not_inputs(Path(out_dir), [fixed_v, moving_v, *label_maps.sources], names)
            check_output_folder(out_dir, names, overwrite)
            clean_stale_staging(out_dir)
    if refine is None:
        refine = PIPELINE.refine
    if refine < 0:
        raise EoirError(f"refine: expected >= 0 steps, got {refine}")
    if not 0 <= refine_sigma <= PIPELINE.refine_sigma_max:
        raise EoirError(f"refine-sigma: expected 0 to {PIPELINE.refine_sigma_max:g} voxels, got {refine_sigma:g}")
    if inverse_fit < 0:
        raise EoirError(f"inverse_fit: expected >= 0 steps, got {inverse_fit}")
    with timer("model"):
        from eoir_cli.backends import open_backend

        net = open_backend(model, backend, device, precision)
    facts: Deployment = getattr(net, "deployment", None) or assumed_deployment(None)
    if not allow_mismatch:
        _check_domain(facts, [fixed_v, moving_v])
    norm = (Normalization.window_of(*window) if window is not None
            else Normalization.parse(normalization) if normalization is not None else facts.normalization)
    req_spacing, req_shape, multiple = _grid_request(net, facts, spacing, shape, fit_grid)
    if lumir and net.input_shape is not None and tuple(net.input_shape) != LUMIR_SHAPE:
        raise EoirError(f"model {_model_name(model)} was built for input shape {tuple(net.input_shape)}, "
                        f"but --lumir inputs are {LUMIR_SHAPE}; export it for that shape or drop --lumir")

    with timer("preprocess"):
        fixed01 = normalize(fixed_v.data, norm)
        moving_bounds = intensity_bounds(moving_v.data, norm)  # also the contrast of the warped image in qc.png
        moving01 = normalize(moving_v.data, norm, bounds=moving_bounds)
        warnings: list[str] = []
        if lumir:
            grid = NetworkGrid(shape=fixed_v.shape, affine=fixed_v.affine.copy())
        else:
            grid = plan_grid(fixed_v.affine, fixed_v.shape, fixed01, req_spacing, req_shape, multiple)
            outside = foreground_outside_grid(grid, fixed_v.affine, fixed01)
            if outside is not None:
                warnings.append(
                    f"the network grid ({'×'.join(f'{v:g}' for v in outside[1])} mm) does not cover the fixed "
                    f"image's foreground ({'×'.join(f'{v:g}' for v in outside[0])} mm along the grid axes): outside "
                    "the grid the deformation is extended from its border; fit_grid=True (--fit-grid) sizes the "
                    "grid to the image")
                log.warning("%s", warnings[-1])
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
    with timer("load"):
        mseg, fseg = label_maps.get()
        if mseg is not None:
            check_same_grid(mseg, moving_v, "moving-seg")
        if fseg is not None:
            check_same_grid(fseg, fixed_v, "fixed-seg")
    with timer("network"):
        from eoir_cli.inference import run_pair

        network_disp = run_pair(net, moving_net, fixed_net)
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
                                int_steps=refine_int_steps, coarse_steps=refine_coarse,
                                search_int_steps=refine_search_int_steps, sigma=refine_sigma)
            network_disp = refined[0].cpu().numpy().astype(np.float32, copy=False)
    with timer("compose"):
        from eoir_cli.composition import compose_to_native
        from eoir_cli.coords import physical_jacobian
        from eoir_cli.qc import apply_window, display_window

        # qc.png shows CT in a soft-tissue window (the network's normalisation spans air to bone).
        shown_window = display_window(fixed_v.data) if qc else None
        moving_shown = apply_window(moving_v.data, shown_window) if shown_window else moving01
        native = compose_to_native(fixed_v, moving_v, grid, network_disp, transform, moving_shown,
                                   mseg.data if mseg is not None else None)
        jacobian = physical_jacobian(native.disp, fixed_v.affine, moving_v.affine) if want_jacobian else None
    inverse_maps = inversion = fixed_fg = None
    if "inverse" in chosen:
        with timer("inverse"):
            from eoir_cli.composition import compose_inverse_to_native
            from eoir_cli.inverse import invert_disp

            inversion = invert_disp(torch.from_numpy(network_disp)[None])
            fixed_fg = fixed01 > FOREGROUND  # the fit's samples, and where its consistency is scored
            inverse_maps = compose_inverse_to_native(fixed_v, moving_v, grid, network_disp,
                                                     inversion.inverse[0].numpy(), transform, forward=native.disp,
                                                     fit_mask=fixed_fg, fit_iterations=inverse_fit)
    result = RegistrationResult(
        warped=native.warped, disp=native.disp, warp_itk=native.warp_itk, jacobian=jacobian,
        warped_seg=native.warped_seg, affine=transform, network_disp=network_disp, grid=grid,
        metrics={}, qc_png=None,
        inverse_warped=inverse_maps.warped if inverse_maps is not None else None,
        inverse_disp=inverse_maps.disp if inverse_maps is not None else None,
        inverse_warp_itk=inverse_maps.warp_itk if inverse_maps is not None else None,
    )

    def stamp_timings() -> None:
        result.metrics["timings_s"] = dict(timer.times, total=round(time.perf_counter() - t_start, 4))

    def write(ready: Callable[[], None] | None = None) -> dict[str, Path]:
        assert out_dir is not None
        result.paths = write_outputs(Path(out_dir), result, fixed_v, mseg, names, lumir, stamp_timings, moving_v,
                                     chosen, ready=ready)
        return result.paths

    # One registration writes its images and fields while the metrics and the picture are computed
    # (a batch overlaps all of its writing with the next pair instead: write_later).
    early = EarlyWriter(write) if out_dir is not None and not write_later else None
    try:
        with timer("metrics"):
            from eoir_cli import metrics

            # The whole transform x -> M·(x + u(x)) on the network grid (M: the affine in network voxels):
            # its determinants are det(M) times those of u, so the total field is never built.
            linear = (np.linalg.inv(grid.affine) @ transform @ grid.affine)[:3, :3]
            field_stats = metrics.field_metrics(network_disp, linear=linear)
            seg_stats = (_seg_metrics(native.before_seg, native.warped_seg, fseg.data, mseg.data, fixed_v.spacing, hd95,
                                      labels)
                         if fseg is not None and mseg is not None and native.warped_seg is not None else None)
            if inverse_maps is not None and inversion is not None and fixed_fg is not None:
                # Foreground as the network grid's planning sees it (preprocess.FOREGROUND).
                consistency = metrics.inverse_consistency(native.disp, fixed_v.affine, fixed_fg,
                                                          inverse_maps.disp, moving_v.affine, moving01 > FOREGROUND)
                consistency["method"] = "newton + least-squares fit between voxels" if inverse_fit else "newton"
                consistency["iterations"] = inversion.iterations
        png = None
        if qc:
            with timer("qc"):
                from eoir_cli.qc import render_qc

                if shown_window:
                    fixed_shown, warped_shown = (apply_window(v, shown_window) for v in (fixed_v.data, native.warped))
                else:  # the moving image's contrast
                    fixed_shown, warped_shown = fixed01, normalize(native.warped, norm, bounds=moving_bounds)
                notes = [f"NDV {field_stats['ndv_percent']:.4f} %",
                         f"det J <= 0: {field_stats['jac_nonpos_percent']:.4f} %",
                         f"network grid {'x'.join(map(str, grid.shape))} at {float(np.mean(grid.spacing)):g} mm"]
                if shown_window:
                    notes.append(f"CT shown at {shown_window[0]:g}..{shown_window[1]:g} HU")
                dice = ((seg_stats["dice_before_mean"], seg_stats["dice_after_mean"], len(seg_stats["labels"]))
                        if seg_stats else None)
                png = render_qc(fixed_shown, native.before, warped_shown, native.net_coords, jacobian, fixed_v.affine,
                                fixed_name=fixed_v.path.name if fixed_v.path else None,
                                moving_name=moving_v.path.name if moving_v.path else None, dice=dice, notes=notes)

        result_metrics: dict[str, Any] = {
            "fixed": str(fixed_v.path) if fixed_v.path else None,
            "moving": str(moving_v.path) if moving_v.path else None,
            "backend": getattr(net, "name", "torch"),
            "device": str(getattr(net, "device", "cpu")),
            "model": _model_name(model) if not isinstance(model, (str, os.PathLike)) else str(model),
            "precision": getattr(net, "precision", precision),
            "network_grid": {"shape": list(grid.shape), "spacing_mm": [round(s, 6) for s in grid.spacing],
                             "affine": np.round(grid.affine, 6).tolist()},
            "deployment": {**facts.to_dict(), "source": facts.source, "normalization_used": norm.to_dict()},
            "warnings": warnings,
            "affine_ras": np.round(transform, 8).tolist(),
            "refine_steps": int(refine),
            "refine_coarse_steps": int(refine_coarse) if refine > 0 else 0,
            "refine_sigma": float(refine_sigma) if refine > 0 else 0.0,
            "field": {**field_stats, "grid": "network grid: the whole transform (affine + network + refine) as a "
                                             "self-map of the network grid, interior voxels"},
        }
        if jacobian is not None:
            result_metrics["jacobian_native"] = {
                "min": float(jacobian.min()), "max": float(jacobian.max()),
                "nonpositive_percent": float((jacobian <= 0).mean() * 100),
                "grid": "fixed image's native grid: the physical (mm -> mm) Jacobian of jacobian.nii.gz"}
        if seg_stats is not None:
            result_metrics["segmentation"] = seg_stats
        if inverse_maps is not None:
            result_metrics["inverse_consistency"] = consistency
        result.metrics.update(result_metrics)
        result.qc_png = png
    except BaseException:
        if early is not None:
            early.abandon()
        raise
    if out_dir is None:
        stamp_timings()
    elif early is not None:
        with timer("write"):
            early.release()
    else:
        def write_now() -> dict[str, Path]:
            with timer("write"):
                return write()

        result.write = write_now
    return result
