"""Converters: ONNX export (``torch2onnx``), TensorRT engines (``onnx2engine``), the TensorRT
support table, verification against PyTorch, and on-the-fly conversion for benchmarks.

``export`` imports ``eoir_cli`` (the model, the runtime, the metadata), never the reverse: the
runtime that runs exported files lives in :mod:`eoir_cli.backends`.

Public API (imported lazily so ``import export`` costs nothing)::

    from export import torch2onnx, verify_onnx, onnx2engine, check_trt_support, model_for_backend
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "torch2onnx": "export.onnx_export",
    "verify_onnx": "export.onnx_export",
    "ExportResult": "export.onnx_export",
    "onnx2engine": "export.tensorrt",
    "check_trt_support": "export.trt_support",
    "model_for_backend": "export.convert",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
