"""PyTorch -> ONNX: the one EOIR model, exported with a warp that every runtime can run.

The model is built unchanged (:class:`eoir_cli.model.EOIR`); only its *sampler* differs: every
warp goes through one ``torch.library`` custom op, ``eoir::warp(image, disp, mode)``, which runs
the PyTorch gather sampler eagerly and has its own ONNX translation:

* ``gather`` (default): sampling grids built at run time from ``Range`` over the input's shape (no
  identity-grid constants: a 160×224×192 grid alone would be 80 MB), ``Floor``, clamp in float,
  ``Cast`` to int32, int32 flat-index arithmetic and one ``Gather(axis=1)`` per corner on the
  ``(C, D·H·W)`` flattened image, weighted and accumulated. Memory O(C·P); no GridSample node, so
  TensorRT 10.x and every onnxruntime build parse and run it.
* ``native``: opset-20 ``GridSample`` (5-D, ``linear``, ``align_corners=1``, zeros padding) for
  onnxruntime CPU and TensorRT >= 11.2.

Exported tensors: inputs ``moving``, ``fixed`` ``(1, 1, D, H, W)`` float in [0, 1]; output
``disp`` ``(1, 3, D, H, W)`` float, voxels, channel c along array axis c (see
:mod:`eoir_cli.spatial`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eoir_cli.bench import smooth_pair
from eoir_cli.config import LUMIR_SHAPE
from eoir_cli.deployment import deployment_of, normalize
from eoir_cli.errors import EoirError
from eoir_cli.metadata import INPUT_NAMES, OUTPUT_NAME, build_metadata, normalization_of

log = logging.getLogger(__name__)

ExportSampler = Literal["gather", "native"]
EXPORT_SAMPLERS = ("gather", "native")
DEFAULT_OPSET = {"gather": 18, "native": 20}
MIN_OPSET = {"gather": 18, "native": 20}
VERIFY_TOLERANCE_FP16 = 0.5  # voxels: fp16 exports are checked for sanity, not bit-parity
# fp32 verification (see verification_bounds): the export may differ from PyTorch by SPREAD_FACTOR times
# what two equally valid float32 PyTorch evaluations differ by, within [floor, cap] voxels. onnxruntime's
# difference was measured at 1-2x that spread up to 96x112x96 and ~10x at 160x224x192 (C=32): 100 leaves 10x room.
SPREAD_FACTOR = 100.0
VERIFY_MAX_BOUNDS = (1e-3, 0.1)  # voxels, max |Δdisp|
VERIFY_MEAN_CAP = 0.01  # voxels, mean |Δdisp|


# Channels per gather chunk in the exported warp (see _onnx_translations).
WARP_CHUNK = 8


class ExportError(EoirError):
    """An export that cannot be done or that failed its verification."""


# ---------------------------------------------------------------------------------------------
# The custom op: one node per warp in the exported graph, one translation per sampler.
# ---------------------------------------------------------------------------------------------

_OP_DEFINED = False


def _define_warp_op() -> None:
    """Register ``eoir::warp`` with torch.library (once per process)."""
    global _OP_DEFINED
    if _OP_DEFINED:
        return
    import torch

    from eoir_cli.spatial import sample_gather

    # from __future__ annotations are strings, so the schema is spelled out.
    @torch.library.custom_op("eoir::warp", mutates_args=(), schema="(Tensor image, Tensor disp, str mode) -> Tensor")
    def warp_op(image: torch.Tensor, disp: torch.Tensor, mode: str) -> torch.Tensor:
        return sample_gather(image, disp, mode)

    @warp_op.register_fake
    def _(image: torch.Tensor, disp: torch.Tensor, mode: str) -> torch.Tensor:
        return image.new_empty((image.shape[0], image.shape[1], *disp.shape[2:]))

    _OP_DEFINED = True


def export_sampler(image: Any, disp: Any, mode: str) -> Any:
    """Sampler callable for :class:`eoir_cli.model.EOIR`: routes every warp through ``eoir::warp``."""
    import torch

    return torch.ops.eoir.warp(image, disp, mode)


def _onnx_translations(sampler: ExportSampler) -> dict[Any, Any]:
    """``custom_translation_table`` for the dynamo exporter: ``eoir::warp`` -> gather graph or GridSample.

    Static sizes become small constants (1-D index ramps, scalars); symbolic sizes (``--dynamic``)
    are read from ``Shape`` at run time. Either way no ``(D, H, W)`` grid is stored in the file.
    """
    import torch
    from onnx import helper as onnx_helper
    from onnx import numpy_helper
    from onnxscript import opset18 as op
    from onnxscript import opset20

    def const(value: Any, dtype: Any) -> Any:
        return op.Constant(value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def like(x: Any, target: Any) -> Any:
        """``CastLike`` only where the dtypes differ (no no-op Cast nodes in the graph)."""
        return x if x.dtype is not None and x.dtype == target.dtype else op.CastLike(x, target)

    def spatial(x: Any) -> list[int | None]:
        dims = list(x.shape)[2:] if x.shape is not None else [None] * 3
        return [d if isinstance(d, int) else None for d in dims]

    def size_of(x: Any, axis: int, dims: list[int | None], dtype: Any) -> Any:
        """Size of spatial ``axis`` as a scalar of ``dtype``: a constant when static."""
        if dims[axis] is not None:
            return const(dims[axis], dtype)
        n = op.Gather(op.Shape(x), const(axis + 2, np.int64), axis=0)
        return op.Cast(n, to=onnx_helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def coords(disp: Any, axis: int) -> Any:
        """Voxel coordinate ``index + disp[:, axis]`` along ``axis`` at every output voxel, ``(1, d, h, w)``."""
        dims = spatial(disp)
        shape = [1, 1, 1]
        shape[axis] = -1
        if dims[axis] is not None:
            ramp = const(np.arange(dims[axis], dtype=np.float32).reshape([-1 if s == -1 else 1 for s in shape]),
                         np.float32)
        else:
            ramp = op.Reshape(op.Range(const(0.0, np.float32), size_of(disp, axis, dims, np.float32),
                                       const(1.0, np.float32)), const(shape, np.int64))
        comp = op.Slice(disp, const([axis], np.int64), const([axis + 1], np.int64), const([1], np.int64))
        return op.Add(op.Squeeze(comp, const([0], np.int64)), like(ramp, disp))

    def warp_gather(image: Any, disp: Any, mode: str) -> Any:
        dims = spatial(image)
        # int32 strides: flat index z*H*W + y*W + x fits int32 below 2^31 voxels.
        h32, w32 = size_of(image, 1, dims, np.int32), size_of(image, 2, dims, np.int32)
        if dims[1] is not None and dims[2] is not None:
            strides = [const(dims[1] * dims[2], np.int32), w32, None]
        else:
            strides = [op.Mul(h32, w32), w32, None]
        flat = op.Reshape(op.Squeeze(image, const([0], np.int64)), const([0, -1], np.int64))  # (C, D*H*W)
        zero, one = like(const(0.0, np.float32), disp), like(const(1.0, np.float32), disp)
        corners = []
        for axis in range(3):
            coord = op.Reshape(coords(disp, axis), const([-1], np.int64))  # (P,)
            hi = like(op.Sub(size_of(image, axis, dims, np.float32), const(1.0, np.float32)), disp)
            if mode == "nearest":
                pos_weights = [(op.Round(coord), None)]
            else:
                lo = op.Floor(coord)
                frac = op.Sub(coord, lo)
                pos_weights = [(lo, op.Sub(one, frac)), (op.Add(lo, one), frac)]
            terms = []
            for pos, weight in pos_weights:
                # Clamp in float before the int cast so far-away samples cannot overflow int32;
                # a corner is inside exactly when clamping left it unchanged.
                clamped = op.Clip(pos, zero, hi)
                inside = op.Equal(clamped, pos)
                index = op.Cast(clamped, to=6)
                if strides[axis] is not None:
                    index = op.Mul(index, strides[axis])
                terms.append((index, op.Where(inside, one if weight is None else weight, zero)))
            corners.append(terms)
        taps = []
        for iz, wz in corners[0]:
            for iy, wy in corners[1]:
                izy, wzy = op.Add(iz, iy), op.Mul(wz, wy)
                for ix, wx in corners[2]:
                    taps.append((izy if ix is None else op.Add(izy, ix), like(op.Mul(wzy, wx), image)))
        channels = image.shape[1] if image.shape is not None and isinstance(image.shape[1], int) else None
        # Warp a few channels at a time: the runtime then holds each corner's (chunk, P) gather, product
        # and running sum instead of three (C, P) buffers (at C=32, 160x224x192: 2.6 GB -> 0.7 GB).
        parts = []
        for start in range(0, channels or 1, WARP_CHUNK if channels else 1):
            rows = flat if not channels or channels <= WARP_CHUNK else op.Slice(
                flat, const([start], np.int64), const([min(start + WARP_CHUNK, channels)], np.int64),
                const([0], np.int64))
            acc = None
            for index, weight in taps:
                term = op.Mul(op.Gather(rows, index, axis=1), weight)
                acc = term if acc is None else op.Add(acc, term)
            parts.append(acc)
            if rows is flat:
                break
        acc = parts[0] if len(parts) == 1 else op.Concat(*parts, axis=0)
        out_dims = spatial(disp)
        if all(d is not None for d in out_dims) and image.shape is not None and isinstance(image.shape[1], int):
            out_shape = const([1, image.shape[1], *out_dims], np.int64)
        else:
            out_shape = op.Concat(const([1], np.int64), op.Slice(op.Shape(image), const([1], np.int64),
                                                                  const([2], np.int64)),
                                  op.Slice(op.Shape(disp), const([2], np.int64), const([5], np.int64)), axis=0)
        return op.Reshape(acc, out_shape)

    def warp_native(image: Any, disp: Any, mode: str) -> Any:
        dims = spatial(image)
        comps = []
        for axis in range(3):
            if dims[axis] is not None:
                # align_corners=True: voxel 0 -> -1, voxel n-1 -> +1 (max(n-1, 1) guards size-1 axes).
                scale = const(2.0 / max(dims[axis] - 1, 1), np.float32)
            else:
                hi = op.Sub(size_of(image, axis, dims, np.float32), const(1.0, np.float32))
                scale = op.Div(const(2.0, np.float32), op.Max(hi, const(1.0, np.float32)))
            coord = coords(disp, axis)
            comps.append(op.Sub(op.Mul(coord, like(scale, disp)), like(const(1.0, np.float32), disp)))
        grid = op.Concat(*[op.Unsqueeze(c, const([-1], np.int64)) for c in comps[::-1]], axis=-1)  # (x, y, z)
        return opset20.GridSample(image, like(grid, image), align_corners=1,
                                  mode="nearest" if mode == "nearest" else "linear", padding_mode="zeros")

    fn = warp_gather if sampler == "gather" else warp_native
    return {torch.ops.eoir.warp.default: fn}


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    """What :func:`torch2onnx` wrote and measured.

    Attributes:
        path: the ``.onnx`` file.
        metadata: its ``metadata_props``.
        ops: node count per op type.
        size_bytes: file size.
        seconds: export wall time.
        verify: verification figures (``max_abs``, ``mean_abs`` voxels, ``shape``, ``pair``) or None.
        trt: TensorRT compatibility report (see :func:`export.trt_support.check_trt_support`).
        engine: path of the TensorRT engine when one was built.
    """

    path: Path
    metadata: dict[str, str]
    ops: dict[str, int]
    size_bytes: int
    seconds: float
    verify: dict[str, Any] | None = None
    trt: dict[str, Any] | None = None
    engine: Path | None = None


def _load(model: Any) -> Any:
    from eoir_cli.checkpoint import load_model
    from eoir_cli.model import EOIR

    _define_warp_op()
    if isinstance(model, EOIR):
        exported = EOIR(model.config, sampler=export_sampler)
        exported.load_state_dict(model.state_dict())
        exported.checkpoint_info = getattr(model, "checkpoint_info", {})  # type: ignore[attr-defined]
        return exported.eval()
    return load_model(str(model), sampler=export_sampler, device="cpu")


def _reference(model: Any) -> Any:
    """The same weights with the ``torch`` (grid_sample) sampler in float32: what the export must match."""
    from eoir_cli.model import EOIR

    reference = EOIR(model.config, sampler="torch")
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return reference.eval()


def _check_shape(model: Any, shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ExportError(f"--shape: expected three positive sizes D H W, got {tuple(shape)}")
    shape = tuple(int(s) for s in shape)
    import torch

    probe = torch.empty(1, 1, *shape, device="meta")
    try:
        model.check_inputs(probe, probe)
    except ValueError as err:
        raise ExportError(str(err)) from None
    return shape  # type: ignore[return-value]


def torch2onnx(
    model: Any,
    output: str | os.PathLike[str],
    shape: Sequence[int] = LUMIR_SHAPE,
    sampler: ExportSampler = "gather",
    dynamic: bool = False,
    opset: int | None = None,
    fp16: bool = False,
    verify: bool = True,
    verify_pair: tuple[np.ndarray, np.ndarray] | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Export an EOIR model to ONNX, check it, optionally verify it against PyTorch, write atomically.

    Args:
        model: an :class:`~eoir_cli.model.EOIR`, a checkpoint path (ours or original), a preset name
            or ``"default"``.
        output: the ``.onnx`` path (written only if every check passes).
        shape: spatial size ``(D, H, W)`` of the inputs (with ``dynamic``: the example size).
        sampler: ``"gather"`` (no GridSample) or ``"native"`` (opset-20 GridSample).
        dynamic: leave D, H, W symbolic (sizes must stay multiples of the pyramid's divisor).
        opset: ONNX opset (default 18 for gather, 20 for native, which needs >= 20).
        fp16: write float16 weights, activations and I/O (export in half precision).
        verify: run onnxruntime on a realistic pair and compare with PyTorch (fp32, grid_sample sampler).
        verify_pair: the ``(moving, fixed)`` ``(D, H, W)`` [0, 1] arrays to verify on (default: two
            smooth random volumes of ``shape``).
        tolerance: max |Δdisp| voxels allowed; default: derived per pair for fp32 (see
            :func:`verification_bounds`), 0.5 for fp16.

    Returns:
        :class:`ExportResult` (figures included).

    Raises:
        ExportError: bad options, a failed check, or verification above the tolerance; no file is
            left behind in that case.
    """
    import onnx
    import torch

    from eoir_cli.fileio import atomic_path
    from export.trt_support import check_trt_support

    if sampler not in EXPORT_SAMPLERS:
        raise ExportError(f"sampler: expected one of {EXPORT_SAMPLERS}, got {sampler!r}")
    opset = DEFAULT_OPSET[sampler] if opset is None else int(opset)
    if opset < MIN_OPSET[sampler] or opset > 23:
        raise ExportError(f"--opset: expected {MIN_OPSET[sampler]}..23 for the {sampler} sampler, got {opset}"
                          + (" (5-D GridSample needs opset 20)" if sampler == "native" else ""))
    output = Path(output)
    if output.suffix != ".onnx":
        raise ExportError(f"output: expected a .onnx path, got {output.name!r}")
    net = _load(model)
    shape = _check_shape(net, shape)
    info = getattr(net, "checkpoint_info", {})
    normalization, deployment = normalization_of(info), deployment_of(info)
    dtype = torch.float16 if fp16 else torch.float32
    net = net.to(dtype)
    example = torch.rand(1, 1, *shape, dtype=dtype)
    dynamic_shapes = None
    if dynamic:
        mult = net.config.size_multiple()
        scale = net.config.input_scale
        if scale != 1.0:
            raise ExportError("--dynamic: expected input_scale 1.0 (resampled models need a fixed --shape), "
                              f"got {scale}")
        dims = {}
        for axis, name in enumerate("DHW"):
            base = torch.export.Dim(f"{name.lower()}_blocks", min=1, max=4096 // mult[axis])
            dims[axis + 2] = base * mult[axis] if mult[axis] > 1 else base
        dynamic_shapes = {"moving": dims, "fixed": dims}
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(
                net, (example, example.clone()), dynamo=True, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes,
                custom_translation_table=_onnx_translations(sampler), optimize=False, verbose=False,
            )
        except Exception as err:  # the exporter raises many error types; report one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"ONNX export failed ({type(err).__name__}: {first})") from err
    proto = clean_graph(program.model)
    metadata = build_metadata(net.config, None if dynamic else shape, sampler, opset, "fp16" if fp16 else "fp32",
                              normalization, deployment, example_shape=list(shape))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "EOIR image registration network exported by eoir"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected the export: {str(err).splitlines()[0]}") from None
    seconds = time.perf_counter() - start
    ops = op_histogram(proto)
    if sampler == "gather" and "GridSample" in ops:
        raise ExportError("internal: the gather export contains a GridSample node")
    trt_report = check_trt_support(proto)
    with atomic_path(output) as tmp:
        onnx.save_model(proto, str(tmp))
        result = ExportResult(output, metadata, ops, tmp.stat().st_size, seconds, trt=trt_report)
        if verify:
            if tolerance is None and fp16:
                tolerance = VERIFY_TOLERANCE_FP16
            v = result.verify = verify_onnx(tmp, _reference(net), shape, verify_pair, tolerance=tolerance)
            if not v["passed"]:
                raise ExportError(f"verification failed: max |Δdisp| {v['max_abs']:.3g} voxels (mean "
                                  f"{v['mean_abs']:.3g}) between onnxruntime and PyTorch, expected <= "
                                  f"{v['tolerance_max']:.3g} (mean <= {v['tolerance_mean']:.3g}); "
                                  f"{v['basis']}; no file written")
    log.info("wrote %s (%d bytes, %.1f s)", output, result.size_bytes, seconds)
    return result


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatter (torchvision op skips, pytree deprecations) for one export."""
    names = ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "torch._dynamo")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def clean_graph(model: Any) -> Any:
    """Constant-fold, deduplicate and lift constants of an ``onnx_ir`` model; return a ModelProto.

    The same passes as ``onnxscript.optimizer.optimize_ir`` minus its pattern rewriter, which is
    quadratic in graph size (~25 s on the 5 000-node gather graph against ~1 s for these passes) and
    finds nothing to rewrite here. Per-node stack-trace metadata is dropped (it is 80% of the file).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import constant_folding

    for step in (passes.InlinePass(), constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=8192,
                                                                           output_size_limit=262144),
                 passes.RemoveUnusedNodesPass(), passes.RemoveUnusedFunctionsPass(), passes.RemoveUnusedOpsetsPass(),
                 passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
                 passes.RemoveUnusedNodesPass(), passes.OutputFixPass(), passes.NameFixPass()):
        step(model)
    proto = ir.serde.serialize_model(model)
    for node in proto.graph.node:
        del node.metadata_props[:]
    return proto


