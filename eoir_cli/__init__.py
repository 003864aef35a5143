"""eoir: 3D medical image registration with EOIR (Encoder-Only Image Registration).

Public API (imported lazily so ``eoir --help`` stays instant)::

    from eoir_cli import load_model, warp, integrate, compose, ModelConfig, PRESETS
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "EOIR": "eoir_cli.model",
    "PyramidOutput": "eoir_cli.model",
    "count_parameters": "eoir_cli.model",
    "ModelConfig": "eoir_cli.config",
    "PRESETS": "eoir_cli.config",
    "resolve_config": "eoir_cli.config",
    "load_model": "eoir_cli.checkpoint",
    "save_checkpoint": "eoir_cli.checkpoint",
    "CheckpointError": "eoir_cli.checkpoint",
    "warp": "eoir_cli.spatial",
    "integrate": "eoir_cli.spatial",
    "compose": "eoir_cli.spatial",
    "resize_disp": "eoir_cli.spatial",
    "jacobian_determinant": "eoir_cli.spatial",
    "register": "eoir_cli.register",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eoir_cli' has no attribute {name!r}")
