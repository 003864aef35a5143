"""Deployment facts: what a trained network expects of its inputs, carried by every artifact.

A network is only right on inputs prepared the way it was trained: the same voxel spacing, a grid
of the size it learned on (or any size when it was trained on varying sizes), intensities mapped
to [0, 1] the same way, and images of the same kind. :class:`Deployment` holds those facts as
data; training writes them into every checkpoint (``.pt`` entry / ``.safetensors`` metadata key
``"deployment"``), export copies them into ONNX ``metadata_props`` and TensorRT engine sidecars,
and ``eoir register`` / ``eoir test`` / export verification read them back from the file, so a
model is run the way it was trained without flags and without guessing from its name.

The one intensity mapping is :func:`normalize` with a :class:`Normalization` spec:

=============  =====================================================  ============================
kind           ``[0, 1]`` value of a raw intensity ``x``              used by
=============  =====================================================  ============================
``percentile`` ``(x - P_lo) / (P_hi - P_lo)``, clipped (P = the        MR of unknown scale (default)
               image's own ``low``/``high`` percentiles)
``divide``     ``x / high``, clipped                                  LUMIR uint8 brains (``/255``)
``window``     ``(x - low) / (high - low)``, clipped                  CT in HU (``-500 .. 800``)
``minmax``     ``(x - min) / (max - min)``                            OASIS, ACDC, pair lists
=============  =====================================================  ============================

Artifacts written before these facts existed (and original EOIR checkpoints) get
:func:`assumed_deployment`: 1 mm, the grid the file itself records (original checkpoints store
their training size) or the LUMIR grid for the bundled model's lineage, percentile intensities,
domain ``any``; :attr:`Deployment.source` then says ``"assumed"``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from eoir_cli.config import LUMIR_SHAPE
from eoir_cli.errors import InputError

NormalizationKind = Literal["percentile", "divide", "window", "minmax"]
NORMALIZATION_KINDS = ("percentile", "divide", "window", "minmax")
# The names the dataset loaders used before specs existed (still accepted by normalize()).
ALIASES = {"u8": ("divide", None, 255.0), "ct": ("window", -500.0, 800.0), "minmax": ("minmax", None, None),
           "percentile": ("percentile", 0.5, 99.5)}


@dataclass(frozen=True)
class Normalization:
    """How raw intensities become the network's [0, 1] input (see the module table).

    Attributes:
        kind: ``percentile``, ``divide``, ``window`` or ``minmax``.
        low: lower percentile (``percentile``) or raw value mapped to 0 (``window``).
        high: upper percentile, divisor (``divide``) or raw value mapped to 1 (``window``).
    """

    kind: NormalizationKind = "percentile"
    low: float | None = 0.5
    high: float | None = 99.5

    def __post_init__(self) -> None:
        if self.kind not in NORMALIZATION_KINDS:
            raise InputError(f"normalization kind: expected one of {NORMALIZATION_KINDS}, got {self.kind!r}")
        if self.kind in ("percentile", "window") and not (self.low is not None and self.high is not None
                                                          and self.high > self.low):
            raise InputError(f"normalization {self.kind}: expected low < high, got {self.low}, {self.high}")
        if self.kind == "divide" and not (self.high is not None and self.high > 0):
            raise InputError(f"normalization divide: expected a divisor > 0, got {self.high}")

    @classmethod
    def parse(cls, value: Normalization | str | Mapping[str, Any]) -> Normalization:
        """A spec from itself, an alias (``u8``, ``ct``, ``minmax``, ``percentile``) or its dict."""
        if isinstance(value, Normalization):
            return value
        if isinstance(value, str):
            if value not in ALIASES:
                raise InputError(f"normalization: expected one of {sorted(ALIASES)} or a spec, got {value!r}")
            kind, low, high = ALIASES[value]
            return cls(kind, low, high)  # type: ignore[arg-type]
        unknown = set(value) - {"kind", "low", "high"}
        if unknown:
            raise InputError(f"normalization: unknown keys {sorted(unknown)}; expected kind, low, high")
        return cls(value.get("kind", "percentile"), value.get("low"), value.get("high"))

    @classmethod
    def window_of(cls, low: float, high: float) -> Normalization:
        """A fixed raw-value window, e.g. ``(-500, 800)`` HU for abdomen CT."""
        return cls("window", float(low), float(high))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for tables and messages."""
        if self.kind == "percentile":
            return f"percentiles {self.low:g}-{self.high:g} -> [0, 1]"
        if self.kind == "divide":
            return f"/{self.high:g}, clipped to [0, 1]"
        if self.kind == "window":
            return f"window [{self.low:g}, {self.high:g}] -> [0, 1]"
        return "min-max -> [0, 1]"


