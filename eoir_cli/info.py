"""Facts about the installation: presets, parameter counts, FLOPs, library versions, devices."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Sequence
from typing import Any

from eoir_cli.config import PRESET_NOTES, PRESETS, ModelConfig


def count_flops(config: ModelConfig, shape: Sequence[int]) -> int:
    """Floating-point operations (2 × multiply-adds) of one forward pass on a pair of ``shape``.

    Counted by ``torch.utils.flop_counter`` on the meta device (no memory, no compute);
    convolutions dominate, interpolation and warps are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from eoir_cli.model import EOIR

    model = EOIR(config).to("meta")
    image = torch.empty(1, 1, *shape, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image, image)
    return int(counter.get_total_flops())


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of eoir and the libraries it runs on (None = not installed)."""
    from eoir_cli import __version__

    out: dict[str, str | None] = {"eoir": __version__, "python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "nibabel", "numpy"):
        out[name] = package_version(name)
    if out["tensorrt"] is None:
        out["tensorrt"] = package_version("tensorrt-cu12") or package_version("tensorrt_cu13")
    return out


def devices() -> dict[str, Any]:
    """Compute devices usable by torch and onnxruntime on this machine."""
    import os

    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    return info


def preset_table(shape: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One row per preset: name, config, parameter count, FLOPs at ``shape`` (if given)."""
    from eoir_cli.model import EOIR, count_parameters
    from eoir_cli.spatial import check_size

    rows = []
    for name, config in PRESETS.items():
        row: dict[str, Any] = {"preset": name, "note": PRESET_NOTES[name], "config": config.to_dict(),
                               "parameters": count_parameters(EOIR(config))}
        if shape is not None:
            try:
                check_size([round(s * config.input_scale) for s in shape], config.size_multiple())
                row["gflops"] = count_flops(config, shape) / 1e9
            except ValueError as err:
                row["gflops"] = None
                row["gflops_error"] = str(err)
        rows.append(row)
    return rows


def default_model_info() -> dict[str, Any]:
    """What the bundled default model is, where it lives and where it came from (its provenance record).

    Keys: ``path``, ``present``, ``bytes``, ``sha256_ok`` (file matches the record), ``parameters``,
    ``model_config``, ``grid`` (the LUMIR grid it runs on), ``trained`` (steps, seconds, seed,
    commit, machine), ``data``, ``held_out``, ``command`` (reproduces it), ``dice`` (mean Dice
    before and after the default pipeline on the validation pairs of the record).
    """
    from eoir_cli.weights import DEFAULT_WEIGHTS, provenance, sha256

    record = provenance()
    present = DEFAULT_WEIGHTS.is_file()
    summary = record.get("validation", {}).get("summary", {})
    default_run = summary.get(record.get("validation", {}).get("default_setting", "network+affine+refine5"), {})
    return {
        "path": str(DEFAULT_WEIGHTS),
        "present": present,
        "bytes": DEFAULT_WEIGHTS.stat().st_size if present else None,
        "sha256_ok": present and sha256(DEFAULT_WEIGHTS) == record.get("sha256"),
        "parameters": record.get("parameters"),
        "model_config": record.get("model_config"),
        "grid": "LUMIR grid 160x224x192 at 1 mm (T1w brain MRI); the network runs at x"
                f"{record.get('model_config', {}).get('input_scale')} of it and upsamples its field",
        "trained": {k: record.get(k) for k in ("steps", "train_seconds", "seed", "commit", "machine")},
        "data": record.get("data"),
        "held_out": record.get("held_out"),
        "command": record.get("reproduce") or record.get("command"),
        "dice": {"pairs": record.get("validation", {}).get("pairs"),
                 "before": default_run.get("dice_before"), "after_default_pipeline": default_run.get("dice_after")},
    }
