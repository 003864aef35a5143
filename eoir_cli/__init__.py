"""eoir: 3D medical image registration with EOIR (Encoder-Only Image Registration).

Public API (imported lazily so ``eoir --help`` stays instant)::

    from eoir_cli import register, register_pairs, read_pair_list      # the pipeline
    from eoir_cli import open_backend, run_pair                          # a model on one pair
    from eoir_cli import Deployment, Normalization, normalize           # what a model file says about its inputs
    from eoir_cli import load_model, save_checkpoint, ModelConfig, TrainConfig, PRESETS
    from eoir_cli import warp, integrate, compose, run_bench
    from eoir_cli.train import train                                     # a name shared with its module:
    from eoir_cli.evaluate import evaluate                               # import it from there

A public name is never also a submodule's name: importing ``eoir_cli.<name>`` binds the module to
that attribute, so ``from eoir_cli import <name>`` would give the module, not the function.
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
    "TrainConfig": "eoir_cli.config",
    "load_model": "eoir_cli.checkpoint",
    "save_checkpoint": "eoir_cli.checkpoint",
    "CheckpointError": "eoir_cli.checkpoint",
    "warp": "eoir_cli.spatial",
    "integrate": "eoir_cli.spatial",
    "compose": "eoir_cli.spatial",
    "resize_disp": "eoir_cli.spatial",
    "jacobian_determinant": "eoir_cli.spatial",
    "register": "eoir_cli.pipeline",
    "RegistrationResult": "eoir_cli.pipeline",
    "register_pairs": "eoir_cli.batch",
    "read_pair_list": "eoir_cli.data.datasets",
    "open_backend": "eoir_cli.backends",
    "load_backend": "eoir_cli.backends",
    "Backend": "eoir_cli.backends",
    "run_pair": "eoir_cli.inference",
    "Deployment": "eoir_cli.deployment",
    "Normalization": "eoir_cli.deployment",
    "normalize": "eoir_cli.deployment",
    "run_bench": "eoir_cli.bench",
    "BenchSpec": "eoir_cli.bench",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eoir_cli' has no attribute {name!r}")
