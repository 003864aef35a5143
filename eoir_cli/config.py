"""The single source of defaults: model presets, the training run config, the pipeline defaults.

A :class:`ModelConfig` is frozen; presets are instances, and ``preset.replace(...)``
(or :func:`resolve_config`) derives an overridden copy. Checkpoints store
``dataclasses.asdict(config)`` so a model can always be rebuilt from its file; training
checkpoints also store ``TrainConfig.to_dict()`` (its field names are a file format: keep them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from eoir_cli.errors import InputError

# The LUMIR 2024 grid (T1w brain, 1 mm isotropic): the bundled model's input size, the synthetic
# default and the shape exports default to.
LUMIR_SHAPE = (160, 224, 192)
LUMIR_SPACING = 1.0


def check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming the keys of ``data`` that are not fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{what}: unknown keys {unknown}; expected a subset of {sorted(names)}")


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
            raise InputError(f"channels: expected >= 1, got {self.channels}")
        if not 1 <= self.levels <= 8:
            raise InputError(f"levels: expected 1..8, got {self.levels}")
        if self.int_steps < 0:
            raise InputError(f"int_steps: expected >= 0, got {self.int_steps}")
        if self.large_kernel and (self.large_kernel <= 3 or self.large_kernel % 2 == 0):
            raise InputError(f"large_kernel: expected 0 or an odd size > 3, got {self.large_kernel}")
        if not 0.0 < self.input_scale <= 1.0:
            raise InputError(f"input_scale: expected 0 < s <= 1, got {self.input_scale}")

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
        raise InputError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}") from None
    return base.replace(**overrides)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (the single source of training defaults).

    Attributes:
        dataset: ``synth``, ``lumir``, ``oasis``, ``abdomen``, ``acdc`` or ``pairs``.
        data_dir: dataset root (synth: label maps; default the shared sample data if present).
        preset: model preset (``lumir``, ``oasis``, ``abdomen``, ``acdc``).
        channels: start channels, overriding the preset.
        input_scale: resample factor before the network, overriding the preset (0.5 = half).
        levels: pyramid levels, overriding the preset.
        int_steps: scaling-and-squaring steps, overriding the preset.
        shape: image size ``(D, H, W)`` fed to the model (synth: generated size; real data:
            resampled to it when given, else the native size).
        steps: total optimisation steps (wins over ``epochs``).
        epochs: passes over the dataset's epoch length (synth: 1000 samples).
        batch_size: pairs per step and per process.
        lr: initial learning rate (Adam, amsgrad).
        val_every: validate every this many steps (0 = only at the end).
        save_every: write ``last.pt`` every this many steps (and at the end).
        val_pairs: number of seeded synthetic validation pairs (synth only).
        seed: seeds the weights and every sample.
        amp: mixed precision: fp16 with loss scaling on CUDA, bf16 autocast on CPU (1.7-1.9x
            faster per step on an AVX512-BF16 CPU; the loss, warps and integration stay fp32).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: ``last.pt`` (or its run directory) to continue from.
        out: run directory.
        windows: NCC window per level (last one for coarser levels); ``None`` = preset default
            (``(9,)`` for lumir, ``(9, 5, 3)`` otherwise).
        smooth_weight: weight of the velocity smoothness term.
        penalty: ``l2`` (LUMIR) or ``l1`` smoothness.
        dice_weight: weight of the soft Dice term (used when the dataset has labels).
        real_fraction: synth: share of real-image pairs.
        shapes_fraction: synth: share of random-shape pairs when label maps exist.
        num_workers: data-loader worker processes.
        log_every: rewrite ``metrics.csv`` every this many steps.
        holdout: synth: subjects (file-name substrings) kept out of training; validation then runs
            on real pairs of them against the other labelled subjects (Dice on the manifest's
            ``labels_eval``), instead of seeded synthetic pairs.
        flip_fraction: synth: share of label-map pairs mirrored left-right (both images).
    """

    dataset: str = "synth"
    data_dir: str | None = None
    preset: str = "lumir"
    channels: int | None = None
    input_scale: float | None = None
    levels: int | None = None
    int_steps: int | None = None
    shape: tuple[int, int, int] | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    lr: float = 1e-4
    val_every: int = 500
    save_every: int = 500
    val_pairs: int = 4
    seed: int = 0
    amp: bool = False
    device: str = "auto"
    resume: str | None = None
    out: str = "runs/eoir"
    windows: tuple[int, ...] | None = None
    smooth_weight: float = 1.0
    penalty: str = "l2"
    dice_weight: float = 1.0
    real_fraction: float = 0.0
    shapes_fraction: float = 0.5
    num_workers: int = 0
    log_every: int = 50
    holdout: tuple[str, ...] = ()
    flip_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected >= 1, got {value}")
        for name in ("val_every", "save_every", "num_workers", "val_pairs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.penalty not in ("l1", "l2"):
            raise ValueError(f"penalty: expected 'l1' or 'l2', got {self.penalty!r}")
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 2):
            raise ValueError(f"shape: expected 3 sizes >= 2, got {self.shape}")
        if self.smooth_weight < 0 or self.dice_weight < 0:
            raise ValueError("smooth_weight and dice_weight: expected >= 0")

    def model_config(self) -> ModelConfig:
        return resolve_config(self.preset, channels=self.channels, input_scale=self.input_scale,
                              levels=self.levels, int_steps=self.int_steps)

    def loss_windows(self) -> tuple[int, ...]:
        if self.windows:
            return tuple(self.windows)
        return (9,) if self.preset == "lumir" else (9, 5, 3)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        check_keys(cls, data, "train config")
        fixed = {k: (tuple(v) if k in ("shape", "windows", "holdout") and v is not None else v)
                 for k, v in data.items()}
        return cls(**fixed)

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class PipelineDefaults:
    """Defaults of ``eoir register`` / ``eoir demo``, chosen by measurement (README, "Speed, and a busy CPU").

    Refinement runs coarse to fine: 15 Adam steps at a quarter of the network grid (each ~1/8 the
    cost of a half-resolution step), then 3 at half resolution, NCC window 5; the search integrates
    with 1 squaring step and the answer with 4; its updates pass through a Gaussian of 1 voxel
    (issue 13: the same Dice, half the inverse's round-trip error). On the labelled sample brains
    with the bundled network this reaches mean Dice 0.724 in ~1.2 s (30 + 2 steps with 2 squarings:
    0.723 in ~1.8 s); ``benchmarks/bench_default_pipeline.py --refine 3 --coarse 15`` re-measures it.
    The inverse transform is an output chosen with ``--inverse`` (not a default: ~1.5 s per
    LUMIR-grid pair).
    """

    affine: bool = True
    refine: int = 3
    refine_lr: float = 0.5
    refine_weight: float = 2.0
    refine_window: int = 5
    refine_int_steps: int = 4
    refine_search_int_steps: int = 1
    refine_coarse: int = 15  # steps at a quarter of the network grid before the ``refine`` steps at half
    refine_sigma: float = 1.0  # Gaussian (voxels) on the refinement's updates: Dice kept, inverse round trip halved
    refine_sigma_max: float = 8.0  # beyond it a quarter-resolution update is a near-constant shift (> 32 mm at 1 mm)
    inverse_fit: int = 1  # least-squares steps fitting the inverse between voxels (eoir_cli.inverse.fit_inverse)


PIPELINE = PipelineDefaults()
