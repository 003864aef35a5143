"""Converting a checkpoint into the file a benchmark row runs on (``eoir bench``'s ``prepare`` step)."""

from __future__ import annotations

import time
from pathlib import Path

from eoir_cli.bench import BenchSpec, file_for, runtime_of


def model_for_backend(spec: BenchSpec, workdir: Path) -> tuple[str, float, str | None]:
    """The file ``spec`` runs on, exporting a checkpoint to ONNX (and building an engine) when asked.

    Files already of the wanted runtime are used as they are (:func:`eoir_cli.bench.file_for`).

    Returns:
        ``(path, prepare seconds, note)``.

    Raises:
        ValueError: a backend name, precision or file that cannot be measured (the row's error).
    """
    from eoir_cli.backends import backend_kind

    wanted = runtime_of(spec.backend)
    if backend_kind(spec.model) != "torch" or wanted == "torch":
        return file_for(spec, workdir)
    from eoir_cli.checkpoint import load_model
    from export.onnx_export import torch2onnx

    if wanted == "tensorrt":
        from export.tensorrt import require_tensorrt

        require_tensorrt()  # before spending an export on it
    if spec.precision == "bf16":
        raise ValueError("bf16 is measured on the torch backend only (onnxruntime CPU has no bf16 convolutions)")
    start = time.perf_counter()
    net = load_model(spec.model, **spec.overrides)
    sampler = "native" if spec.backend == "onnx-native" else "gather"
    onnx_path = workdir / f"{Path(spec.model).stem}-{sampler}-{'x'.join(map(str, spec.shape))}-{spec.precision}.onnx"
    if not onnx_path.exists():
        torch2onnx(net, onnx_path, shape=spec.shape, sampler=sampler, fp16=spec.precision == "fp16", verify=False)
    path = str(onnx_path)
    if wanted == "tensorrt":
        from export.tensorrt import onnx2engine

        path = str(onnx2engine(onnx_path, fp16=spec.precision == "fp16"))
    return path, time.perf_counter() - start, f"exported from {spec.model} ({sampler} sampler)"
