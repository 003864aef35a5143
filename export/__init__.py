"""Deployment: ONNX export, TensorRT engines, a backend per runtime, benchmarks.

Public API (imported lazily so ``import export`` costs nothing)::

    from export import load_backend, torch2onnx, onnx2engine, check_trt_support, run_bench
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Backend": "export.backends",
    "TorchBackend": "export.backends",
    "OnnxBackend": "export.backends",
    "TensorRTBackend": "export.backends",
    "BackendError": "export.backends",
    "load_backend": "export.backends",
    "SUFFIXES": "export.backends",
    "torch2onnx": "export.onnx_export",
    "verify_onnx": "export.onnx_export",
    "ExportResult": "export.onnx_export",
    "onnx2engine": "export.tensorrt",
    "check_trt_support": "export.trt_support",
    "run_bench": "export.bench",
    "DEFAULT_NORMALIZATION": "export.metadata",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
