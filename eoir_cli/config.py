"""Model presets: the single source of defaults for every EOIR configuration.

A :class:`ModelConfig` is frozen; presets are instances, and ``preset.replace(...)``
(or :func:`resolve_config`) derives an overridden copy. Checkpoints store
``dataclasses.asdict(config)`` so a model can always be rebuilt from its file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``data`` that are not fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected a subset of {sorted(names)}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one EOIR network.

    Attributes:
        channels: start channels C of the shared encoder (32 in every published result).
        levels: pyramid levels (level 0 = finest, run last).
        int_steps: scaling-and-squaring steps per level (0 = no integration).
        large_kernel: 0 for the plain network; k > 3 adds a large-kernel block (k×k×k) as a
            fourth encoder layer and as the first conv of every flow estimator (OASIS variant).
        feature_halving: halve the encoder features once before the pyramid, so the finest flow
            is at half resolution and the output displacement is upsampled ×2 (OASIS variant).
        inplane_only: halve only the first two array axes per level (ACDC, 128×128×16 inputs).
        input_scale: resample both images by this factor before the network and the displacement
            back afterwards (0.5 = the half-resolution LUMIR/abdomen models).
    """

    channels: int = 32
    levels: int = 5
    int_steps: int = 7
    large_kernel: int = 0
    feature_halving: bool = False
    inplane_only: bool = False
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels: expected >= 1, got {self.channels}")
        if not 1 <= self.levels <= 8:
            raise ValueError(f"levels: expected 1..8, got {self.levels}")
        if self.int_steps < 0:
            raise ValueError(f"int_steps: expected >= 0, got {self.int_steps}")
        if self.large_kernel and (self.large_kernel <= 3 or self.large_kernel % 2 == 0):
            raise ValueError(f"large_kernel: expected 0 or an odd size > 3, got {self.large_kernel}")
        if not 0.0 < self.input_scale <= 1.0:
            raise ValueError(f"input_scale: expected 0 < s <= 1, got {self.input_scale}")

    @property
    def level_factors(self) -> tuple[int, int, int]:
        """Per-axis resampling factor between two pyramid levels."""
        return (2, 2, 1) if self.inplane_only else (2, 2, 2)

    def size_multiple(self) -> tuple[int, int, int]:
        """Per-axis divisor that every network-scale input size must be a multiple of.

        Level i is the input halved i times (×(feature_halving) once more), so a size must divide by
        2^(levels-1) (2^levels with feature halving) on every axis the pyramid halves.
        """
        halvings = self.levels - 1 + (1 if self.feature_halving else 0)
        return tuple(f**halvings for f in self.level_factors)  # type: ignore[return-value]

    def replace(self, **overrides: Any) -> ModelConfig:
        """Return a copy with ``overrides`` applied (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a stored dict, refusing unknown keys with a clear message."""
        check_keys(cls, data, "model config")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # The LUMIR 2024 submission: the plain network, 909,232 parameters.
    "lumir": ModelConfig(channels=32),
    # OASIS variant of the original code: large-kernel blocks, flow at half resolution, 4 levels.
    "oasis": ModelConfig(channels=32, levels=4, int_steps=0, large_kernel=5, feature_halving=True),
    # Abdomen CT runs the plain network on half-resolution inputs.
    "abdomen": ModelConfig(channels=32, input_scale=0.5),
    # ACDC 128×128×16: the pyramid halves only the in-plane axes.
    "acdc": ModelConfig(channels=32, inplane_only=True),
}

PRESET_NOTES: dict[str, str] = {
    "lumir": "plain EOIR, LUMIR 2024 submission (T1w brain, 160×224×192, 1 mm)",
    "oasis": "large-kernel variant, half-resolution flow, 4 levels (OASIS, 160×192×224)",
    "abdomen": "plain EOIR on half-resolution inputs (abdomen CT, 192×160×256, 2 mm)",
    "acdc": "plain EOIR, in-plane-only pyramid (cardiac cine MRI, 128×128×16)",
}


def resolve_config(preset: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """Return the preset named ``preset`` (or the given config) with ``overrides`` applied.

    Raises:
        ValueError: for an unknown preset name, listing the known ones.
    """
    if isinstance(preset, ModelConfig):
        return preset.replace(**overrides)
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}") from None
    return base.replace(**overrides)


@dataclass(frozen=True)
class PipelineDefaults:
    """Defaults of ``eoir register`` / ``eoir demo``, chosen by measurement (README, "Default model").

    On the labelled sample brains, 5 refinement steps at half resolution with a 5-voxel NCC window
    and 4 squaring steps reach ANTs SyN's mean Dice in ~6.5 s per pair on 2 CPU cores; 10 steps add
    +0.02 Dice for +2.4 s (``--refine 10``).
    """

    affine: bool = True
    refine: int = 5
    refine_lr: float = 0.5
    refine_weight: float = 2.0
    refine_window: int = 5
    refine_int_steps: int = 4


PIPELINE = PipelineDefaults()
