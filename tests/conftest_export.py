"""Shared helpers for the export / backend / bench tests (imported explicitly, not a conftest plugin).

Exports are the slow part (~5 s each at 32³, C=4), so each (sampler, dynamic, fp16) file is written
once per test process into a temporary directory and reused.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

SHAPE = (32, 32, 32)  # smallest size the 5-level pyramid accepts (2 × 16 per axis)
CHANNELS = 4
PARITY_TOL = 1e-4  # voxels, ONNX Runtime vs PyTorch in float32

_TMP = Path(tempfile.mkdtemp(prefix="eoir-test-export-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def tiny_model():
    """lumir architecture with C=4 and fixed random weights (seed 0), torch sampler, eval mode."""
    from eoir_cli.checkpoint import load_model

    torch.manual_seed(0)
    return load_model("lumir", channels=CHANNELS)


@functools.cache
def exported(sampler: str = "gather", dynamic: bool = False, fp16: bool = False):
    """ExportResult of the tiny model (written once per process)."""
    from export.onnx_export import torch2onnx

    path = _TMP / f"tiny-{sampler}-{'dyn' if dynamic else 'static'}-{'fp16' if fp16 else 'fp32'}.onnx"
    return torch2onnx(tiny_model(), path, shape=SHAPE, sampler=sampler, dynamic=dynamic, fp16=fp16, verify=True)


def random_pair(shape=SHAPE, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth random (D, H, W) float32 volumes in [0, 1]."""
    from export.onnx_export import smooth_pair

    return smooth_pair(shape, seed=seed)


def torch_disp(model, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """PyTorch reference displacement (3, D, H, W) voxels."""
    with torch.inference_mode():
        return model(torch.from_numpy(moving)[None, None], torch.from_numpy(fixed)[None, None])[0].numpy()


def scratch_dir() -> Path:
    """A fresh directory under the shared temporary root."""
    return Path(tempfile.mkdtemp(dir=_TMP))
