"""ONNX -> TensorRT engine with the ``tensorrt`` Python API (TensorRT 10.x and 11.x).

Precision, per the TensorRT version:

* TensorRT 10.x: an fp32 ONNX plus ``BuilderFlag.FP16`` (weak typing: TensorRT picks fp16 kernels
  where it likes), or an fp16 ONNX in a ``STRONGLY_TYPED`` network.
* TensorRT 11.x removed ``BuilderFlag.FP16`` and every weak-typing API: networks are always
  strongly typed, so fp16 needs an fp16 ONNX (``eoir export --fp16``).
* TensorRT < 10 needs the ``EXPLICIT_BATCH`` network flag (10+ is always explicit batch).

The engine is written atomically with its metadata beside it (``OUT.engine.json``, the same keys
as the ONNX ``metadata_props``) so :class:`export.backends.TensorRTBackend` needs no flags.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eoir_cli.errors import EoirError, GpuUnavailableError
from eoir_cli.fileio import atomic_path, write_json_atomic
from eoir_cli.metadata import INPUT_NAMES

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GB = 4.0


class EngineBuildError(EoirError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


def require_tensorrt() -> Any:
    """Return the ``tensorrt`` module when it and a CUDA GPU are usable, else a one-line error."""
    from eoir_cli.backends import import_tensorrt

    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise GpuUnavailableError(f"TensorRT {trt.__version__} is installed but no CUDA GPU is available; "
                                  "engines can only be built on the GPU that will run them")
    return trt


def trt_major(trt: Any) -> int:
    """Major version of the imported TensorRT."""
    return int(str(trt.__version__).split(".")[0])


def _profile_shapes(meta: dict[str, Any], profile: Sequence[Sequence[int]] | None) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) spatial sizes for a dynamic ONNX: given, or around its example shape."""
    from eoir_cli.config import ModelConfig

    if profile is not None:
        if len(profile) != 3 or any(len(s) != 3 for s in profile):
            raise EngineBuildError(f"profile: expected three (D, H, W) sizes (min, opt, max), got {profile}")
        return tuple(tuple(int(v) for v in s) for s in profile)  # type: ignore[return-value]
    config = meta["config"] if isinstance(meta.get("config"), ModelConfig) else ModelConfig()
    mult = config.size_multiple()
    from eoir_cli.config import LUMIR_SHAPE

    opt = tuple(meta.get("example_shape") or LUMIR_SHAPE)
    lo = tuple(2 * m for m in mult)
    hi = tuple(-(-int(1.5 * s) // m) * m for s, m in zip(opt, mult, strict=True))
    return lo, opt, hi


def onnx2engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str] | None = None,
    fp16: bool = False,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    profile: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Build and write a serialized TensorRT engine from an ``eoir export`` ONNX file.

    Args:
        onnx_path: the ``.onnx`` file (its metadata says shape, dtype and whether it is dynamic).
        engine_path: output (default: the ONNX path with suffix ``.engine``); ``.engine.json`` beside it.
        fp16: fp16 kernels. An fp16 ONNX is always built strongly typed; an fp32 ONNX with
            ``fp16=True`` uses ``BuilderFlag.FP16`` (TensorRT 10 only; 11 removed the flag).
        workspace_gb: builder workspace memory pool limit.
        profile: ``(min, opt, max)`` spatial sizes for a dynamic ONNX (default: twice the pyramid
            divisor, the example shape, 1.5 × the example shape).

    Returns:
        The engine path.

    Raises:
        GpuUnavailableError: TensorRT or a CUDA GPU missing.
        EngineBuildError: parse or build failure (parser errors included), fp16 of an fp32 ONNX on 11.x.
    """
    import onnx

    from eoir_cli.metadata import parse_metadata

    trt = require_tensorrt()
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path is not None else onnx_path.with_suffix(".engine")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    raw_meta = {p.key: p.value for p in proto.metadata_props}
    meta = parse_metadata(raw_meta, str(onnx_path))
    onnx_fp16 = meta.get("precision") == "fp16"
    major = trt_major(trt)
    if fp16 and not onnx_fp16 and major >= 11:
        raise EngineBuildError(f"TensorRT {trt.__version__} removed BuilderFlag.FP16 (networks are strongly typed); "
                               "export an fp16 ONNX with 'eoir export --fp16 --trt'")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if onnx_fp16 and major == 10 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # The ONNX's own fp16 types decide every layer's precision (11.x does this always).
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
                               + (errors[0] if errors else "unknown parser error"))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    weak_fp16 = fp16 and not onnx_fp16
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = None
    if meta.get("input_shape") is None:
        shapes = _profile_shapes(meta, profile)
        opt_profile = builder.create_optimization_profile()
        for name in INPUT_NAMES:
            opt_profile.set_shape(name, *[(1, 1, *s) for s in shapes])
        config.add_optimization_profile(opt_profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path.name} "
                               "(see the TensorRT log above; try a larger --workspace or a smaller shape)")
    seconds = time.perf_counter() - start
    import torch

    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(serialized))
        engine_meta = dict(raw_meta)
        engine_meta.update({
            "precision": "fp16" if (fp16 or onnx_fp16) else "fp32",
            "fp16_mode": "strongly typed fp16 ONNX" if onnx_fp16 else ("BuilderFlag.FP16" if weak_fp16 else "none"),
            "tensorrt_version": str(trt.__version__),
            "gpu": torch.cuda.get_device_name(0),
            "built_from": onnx_path.name,
            "build_seconds": json.dumps(round(seconds, 2)),
            "profile": json.dumps([list(s) for s in shapes]) if shapes else "null",
        })
        write_json_atomic(engine_path.with_name(engine_path.name + ".json"), engine_meta)
    log.info("built %s in %.1f s", engine_path, seconds)
    return engine_path