def normalize(data: np.ndarray, spec: Normalization | str | Mapping[str, Any] = "percentile",
              reference: np.ndarray | None = None, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Map raw intensities to [0, 1] float32 by ``spec`` (the one normalisation of train, test, register, export).

    Args:
        data: raw intensities, any shape.
        spec: a :class:`Normalization`, its dict, or an alias (``u8``, ``ct``, ``minmax``, ``percentile``).
        reference: take the image-dependent bounds (percentiles, min/max) from this array instead
            (e.g. a warped image shown with its source image's contrast).
        bounds: the raw values that map to 0 and 1, when already known (:func:`intensity_bounds`).

    Returns:
        float32 array of ``data``'s shape in [0, 1].
    """
    spec = Normalization.parse(spec)
    lo, hi = bounds if bounds is not None else intensity_bounds(data if reference is None else reference, spec)
    out = (np.asarray(data, dtype=np.float32) - lo) / max(hi - lo, 1e-12)
    return np.clip(out, 0.0, 1.0, out=out)


def intensity_bounds(data: np.ndarray, spec: Normalization) -> tuple[float, float]:
    """The raw values ``spec`` maps to 0 and 1 for this image."""
    x = np.asarray(data)
    if spec.kind == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, (spec.low, spec.high)))
        if hi <= lo:  # mostly-constant images (a small object on a flat background)
            lo, hi = float(x.min()), float(x.max())
    elif spec.kind == "divide":
        lo, hi = 0.0, float(spec.high)  # type: ignore[arg-type]
    elif spec.kind == "window":
        lo, hi = float(spec.low), float(spec.high)  # type: ignore[arg-type]
    else:
        lo, hi = float(x.min()), float(x.max())
    return lo, hi


DOMAINS = ("brain MRI", "abdomen CT", "cardiac MRI", "any")


@dataclass(frozen=True)
class Deployment:
    """The facts a network's inputs must match.

    Attributes:
        spacing: network voxel size in mm per array axis of the (canonical) network grid, or None
            = the fixed image's own voxel size.
        grid: network grid ``(D, H, W)`` the model was trained on, or None = fit to the image
            (the fixed foreground plus a margin, rounded up to a size the network takes).
        normalization: the intensity mapping to [0, 1].
        domain: ``brain MRI``, ``abdomen CT``, ``cardiac MRI`` or ``any``.
        source: where the facts came from (``"model file"``, ``"preset"``, ``"assumed"``); not stored.
    """

    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    grid: tuple[int, int, int] | None = None
    normalization: Normalization = field(default_factory=Normalization)
    domain: str = "any"
    source: str = field(default="model file", compare=False)

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise InputError(f"deployment spacing: expected 3 sizes > 0 mm, got {self.spacing}")
        if self.grid is not None and (len(self.grid) != 3 or min(self.grid) < 2):
            raise InputError(f"deployment grid: expected 3 sizes >= 2, got {self.grid}")
        if self.domain not in DOMAINS:
            raise InputError(f"deployment domain: expected one of {DOMAINS}, got {self.domain!r}")

    @property
    def modality(self) -> str | None:
        """``"MRI"``, ``"CT"`` or None (any)."""
        return None if self.domain == "any" else self.domain.split()[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON) as stored in artifacts."""
        return {"spacing": list(self.spacing) if self.spacing else None,
                "grid": list(self.grid) if self.grid else None,
                "normalization": self.normalization.to_dict(), "domain": self.domain}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str, source: str = "model file") -> Deployment:
        """Inverse of :meth:`to_dict` (a JSON string is decoded first)."""
        if isinstance(data, str):
            data = json.loads(data)
        unknown = set(data) - {"spacing", "grid", "normalization", "domain"}
        if unknown:
            raise InputError(f"deployment: unknown keys {sorted(unknown)}; expected spacing, grid, normalization, "
                             "domain")
        spacing, grid = data.get("spacing"), data.get("grid")
        return cls(spacing=_triple(spacing, float), grid=_triple(grid, int),
                   normalization=Normalization.parse(data.get("normalization") or "percentile"),
                   domain=data.get("domain") or "any", source=source)

    def replace(self, **changes: Any) -> Deployment:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: ``brain MRI, 1 mm, grid 160×224×192, percentiles 0.5-99.5 -> [0, 1]``."""
        if self.spacing is None:
            sp = "native spacing"
        elif len(set(self.spacing)) == 1:
            sp = f"{self.spacing[0]:g} mm"
        else:
            sp = "×".join(f"{s:g}" for s in self.spacing) + " mm"
        grid = "grid fitted to the image" if self.grid is None else "grid " + "×".join(map(str, self.grid))
        return f"{self.domain}, {sp}, {grid}, {self.normalization.describe()}"


def _triple(value: Any, kind: type) -> Any:
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    return tuple(kind(v) for v in values)


_BRAIN = Deployment(spacing=(1.0, 1.0, 1.0), grid=LUMIR_SHAPE, normalization=Normalization(), domain="brain MRI")

# What each training dataset (and the preset named after it) implies. The one place where a name maps to
# facts: it is read when an artifact is *made* (training, a preset's random weights), never when one is run.
DATASET_DEPLOYMENT: dict[str, Deployment] = {
    "lumir": _BRAIN.replace(normalization=Normalization.parse("u8")),
    "synth": _BRAIN,
    "oasis": _BRAIN.replace(grid=(160, 192, 224), normalization=Normalization.parse("minmax")),
    "abdomen": Deployment(spacing=(2.0, 2.0, 2.0), grid=None, normalization=Normalization.parse("ct"),
                          domain="abdomen CT"),
    "acdc": Deployment(spacing=None, grid=None, normalization=Normalization.parse("minmax"), domain="cardiac MRI"),
    "pairs": Deployment(spacing=None, grid=None, normalization=Normalization.parse("minmax"), domain="any"),
}
PRESET_DATASET = {"lumir": "lumir", "oasis": "oasis", "abdomen": "abdomen", "acdc": "acdc"}


def preset_deployment(preset: str) -> Deployment:
    """Facts of a preset's random-weight model (those of the dataset it is named after)."""
    return DATASET_DEPLOYMENT[PRESET_DATASET[preset]].replace(source="preset")


def training_deployment(dataset: str, shape: Sequence[int] | None) -> Deployment:
    """Facts a training run on ``dataset`` writes into its checkpoints (``shape``: ``--shape``, the trained grid)."""
    base = DATASET_DEPLOYMENT[dataset]
    return base.replace(grid=tuple(int(s) for s in shape)) if shape is not None else base


def assumed_deployment(info: Mapping[str, Any] | None) -> Deployment:
    """Facts for an artifact that does not carry them (see the module docstring)."""
    info = info or {}
    grid = info.get("grid_size")
    train = info.get("train_config") if isinstance(info.get("train_config"), Mapping) else {}
    dataset = info.get("dataset") or train.get("dataset")
    if grid is None and dataset in DATASET_DEPLOYMENT:
        return training_deployment(dataset, train.get("shape")).replace(source="assumed")
    return Deployment(spacing=(1.0, 1.0, 1.0), grid=tuple(int(s) for s in grid) if grid else None,
                      normalization=Normalization(), domain="any", source="assumed")


def deployment_of(info: Mapping[str, Any] | None) -> Deployment:
    """The facts recorded in checkpoint ``info`` / export metadata (key ``"deployment"``), else assumed ones."""
    raw = (info or {}).get("deployment")
    if raw is None:
        return assumed_deployment(info)
    return Deployment.from_dict(raw)


def image_modality(data: np.ndarray) -> str | None:
    """``"CT"`` when intensities reach Hounsfield-unit air (below -500; MR values never go that low),
    ``"MRI"`` when they are non-negative, None when it cannot tell (e.g. z-scored MR)."""
    low = float(np.min(data))
    if low < -500:
        return "CT"
    return "MRI" if low >= 0 else None