def op_histogram(proto: Any) -> dict[str, int]:
    """Node count per op type (``domain::Op`` for non-default domains), functions included."""
    counts: dict[str, int] = {}
    nodes = list(proto.graph.node)
    for fn in proto.functions:
        nodes.extend(fn.node)
    for node in nodes:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def pair_from_files(
    moving: str | os.PathLike[str], fixed: str | os.PathLike[str], shape: Sequence[int],
    normalization: Any = "percentile",
) -> tuple[np.ndarray, np.ndarray]:
    """A real verification pair: two NIfTI images normalised to [0, 1], resampled to ``shape``.

    ``normalization`` is the model's spec (:func:`eoir_cli.deployment.normalize`; ``eoir export``
    passes the checkpoint's own), so the pair is what the model sees at run time.

    Resampling is trilinear with align_corners=True geometry (array corners kept); the pair only has to be
    realistic for the comparison, not anatomically registered.
    """
    import torch

    from eoir_cli.io import load_volume
    from eoir_cli.spatial import resize

    out = []
    for path in (moving, fixed):
        data = normalize(load_volume(path).data, normalization)
        if tuple(data.shape) != tuple(shape):
            data = resize(torch.from_numpy(data)[None, None], size=tuple(shape))[0, 0].numpy()
        out.append(np.ascontiguousarray(data, dtype=np.float32))
    return out[0], out[1]


