"""Loading and saving EOIR weights: our own checkpoints and the original EOIR code's.

Nothing here can run code from a file: ``.pt``/``.pth`` files are read with
``torch.load(weights_only=True)`` and ``.safetensors`` with safetensors.

Key mapping from the original code's ``state_dict`` to ours (see ``official_checkpoint.md``):

=====================================  =====================================
original                               eoir
=====================================  =====================================
``simple_encoder.i.…``                 ``encoder.i.…``
``disp_warp_L.disp_field_fea.j.…``     ``estimators.L.features.j.…``
``disp_warp_L.get_flow.…``             ``estimators.L.to_velocity.…``
``transformers.i.grid``,               dropped: sampling grids are rebuilt at run time
``integrates.i.transformer.grid``
=====================================  =====================================
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from eoir_cli import __version__
from eoir_cli.config import PRESETS, ModelConfig, resolve_config
from eoir_cli.errors import EoirError
from eoir_cli.fileio import atomic_path, model_suffix
from eoir_cli.model import EOIR
from eoir_cli.spatial import Sampler

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".safetensors")  # .pth.tar: the original EOIR code's names

_TO_OURS = (
    (re.compile(r"^simple_encoder\."), "encoder."),
    (re.compile(r"^disp_warp_(\d+)\.disp_field_fea\."), r"estimators.\1.features."),
    (re.compile(r"^disp_warp_(\d+)\.get_flow\."), r"estimators.\1.to_velocity."),
)
_TO_ORIGINAL = (
    (re.compile(r"^encoder\."), "simple_encoder."),
    (re.compile(r"^estimators\.(\d+)\.features\."), r"disp_warp_\1.disp_field_fea."),
    (re.compile(r"^estimators\.(\d+)\.to_velocity\."), r"disp_warp_\1.get_flow."),
)
_GRID_KEY = re.compile(r"^(transformers\.\d+|integrates\.\d+\.transformer)\.grid$")


class CheckpointError(EoirError, ValueError):
    """A checkpoint that cannot be read or does not fit the requested model (a user error: one line)."""


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, repl in rules:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def original_to_eoir_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an original EOIR ``state_dict`` to our key names, dropping the grid buffers."""
    return {_rename(k, _TO_OURS): v for k, v in state.items() if not _GRID_KEY.match(k)}


def eoir_to_original_state_dict(
    state: dict[str, torch.Tensor], grid_size: tuple[int, int, int] | None = None, levels: int = 5
) -> dict[str, torch.Tensor]:
    """Map our ``state_dict`` to the original code's key names.

    With ``grid_size`` the original's persistent grid buffers are added too (as the original
    code writes them), so the result loads into the original ``EOIR`` module with ``strict=True``.
    """
    out = {_rename(k, _TO_ORIGINAL): v for k, v in state.items()}
    if grid_size is not None:
        from eoir_cli.spatial import identity_grid

        for i in range(levels):
            grid = identity_grid([s // 2**i for s in grid_size])
            out[f"transformers.{i}.grid"] = grid
            out[f"integrates.{i}.transformer.grid"] = grid.clone()
    return out


def infer_original_config(state: dict[str, torch.Tensor]) -> tuple[ModelConfig, tuple[int, ...] | None]:
    """Infer the architecture of an original-format ``state_dict`` from its weight shapes.

    Returns:
        The config and the training image size recorded in the grid buffers (None if absent).
        Integration steps cannot be seen in weights; the original default (7) is assumed.
    """
    key = "simple_encoder.0.layer.0.weight"
    if key not in state:
        raise CheckpointError(f"not an EOIR checkpoint: expected key {key!r}, got keys like "
                              f"{sorted(state)[:3]}")
    channels = int(state[key].shape[0])
    levels = len({m.group(1) for k in state if (m := re.match(r"disp_warp_(\d+)\.", k))})
    large = [v for k, v in state.items() if re.match(r"simple_encoder\.\d+\.layer\.large\.0\.weight$", k)]
    large_kernel = int(large[0].shape[-1]) if large else 0
    grid_size = None
    inplane_only = False
    if "transformers.0.grid" in state:
        grid_size = tuple(int(s) for s in state["transformers.0.grid"].shape[2:])
        if "transformers.1.grid" in state:
            level1 = tuple(int(s) for s in state["transformers.1.grid"].shape[2:])
            inplane_only = level1[2] == grid_size[2] and level1[0] < grid_size[0]
    base = PRESETS["oasis"] if large_kernel else PRESETS["lumir"]
    config = base.replace(channels=channels, levels=levels, inplane_only=inplane_only,
                          large_kernel=large_kernel or 0)
    return config, grid_size


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than weights "
                              f"(weights_only=True) [{first}]") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({msg})") from None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("reading .safetensors needs the 'safetensors' package: pip install safetensors") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as err:  # safetensors raises its own SafetensorError (not importable by name)
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file without building a model.

    Returns:
        ``(config, state_dict in our key names, info)``; ``info`` holds ``format``
        (``"eoir"`` or ``"original"``), ``grid_size`` for original files, and any stored metadata
        (``normalization``, provenance, training step).

    Raises:
        CheckpointError: missing, unreadable, hostile or non-EOIR files, with one clear line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if model_suffix(path) == ".safetensors":
        state, meta = _safetensors_load(path)
        if "config" not in meta:
            config, grid = infer_original_config(state) if "simple_encoder.0.layer.0.weight" in state else (None, None)
            if config is None:
                raise CheckpointError(f"{path}: safetensors file without an eoir 'config' metadata entry")
            return config, original_to_eoir_state_dict(state), {"format": "original", "grid_size": grid}
        info: dict[str, Any] = {k: (json.loads(v) if k != "format" else v) for k, v in meta.items()
                                if k != "config"} | {"format": meta.get("format", "eoir")}
        return _config_from(meta["config"], path), state, info
    if model_suffix(path) not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {model_suffix(path)!r}; expected one of {CHECKPOINT_SUFFIXES}"
        )
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(data).__name__}")
    if data.get("format") == "eoir":
        extra = {k: v for k, v in data.items() if k not in ("model", "config", "optimizer", "scheduler", "rng")}
        return _config_from(data.get("config"), path), data["model"], extra
    state = data.get("model_state_dict", data.get("state_dict", data))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected an EOIR state_dict, got a dict with keys {sorted(data)[:5]}")
    config, grid = infer_original_config(state)
    return config, original_to_eoir_state_dict(state), {"format": "original", "grid_size": grid}


