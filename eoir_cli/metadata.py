"""Self-describing artifacts: the metadata every exported model carries.

ONNX files store it in ``metadata_props`` (string to string), TensorRT engines in a JSON file
beside the engine (``OUT.engine.json``). Both use the same keys, written by :func:`build_metadata`
and read back by :func:`parse_metadata`, so a runtime never needs extra flags. The key
``deployment`` holds the machine-readable facts (:class:`eoir_cli.deployment.Deployment`: spacing,
grid, intensity normalisation spec, domain) that ``eoir register`` runs the model by;
``normalization`` is the same spec (or the checkpoint's own description) as one readable line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from eoir_cli.config import ModelConfig
from eoir_cli.deployment import Deployment, Normalization, deployment_of

# What the network expects as input intensities when a checkpoint does not record it.
DEFAULT_NORMALIZATION = Normalization().describe()

# ONNX input/output tensor names: (1, 1, D, H, W) float images in, (1, 3, D, H, W) voxels out.
INPUT_NAMES = ("moving", "fixed")
OUTPUT_NAME = "disp"

METADATA_KEYS = (
    "eoir_version", "model_config", "input_shape", "dynamic", "sampler", "normalization", "opset",
    "precision", "inputs", "outputs", "disp_units", "deployment",
)


def normalization_of(info: Mapping[str, Any] | None) -> str:
    """Intensity normalisation recorded in checkpoint ``info`` as one line (its own text, else its spec's)."""
    value = (info or {}).get("normalization")
    if value is None:
        return deployment_of(info).normalization.describe()
    return value if isinstance(value, str) else json.dumps(value)


def build_metadata(
    config: ModelConfig,
    input_shape: Sequence[int] | None,
    sampler: str,
    opset: int | None,
    precision: str = "fp32",
    normalization: str = DEFAULT_NORMALIZATION,
    deployment: Deployment | None = None,
    **extra: Any,
) -> dict[str, str]:
    """String-to-string metadata for an exported model.

    Args:
        config: the architecture the weights belong to.
        input_shape: spatial size ``(D, H, W)`` the file was exported for, or None if dynamic
            (then ``extra["example_shape"]`` may name the size it was traced at).
        sampler: ``"gather"`` or ``"native"`` (GridSample).
        opset: ONNX opset (None for files that are not ONNX).
        precision: ``"fp32"`` or ``"fp16"`` (the dtype of inputs/outputs and weights).
        normalization: expected intensity normalisation of the inputs (one readable line).
        deployment: the facts the model must be run by (default: assumed ones, see
            :func:`eoir_cli.deployment.assumed_deployment`).
        **extra: further entries (values JSON-encoded unless already strings).
    """
    from eoir_cli import __version__

    meta = {
        "eoir_version": __version__,
        "model_config": json.dumps(config.to_dict(), sort_keys=True),
        "input_shape": json.dumps(list(input_shape) if input_shape is not None else None),
        "dynamic": json.dumps(input_shape is None),
        "sampler": sampler,
        "normalization": normalization,
        "opset": json.dumps(opset),
        "precision": precision,
        "inputs": json.dumps({name: "(1, 1, D, H, W) float, intensities in [0, 1]" for name in INPUT_NAMES}),
        "outputs": json.dumps({OUTPUT_NAME: "(1, 3, D, H, W) float displacement in voxels, channel c along "
                                            "array axis c, pull-back on the fixed grid"}),
        "disp_units": "voxels",
        "deployment": json.dumps((deployment or deployment_of(None)).to_dict(), sort_keys=True),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def parse_metadata(raw: Mapping[str, str], source: str = "model") -> dict[str, Any]:
    """Decode :func:`build_metadata` output: JSON fields decoded, ``config`` as a ModelConfig.

    Raises:
        ValueError: when the eoir entries are missing (not an eoir export) or malformed.
    """
    if "model_config" not in raw:
        raise ValueError(f"{source}: expected eoir metadata (key 'model_config'), got keys {sorted(raw)[:6]}; "
                         "was it written by 'eoir export'?")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("model_config", "input_shape", "dynamic", "opset", "inputs", "outputs", "example_shape", "profile",
                   "build_seconds", "deployment"):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{source}: metadata {key!r}: expected JSON, got {value[:60]!r}") from None
        else:
            out[key] = value
    out["config"] = ModelConfig.from_dict(out["model_config"])
    if out.get("input_shape") is not None:
        out["input_shape"] = tuple(int(s) for s in out["input_shape"])
    return out