def verification_bounds(spread_max: float) -> tuple[float, float]:
    """Tolerances (max, mean |Δdisp| voxels) for an fp32 export, from the pair's own rounding spread.

    Two float32 PyTorch evaluations of one pair that differ only in rounding (other convolution
    kernels and order of operations, see :func:`verify_onnx`) disagree by up to ``spread_max``; onnxruntime rounds
    differently again (other convolution kernels, summation order) and scaling and squaring
    amplifies every such difference alike, so a good export stays within a small multiple of that
    spread: ``SPREAD_FACTOR`` (100) times it, clamped to ``VERIFY_MAX_BOUNDS`` (1e-3 .. 0.1 voxel).
    The mean must also stay below that bar and below ``VERIFY_MEAN_CAP`` (a hundredth of a voxel):
    rounding concentrates in a few voxels, while a wrong sampler, swapped axes or a broken op move
    the field at most voxels by a sizeable fraction of its magnitude and fail both.
    """
    lo, hi = VERIFY_MAX_BOUNDS
    tol_max = min(max(SPREAD_FACTOR * spread_max, lo), hi)
    return tol_max, min(tol_max, VERIFY_MEAN_CAP)


def verify_onnx(
    path: str | os.PathLike[str], model: Any, shape: Sequence[int],
    pair: tuple[np.ndarray, np.ndarray] | None = None, threads: int | None = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Run onnxruntime (CPU) and PyTorch on one pair, compare the displacements and decide.

    PyTorch runs twice in float32: its inference path (:func:`eoir_cli.lean.forward_lean`, the
    reference) and the plain graph (``lean=False``: other convolution kernels and layout, the two
    images batched, out-of-place norms, the original sampler arithmetic). Their difference, the
    *spread*, is what float32 rounding alone does to this pair at this size; the tolerances follow
    from it (:func:`verification_bounds`). (The gather-vs-grid_sample sampler spread alone was tried
    first: at 160×224×192 it is 13× below onnxruntime's difference, which convolution rounding
    dominates; the plain graph's differs in the convolutions too.)

    Args:
        path: the ``.onnx`` file.
        model: the PyTorch model it was exported from (any sampler; evaluated in float32).
        shape: ``(D, H, W)`` of the pair.
        pair: ``(moving, fixed)`` arrays, default :func:`smooth_pair`.
        threads: onnxruntime intra-op threads.
        tolerance: a fixed max |Δdisp| bar (voxels) instead of the derived ones (no mean bar).

    Returns:
        ``max_abs``, ``mean_abs`` (|Δdisp| voxels, ONNX vs reference), ``spread_max``,
        ``spread_mean`` (voxels, PyTorch vs PyTorch), ``tolerance_max``, ``tolerance_mean``,
        ``passed``, ``basis`` (how the tolerances were set), ``shape``, ``pair`` (what was used),
        ``ort_seconds``, ``torch_seconds``, ``disp_max`` (largest |disp| voxels, for scale).
    """
    import torch

    from eoir_cli.backends import OnnxBackend

    if pair is None:
        pair, described = smooth_pair(shape), "two smooth random volumes (seed 0)"
    else:
        described = "the given image pair"
    moving, fixed = pair
    backend = OnnxBackend(path, device="cpu", threads=threads)
    start = time.perf_counter()
    disp_ort = backend(moving, fixed)
    ort_seconds = time.perf_counter() - start
    del backend
    model = model.float()
    m, f = torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        disp_pt = model(m, f)[0].numpy()
        torch_seconds = time.perf_counter() - start
        disp_alt = model(m, f, lean=False)[0].numpy()
    diff = np.abs(disp_ort - disp_pt)
    spread = np.abs(disp_alt - disp_pt)
    spread_max, spread_mean = float(spread.max()), float(spread.mean())
    del spread
    del disp_alt
    if tolerance is None:
        tol_max, tol_mean = verification_bounds(spread_max)
        basis = (f"tolerance {SPREAD_FACTOR:g}x the float32 rounding spread of two PyTorch evaluations "
                 f"(max {spread_max:.2g} voxels), clamped to {VERIFY_MAX_BOUNDS}; mean <= {VERIFY_MEAN_CAP}")
    else:
        tol_max, tol_mean, basis = float(tolerance), float("inf"), f"fixed tolerance {tolerance:g} voxels"
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    return {"max_abs": max_abs, "mean_abs": mean_abs, "spread_max": spread_max, "spread_mean": spread_mean,
            "tolerance_max": tol_max, "tolerance_mean": tol_mean, "basis": basis,
            "passed": bool(max_abs <= tol_max and mean_abs <= tol_mean), "shape": list(moving.shape),
            "pair": described, "ort_seconds": ort_seconds, "torch_seconds": torch_seconds,
            "disp_max": float(np.abs(disp_pt).max())}