def _config_from(raw: Any, path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(raw) if isinstance(raw, str) else dict(raw))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid model config ({err})") from None


def load_model(
    path_or_preset: str | os.PathLike[str] = "default",
    sampler: Sampler = "torch",
    device: str | torch.device = "cpu",
    expect: ModelConfig | None = None,
    **overrides: Any,
) -> EOIR:
    """Build an EOIR model in eval mode from a checkpoint file, the bundled model or a preset.

    Args:
        path_or_preset: a ``.pt``/``.pth``/``.safetensors`` file (ours or the original EOIR
            code's), ``"default"`` for the bundled brain model, or a preset name (random weights).
            The returned model's ``checkpoint_info`` holds what the file records, including its
            deployment facts (``"deployment"``, see :mod:`eoir_cli.deployment`) when it has them.
        sampler: sampler every warp in the network uses (``"torch"`` or ``"gather"``).
        device: where to put the model.
        expect: refuse a checkpoint whose configuration differs from this one.
        **overrides: config fields that weights cannot tell (e.g. ``int_steps``, ``input_scale``).

    Raises:
        CheckpointError: unreadable or hostile file, or weights of another configuration.
    """
    name = str(path_or_preset)
    info: dict[str, Any] = {}
    bundled: dict[str, Any] = {}
    if name == "default" and not Path(name).exists():
        from eoir_cli.weights import default_model_path, provenance

        name = str(default_model_path())
        bundled = {k: v for k, v in provenance().items() if k == "deployment"}
    if name in PRESETS and not Path(name).exists():
        from eoir_cli.deployment import preset_deployment

        config, state = resolve_config(name, **overrides), None
        info = {"format": "preset", "deployment": preset_deployment(name).to_dict()}
    else:
        config, state, info = read_checkpoint(name)
        info = {**bundled, **info}  # the bundled file's facts live in its provenance record
        config = config.replace(**overrides)
    if expect is not None and config != expect:
        raise CheckpointError(f"{name}: checkpoint configuration {config.to_dict()} differs from the expected "
                              f"{expect.to_dict()}")
    model = EOIR(config, sampler=sampler)
    if state is not None:
        missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
        wrong = [k for k in state.keys() & model.state_dict().keys() if state[k].shape != model.state_dict()[k].shape]
        if missing or unexpected or wrong:
            detail = (f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
                      if unexpected else f"shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} vs "
                      f"{tuple(model.state_dict()[wrong[0]].shape)}")
            raise CheckpointError(f"{name}: weights do not fit the configuration {config.to_dict()} ({detail})")
        model.load_state_dict(state)
    model.checkpoint_info = info  # type: ignore[attr-defined]
    return model.to(device).eval()


def save_checkpoint(
    path: str | os.PathLike[str], model: EOIR, extra: dict[str, Any] | None = None
) -> Path:
    """Write our checkpoint format atomically: ``.pt`` (torch) or ``.safetensors`` (weights only).

    ``.pt`` files hold ``{"format": "eoir", "eoir_version", "config", "model", **extra}``; extra
    entries must be plain data/tensors so the file stays loadable with ``weights_only=True``.
    ``.safetensors`` files store the config and ``extra`` as JSON strings in their metadata.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {"format": "eoir", "eoir_version": json.dumps(__version__),
                    "config": json.dumps(model.config.to_dict())}
            meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save({"format": "eoir", "eoir_version": __version__, "config": model.config.to_dict(),
                        "model": state, **(extra or {})}, tmp)
    log.info("wrote %s", path)
    return path
