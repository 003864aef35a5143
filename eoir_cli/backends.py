"""Deployment runtime: one :class:`Backend` interface per runtime, chosen by the model file's suffix.

Every backend takes ``(moving, fixed)`` as float32 numpy arrays ``(D, H, W)`` already normalised
to [0, 1] and returns the displacement ``(3, D, H, W)`` float32 in **voxels** (channel c along
array axis c, pull-back on the fixed grid; see :mod:`eoir_cli.spatial`).

======================================  ===================  ==========================================
suffix                                  backend              runtime
======================================  ===================  ==========================================
``.pt`` ``.pth(.tar)`` ``.safetensors`` TorchBackend         PyTorch (CPU/CUDA, fp32/bf16/fp16)
(or a preset name / ``"default"``)
``.onnx``                               OnnxBackend          onnxruntime (TensorRT/CUDA/CPU providers)
``.engine`` ``.plan``                   TensorRTBackend      TensorRT (CUDA GPU)
======================================  ===================  ==========================================
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eoir_cli.config import PRESETS, ModelConfig
from eoir_cli.deployment import Deployment, deployment_of
from eoir_cli.errors import EoirError, GpuUnavailableError
from eoir_cli.fileio import model_suffix
from eoir_cli.metadata import INPUT_NAMES, OUTPUT_NAME, normalization_of, parse_metadata

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("fp32", "bf16", "fp16")

SUFFIXES: dict[str, str] = {
    ".pt": "torch", ".pth": "torch", ".pth.tar": "torch", ".safetensors": "torch",
    ".onnx": "onnx",
    ".engine": "tensorrt", ".plan": "tensorrt",
}

# onnxruntime providers in order of preference for device="cuda"/"auto".
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class BackendError(EoirError):
    """A model file no backend can run, or inputs a backend cannot take."""


class Backend(ABC):
    """A loaded registration model behind one call: ``backend(moving, fixed) -> disp``.

    Attributes:
        name: ``"torch"``, ``"onnx"`` or ``"tensorrt"``.
        path: the model file (or preset name).
        device: where it runs (``"cpu"``, ``"cuda"``, ``"cuda:0"``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        input_shape: the only spatial size ``(D, H, W)`` it accepts, or None if any valid size works.
        config: the network architecture.
        metadata: what the file says about itself (always includes ``"normalization"``).
        deployment: the facts the model is run by (spacing, grid, normalisation, domain), read from the
            file (:func:`eoir_cli.deployment.deployment_of`).
        fallback_reason: why a requested accelerator is not used (None when nothing fell back).
    """

    name: str = "base"

    def __init__(self, path: str, device: str, precision: str, input_shape: tuple[int, int, int] | None,
                 config: ModelConfig, metadata: dict[str, Any], fallback_reason: str | None = None,
                 deployment: Deployment | None = None) -> None:
        self.path = path
        self.device = device
        self.precision = precision
        self.input_shape = input_shape
        self.config = config
        self.metadata = metadata
        self.deployment = deployment if deployment is not None else deployment_of(metadata)
        self.fallback_reason = fallback_reason

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, device={self.device!r}, precision={self.precision!r}, "
                f"input_shape={self.input_shape})")

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (for tables, JSON and logs)."""
        return {"backend": self.name, "path": self.path, "device": self.device, "precision": self.precision,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "config": self.config.to_dict(), "deployment": self.deployment.to_dict(),
                "fallback_reason": self.fallback_reason}

    def check_pair(self, moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate and convert the inputs to contiguous float32 ``(D, H, W)`` arrays."""
        arrays = []
        for what, arr in (("moving", moving), ("fixed", fixed)):
            arr = np.asarray(arr)
            if arr.ndim != 3:
                raise BackendError(f"{what}: expected a (D, H, W) volume, got shape {arr.shape}")
            arrays.append(np.ascontiguousarray(arr, dtype=np.float32))
        if arrays[0].shape != arrays[1].shape:
            raise BackendError(f"moving and fixed differ in shape: {arrays[0].shape} vs {arrays[1].shape}")
        shape = arrays[0].shape
        if self.input_shape is not None and tuple(shape) != tuple(self.input_shape):
            raise BackendError(f"{Path(self.path).name} was exported for shape {tuple(self.input_shape)}, "
                               f"got {tuple(shape)}; resize the inputs or export with --dynamic")
        return arrays[0], arrays[1]

    def __call__(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """Register one pair.

        Args:
            moving: ``(D, H, W)`` float32, intensities in [0, 1].
            fixed: ``(D, H, W)`` float32, same shape.

        Returns:
            ``(3, D, H, W)`` float32 displacement in voxels on the fixed grid.
        """
        moving, fixed = self.check_pair(moving, fixed)
        disp = self._run(moving[None, None], fixed[None, None])
        return np.ascontiguousarray(disp[0], dtype=np.float32)

    @abstractmethod
    def _run(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        """``(1, 1, D, H, W)`` float32 pair -> ``(1, 3, D, H, W)`` float32 voxels."""


class TorchBackend(Backend):
    """PyTorch: our checkpoints, original EOIR checkpoints, presets (random weights), ``"default"``,
    or an ``EOIR`` module already in memory.

    Args:
        path: ``.pt``/``.pth``/``.safetensors`` file, preset name, ``"default"`` or an ``EOIR``
            module (run as given: eval mode, its own sampler, on ``device`` or where it already is).
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:i]"``.
        precision: ``"fp32"``; ``"bf16"`` (CPU or CUDA) and ``"fp16"`` (CUDA) keep the features in that
            dtype end to end (float32 norm statistics) while the warps' coordinates, the integration
            and the output stay float32.
        sampler: ``"torch"`` (grid_sample, fastest in PyTorch) or ``"gather"``.
        threads: torch intra-op threads (None = leave as is).
        overrides: config fields for presets / fields weights cannot tell (e.g. ``{"channels": 8}``).
        eager: the original code's way of running (``torch.no_grad``, contiguous NCDHW, grid_sample,
            autocast around each op), kept as the reference point for benchmarks. Otherwise the
            model's inference path runs (:func:`eoir_cli.lean.forward_lean`: channels_last_3d,
            in-place norms, one image at a time through the encoder, bf16/fp16 end to end).
    """

    name = "torch"

    def __init__(self, path: Any, device: str = "auto", precision: Precision = "fp32",
                 sampler: str = "torch", threads: int | None = None,
                 overrides: dict[str, Any] | None = None, eager: bool = False, **_: Any) -> None:
        import torch

        from eoir_cli.checkpoint import load_model
        from eoir_cli.devices import resolve_device
        from eoir_cli.spatial import sample_torch_cached

        if precision not in PRECISIONS:
            raise BackendError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        in_memory = isinstance(path, torch.nn.Module)
        if in_memory and device == "auto":
            device = str(next(path.parameters()).device)  # a module stays where the caller put it
        device = resolve_device(device)
        if precision == "fp16" and not device.startswith("cuda"):
            raise BackendError("precision fp16: expected a CUDA device (CPU autocast supports bf16), got cpu")
        if threads:
            torch.set_num_threads(int(threads))
        if in_memory:
            # A module the caller owns (training, tests) is run as it is: no sampler swap, no in-place ReLU.
            model, eager, label = path.eval().to(device), True, "module"
        else:
            # The fast path swaps in the cached-grid sampler (same convention, fewer passes per warp).
            run_sampler = sample_torch_cached if sampler == "torch" and not eager else sampler
            model, label = load_model(str(path), sampler=run_sampler, device=device, **(overrides or {})), str(path)
        info = getattr(model, "checkpoint_info", {}) or {}
        self.model = model
        self.eager = eager
        source = ("module" if in_memory else "preset (random weights)" if label in PRESETS and not Path(label).exists()
                  else "checkpoint")
        metadata = {"normalization": normalization_of(info), "sampler": sampler, "format": info.get("format"),
                    "source": source}
        super().__init__(label, device, precision, None, model.config, metadata, deployment=deployment_of(info))

    def _run(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        import torch

        dev = torch.device(self.device)
        m = torch.from_numpy(moving).to(dev)
        f = torch.from_numpy(fixed).to(dev)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # inference_mode (not no_grad) also skips version-counter bookkeeping on every tensor.
        grad_off = torch.no_grad() if self.eager else torch.inference_mode()
        with grad_off, torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            disp = self.model(m, f, lean=not self.eager)
        return disp.float().cpu().numpy()


class OnnxBackend(Backend):
    """onnxruntime over an ``.onnx`` file written by ``eoir export`` (metadata read from the file).

    Args:
        path: the ``.onnx`` file.
        device: ``"auto"`` (GPU providers when this onnxruntime build has them, else CPU),
            ``"cpu"`` or ``"cuda"`` (falls back to CPU with :attr:`fallback_reason` set).
        providers: explicit onnxruntime provider list (overrides ``device``).
        threads: intra-op threads (None = onnxruntime default).
        mem_arena: onnxruntime's CPU memory arena with its planned buffer reuse switched off (default);
            ``False``: no arena, planned reuse on (the previous default). Measured at 160x224x192,
            C=32 on 2 cores: gather 33.1 s / 5.52 GB and native GridSample 32.2 s / 5.50 GB, against
            41.1 s / 8.69 GB and 36.5 s / 7.17 GB without the arena: the planner's reuse pins a
            buffer from its first use until the last tensor that reuses it (e.g. from the encoder to
            the finest flow estimator), while the arena recycles freed blocks without page faults.
    """

    name = "onnx"

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", providers: list[str] | None = None,
                 threads: int | None = None, mem_arena: bool = True, **_: Any) -> None:
        ort = _import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: no such ONNX file")
        available = ort.get_available_providers()
        fallback = None
        if providers is None:
            if device == "cpu":
                providers = ["CPUExecutionProvider"]
            else:
                gpu = [p for p in GPU_PROVIDERS if p in available]
                if not gpu and device.startswith("cuda"):
                    fallback = (f"device {device!r} asked for a GPU provider but this onnxruntime build offers "
                                f"only {available} (pip install onnxruntime-gpu); running on CPU")
                providers = [*gpu, "CPUExecutionProvider"]
        else:
            missing = [p for p in providers if p not in available]
            if missing:
                fallback = f"providers {missing} are not available (have {available}); they were dropped"
                providers = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = mem_arena
        options.enable_mem_reuse = not mem_arena
        # Priority-based order runs each branch to completion (one image's encoder, one warp's chunks) before
        # the next, instead of interleaving independent branches: -5 % peak at 96x112x96, C=32.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackendError(f"{path}: onnxruntime cannot load it ({first})") from None
        used = session.get_providers()
        if providers[0] != "CPUExecutionProvider" and used[0] == "CPUExecutionProvider" and fallback is None:
            fallback = f"{providers[0]} failed to initialise (see onnxruntime log); running on CPU"
        if fallback:
            log.warning("%s", fallback)
        meta = parse_metadata(session.get_modelmeta().custom_metadata_map, str(path))
        inputs = [i.name for i in session.get_inputs()]
        if tuple(inputs) != INPUT_NAMES:
            raise BackendError(f"{path}: expected inputs {INPUT_NAMES}, got {tuple(inputs)}")
        self.session = session
        self.providers = used
        self._dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        device_used = "cuda" if used[0] in GPU_PROVIDERS else "cpu"
        super().__init__(str(path), device_used, meta.get("precision", "fp32"), meta.get("input_shape"),
                         meta["config"], meta, fallback)

    def _run(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        feeds = {"moving": moving.astype(self._dtype, copy=False), "fixed": fixed.astype(self._dtype, copy=False)}
        (disp,) = self.session.run([OUTPUT_NAME], feeds)
        # A copy: onnxruntime's array may live in the session's arena, which it would keep alive (5.5 GB at
        # 160x224x192, C=32) after the backend is gone, e.g. through export verification's PyTorch passes.
        return np.array(disp, dtype=np.float32, copy=True)


class TensorRTBackend(Backend):
    """TensorRT over a serialized engine (``.engine``/``.plan``) written by ``eoir export --trt``.

    Metadata is read from ``<engine>.json`` beside the engine. I/O tensors are bound by name
    (TensorRT 10+ API: ``num_io_tensors``, ``set_input_shape``, ``set_tensor_address``,
    ``execute_async_v3``) to torch CUDA buffers and run on a torch CUDA stream.
    """

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike[str], device: str = "cuda", **_: Any) -> None:
        import torch

        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: no such TensorRT engine file")
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise GpuUnavailableError(f"{path.name}: a TensorRT engine needs a CUDA GPU; none is available")
        if device in ("auto", "cpu"):
            device = "cuda"
        sidecar = path.with_name(path.name + ".json")
        meta: dict[str, Any]
        if sidecar.is_file():
            meta = parse_metadata(json.loads(sidecar.read_text()), str(sidecar))
        else:
            raise BackendError(f"{path}: expected its metadata file {sidecar.name} beside it (written by eoir export)")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: TensorRT {trt.__version__} cannot deserialize it (engines are tied to the "
                               "TensorRT version and GPU that built them; rebuild with eoir export --trt)")
        self.trt = trt
        self.engine = engine
        self.context = engine.create_execution_context()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        # Profile 0 bounds of the first input: (min, opt, max) shapes (1, 1, D, H, W).
        lo, _, hi = engine.get_tensor_profile_shape(INPUT_NAMES[0], 0) if self._dynamic() else (None, None, None)
        self.profile = (tuple(lo)[2:], tuple(hi)[2:]) if lo is not None else None
        static = None if self._dynamic() else tuple(engine.get_tensor_shape(INPUT_NAMES[0]))[2:]
        super().__init__(str(path), device, meta.get("precision", "fp32"), static, meta["config"], meta)

    def _dynamic(self) -> bool:
        return any(d == -1 for d in self.engine.get_tensor_shape(INPUT_NAMES[0]))

    def check_pair(self, moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        moving, fixed = super().check_pair(moving, fixed)
        if self.profile is not None:
            lo, hi = self.profile
            if any(s < a or s > b for s, a, b in zip(moving.shape, lo, hi, strict=True)):
                raise BackendError(f"engine built for shapes {tuple(lo)}..{tuple(hi)}, got {moving.shape}")
        return moving, fixed

    def _run(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        import torch

        trt = self.trt
        dev = torch.device(self.device)
        dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAMES[0]))
        buffers = {"moving": torch.from_numpy(moving).to(dev, dtype).contiguous(),
                   "fixed": torch.from_numpy(fixed).to(dev, dtype).contiguous()}
        for name in INPUT_NAMES:
            if not self.context.set_input_shape(name, tuple(buffers[name].shape)):
                raise BackendError(f"engine built for shape {self.input_shape or self.profile}, "
                                   f"got {tuple(buffers[name].shape)[2:]}")
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME))
        buffers[OUTPUT_NAME] = torch.empty(out_shape, dtype=out_dtype, device=dev)
        for name in self.names:
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return buffers[OUTPUT_NAME].float().cpu().numpy()


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise BackendError(f"engine tensor dtype: expected float32/float16/bfloat16, got {dtype}")
    return table[dtype]


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise EoirError("running .onnx models needs onnxruntime: pip install onnxruntime "
                        "(or onnxruntime-gpu for CUDA)") from None
    return ort


def import_tensorrt() -> Any:
    """Import the ``tensorrt`` Python package or raise a one-line install hint."""
    try:
        import tensorrt as trt
    except ImportError:
        raise GpuUnavailableError("TensorRT is not installed (it needs an NVIDIA GPU): pip install tensorrt, "
                                  "or use the .onnx file with onnxruntime") from None
    return trt


def backend_kind(path: str | os.PathLike[str]) -> str:
    """``"torch"``, ``"onnx"`` or ``"tensorrt"`` for a model path (presets and ``"default"`` are torch).

    Raises:
        BackendError: for a suffix no backend handles, listing the supported ones.
    """
    name = str(path)
    if name == "default" or (name in PRESETS and not Path(name).exists()):
        return "torch"
    suffix = model_suffix(name)
    if suffix not in SUFFIXES:
        raise BackendError(f"{name}: unknown model suffix {suffix or '(none)'!r}; expected one of "
                           f"{', '.join(SUFFIXES)} (or a preset name: {', '.join(sorted(PRESETS))}, default)")
    return SUFFIXES[suffix]


BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend, "onnx": OnnxBackend, "tensorrt": TensorRTBackend}


def load_backend(path: str | os.PathLike[str], device: str = "auto", providers: list[str] | None = None,
                 **options: Any) -> Backend:
    """Open a model file with the backend its suffix names.

    Args:
        path: ``.pt``/``.pth``/``.safetensors`` (PyTorch), ``.onnx`` (onnxruntime),
            ``.engine``/``.plan`` (TensorRT), or a preset name / ``"default"`` (PyTorch).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        providers: onnxruntime providers (``.onnx`` only).
        **options: backend-specific options (``precision``, ``sampler``, ``threads``, ``mem_arena``).

    Returns:
        A ready :class:`Backend`; ``backend(moving, fixed)`` gives the displacement in voxels.

    Raises:
        BackendError: unknown suffix (the message lists the supported ones) or unreadable file.
        GpuUnavailableError: TensorRT (or CUDA) asked for without a GPU.
    """
    kind = backend_kind(path)
    if kind == "onnx":
        return OnnxBackend(path, device=device, providers=providers, **options)
    return BACKENDS[kind](path, device=device, **options)


BACKEND_NAMES = ("auto", "torch", "onnx", "tensorrt")


def open_backend(model: Any = "default", backend: str = "auto", device: str = "auto",
                 precision: str = "fp32") -> Backend:
    """Open a model once (for one or many pairs): the entry point of ``register``, ``test`` and ``bench``.

    Args:
        model: ``"default"``, a preset name, a ``.pt``/``.pth``/``.safetensors``/``.onnx``/``.engine``
            path, an ``EOIR`` module, or an already opened :class:`Backend` (returned as is; any
            callable with the :class:`Backend` attributes counts).
        backend: ``"auto"`` (by suffix) or the runtime the file must match.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (PyTorch; exported files carry their own).

    Raises:
        EoirError: unknown suffix, missing/corrupt/hostile file, backend mismatch, no GPU.
    """
    import torch

    from eoir_cli.checkpoint import CheckpointError

    if backend not in BACKEND_NAMES:
        raise EoirError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
    if isinstance(model, torch.nn.Module):
        if backend not in ("auto", "torch"):
            raise EoirError(f"backend {backend}: an in-memory module runs on the torch backend")
        return TorchBackend(model, device=device, precision=precision)  # type: ignore[arg-type]
    if callable(model) and hasattr(model, "input_shape"):
        return model  # an opened Backend (or a stand-in with its attributes)
    name = str(model)
    kind = backend_kind(name)
    if backend != "auto" and backend != kind:
        raise EoirError(f"backend {backend}: the model {name} is a {kind} model (by its suffix); "
                        "export it with `eoir export` or use the auto backend")
    if name != "default" and name not in PRESETS and not Path(name).is_file():
        raise EoirError(f"model {name}: no such file (expected 'default', a preset {sorted(PRESETS)} or a model file)")
    if kind != "torch" and precision != "fp32":
        log.warning("precision %s ignored: %s files carry their own precision", precision, kind)
        precision = "fp32"
    try:
        return load_backend(name, device=device, precision=precision)
    except CheckpointError as err:
        raise EoirError(str(err)) from None
