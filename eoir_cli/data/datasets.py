"""Datasets in their released layouts (LUMIR, OASIS, abdomen CT, ACDC, pair lists) and ``synth``.

Every dataset resolves to three lists of :class:`PairRecord`/:class:`ImageRecord` built from the
data root without touching the images (so bad layouts fail fast with one clear line):

* training: images (random inter-subject pairs) or explicit pairs (ACDC: ED/ES of one subject),
* validation: labelled pairs (Dice, HD95, TRE),
* test: the manifest's submission pairs (``fixed``, ``moving``), labels optional.

Images are read lazily with :func:`eoir_cli.io.load_volume` and normalised to [0, 1] by
:func:`eoir_cli.deployment.normalize` (``u8`` = ``/255`` for LUMIR-style uint8 brains,
``minmax`` per image for OASIS/ACDC MRI, ``ct`` = HU window [-500, 800]); training records the
same spec in its checkpoints, so ``eoir register`` feeds the network what it was trained on.
Nothing is ever written inside the data directory.

Sample dicts (what the training loop and ``eoir test`` consume): ``moving``/``fixed``
``(1, D, H, W)`` float32 in [0, 1]; when labelled, ``moving_labels``/``fixed_labels`` ``(D, H, W)``
int64 (contiguous class indices for training, original label values for evaluation) and
``has_labels``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from eoir_cli.config import LUMIR_SHAPE
from eoir_cli.deployment import Normalization, normalize
from eoir_cli.errors import EoirError

if TYPE_CHECKING:
    from eoir_cli.config import TrainConfig

log = logging.getLogger(__name__)

DATASETS = ("synth", "lumir", "oasis", "abdomen", "acdc", "pairs")
SPLITS = ("train", "val", "test")
NormalizationAlias = Literal["u8", "minmax", "ct"]  # names accepted by eoir_cli.deployment.normalize
SYNTH_DEFAULT_SHAPE = LUMIR_SHAPE
SYNTH_EPOCH = 1000
VAL_SEED = 20241125


class DatasetError(EoirError):
    """A data root, manifest or file that does not fit the requested dataset layout."""


@dataclass(frozen=True)
class ImageRecord:
    """One image (and optional label map) of a dataset, identified for messages by ``entry``."""

    image: Path
    seg: Path | None = None
    entry: str = ""
    id: str = ""


@dataclass(frozen=True)
class PairRecord:
    """A (fixed, moving) pair of records; ``fixed``'s grid is the output grid."""

    fixed: ImageRecord
    moving: ImageRecord
    name: str = ""
    split: str = ""  # a pair list's ``split`` column: "train", "val" or "" (not said)

    @property
    def label(self) -> str:
        """``name`` when the list gave one, else ``<fixed id>_<moving id>`` (a folder-safe name)."""
        return re.sub(r"[^\w.-]", "_", self.name or f"{self.fixed.id}_{self.moving.id}")


@dataclass
class DatasetLayout:
    """A released dataset resolved to records (no image read yet).

    Attributes:
        name: dataset name.
        root: data root.
        train_images: images for random inter-subject training pairs (empty when
            ``train_pairs`` is used instead).
        train_pairs: explicit training pairs (ACDC ED<->ES).
        val_pairs: labelled validation pairs.
        test_pairs: submission pairs from the manifest.
        normalization: how intensities map to [0, 1] (an alias of :func:`eoir_cli.deployment.normalize`).
        labels: label values used for training Dice and evaluation (None = all present).
        labels_eval: the manifest's ``labels_eval`` (the set it says to score), when it lists one.
        explicit_split: the layout says which pairs validate; False for a pair list without a
            ``split`` column, whose validation pairs are also its training pairs.
        spacing: voxel size in mm (evaluation HD95/TRE), None = read from the files.
    """

    name: str
    root: Path
    train_images: list[ImageRecord] = field(default_factory=list)
    train_pairs: list[PairRecord] = field(default_factory=list)
    val_pairs: list[PairRecord] = field(default_factory=list)
    test_pairs: list[PairRecord] = field(default_factory=list)
    normalization: NormalizationAlias = "minmax"
    labels: tuple[int, ...] | None = None
    labels_eval: tuple[int, ...] | None = None
    explicit_split: bool = True  # False: a pair list without a split column (training holds pairs out)

    @property
    def scored_labels(self) -> tuple[int, ...] | None:
        """The evaluation label set: the manifest's ``labels_eval``, else ``labels`` (None = all in both maps)."""
        return self.labels_eval or self.labels


# --------------------------------------------------------------------------------------------
# Reading and normalising images


def read_image(record: ImageRecord, how: NormalizationAlias | Normalization) -> tuple[np.ndarray, np.ndarray]:
    """``(image (D, H, W) float32 in [0, 1], affine 4x4)``; errors name the manifest entry."""
    from eoir_cli.io import load_volume

    try:
        vol = load_volume(record.image, "image")
    except EoirError as err:
        raise DatasetError(f"{record.entry or record.image}: {err}") from None
    return normalize(vol.data, how), vol.affine


def read_labels(record: ImageRecord, shape: tuple[int, ...]) -> np.ndarray:
    """Label map ``(D, H, W)`` int64 of ``record``, checked against the image ``shape``."""
    from eoir_cli.io import load_volume

    if record.seg is None:
        raise DatasetError(f"{record.entry or record.image}: expected a label map, got none")
    try:
        vol = load_volume(record.seg, "label")
    except EoirError as err:
        raise DatasetError(f"{record.entry or record.seg}: {err}") from None
    if tuple(vol.shape) != tuple(shape):
        raise DatasetError(f"{record.entry or record.seg}: label shape {vol.shape} differs from image shape "
                           f"{tuple(shape)} ({record.seg} vs {record.image})")
    return vol.data.astype(np.int64)


def _to_shape(image: torch.Tensor, shape: tuple[int, int, int] | None, mode: str) -> torch.Tensor:
    from eoir_cli.spatial import resize

    if shape is None or tuple(image.shape[-3:]) == tuple(shape):
        return image
    if mode == "nearest":
        return resize(image[None, None].float(), size=shape, mode="nearest")[0, 0].long()
    return resize(image[None], size=shape)[0]


def load_pair(pair: PairRecord, how: NormalizationAlias | Normalization, labels: bool,
              shape: tuple[int, int, int] | None = None, lut: np.ndarray | None = None,
              affines: bool = False) -> dict[str, torch.Tensor]:
    """Read one pair into a sample dict (see module docstring).

    Args:
        pair: the records.
        how: intensity normalisation.
        labels: also read the label maps.
        shape: resample to this size (trilinear / nearest), None = keep the native size.
        lut: map label values to contiguous classes (``lut[value]``), None = keep values.
        affines: also return ``moving_affine``/``fixed_affine`` ``(4, 4)`` float64 (voxel -> mm).
    """
    out: dict[str, torch.Tensor] = {}
    sizes = {}
    for name, rec in (("moving", pair.moving), ("fixed", pair.fixed)):
        image, affine = read_image(rec, how)
        sizes[name] = image.shape
        if affines:
            out[f"{name}_affine"] = torch.from_numpy(affine)
        out[name] = _to_shape(torch.from_numpy(image)[None], shape, "trilinear")
        if labels:
            seg = read_labels(rec, image.shape)
            if lut is not None:
                seg = lut[np.clip(seg, 0, len(lut) - 1)]
            out[f"{name}_labels"] = _to_shape(torch.from_numpy(seg), shape, "nearest")
    if shape is None and sizes["moving"] != sizes["fixed"]:
        raise DatasetError(f"{pair.moving.entry or pair.moving.image} and {pair.fixed.entry or pair.fixed.image}: "
                           f"expected equal image shapes, got {sizes['moving']} vs {sizes['fixed']} "
                           "(pass --shape to resample)")
    if labels:
        out["has_labels"] = torch.tensor(True)
    return out


# --------------------------------------------------------------------------------------------
# Training data for the training loop


@dataclass
class TrainingData:
    """What :func:`eoir_cli.train.train` consumes.

    Attributes:
        train: map-style dataset, ``train[i]`` a deterministic sample dict for any ``i >= 0``.
        epoch_length: samples per epoch.
        val: validation sample dicts (labelled when ``num_classes > 0``).
        num_classes: classes of the training labels (0 = no label supervision).
        shape: fixed sample size, or None when sizes vary.
    """

    train: torch.utils.data.Dataset
    epoch_length: int
    val: list[dict[str, torch.Tensor]]
    num_classes: int
    shape: tuple[int, int, int] | None


class RealPairs(torch.utils.data.Dataset):
    """Deterministic training pairs of a released dataset: ``dataset[i]`` depends on ``(seed, i)``."""

    def __init__(self, layout: DatasetLayout, seed: int, shape: tuple[int, int, int] | None,
                 lut: np.ndarray | None) -> None:
        self.layout = layout
        self.seed = seed
        self.shape = shape
        self.lut = lut

    def __len__(self) -> int:
        return max(len(self.layout.train_images), len(self.layout.train_pairs))

    def pair(self, index: int) -> PairRecord:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + int(index) * 7919 + 99991) % (2**63 - 1))
        if self.layout.train_pairs:
            return self.layout.train_pairs[int(torch.randint(len(self.layout.train_pairs), (), generator=gen))]
        images = self.layout.train_images
        i = int(torch.randint(len(images), (), generator=gen))
        j = int(torch.randint(len(images) - 1, (), generator=gen))
        j = j + 1 if j >= i else j
        return PairRecord(fixed=images[j], moving=images[i])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return load_pair(self.pair(index), self.layout.normalization, self.lut is not None, self.shape, self.lut)


def label_lut(values: Sequence[int]) -> np.ndarray:
    """Lookup table value -> contiguous class (0 stays 0; values not listed map to 0)."""
    values = sorted({0, *[int(v) for v in values]})
    lut = np.zeros(max(values) + 1, dtype=np.int64)
    for i, v in enumerate(values):
        lut[v] = i
    return lut


def hold_out_pairs(layout: DatasetLayout, count: int) -> DatasetLayout:
    """Move up to ``count`` labelled pairs of a list without a split from training to validation.

    At most a fifth of the labelled pairs is held out (at least one when there are two or more
    pairs), evenly spaced through the list, so training never validates on a pair it trains on. A
    list of one pair, or ``count == 0``, keeps training and validation on the same pairs (logged).
    """
    labelled = [i for i, p in enumerate(layout.train_pairs) if p.fixed.seg and p.moving.seg]
    n = min(count, max(1, len(labelled) // 5)) if len(layout.train_pairs) >= 2 and labelled else 0
    if n == 0:
        if labelled:
            log.warning("%s: validating on training pairs (no split column, and too few pairs or --val-pairs 0 to "
                        "hold any out)", layout.root)
        return dataclasses.replace(layout, val_pairs=[layout.train_pairs[i] for i in labelled], explicit_split=True)
    held = {labelled[int((k + 0.5) * len(labelled) / n)] for k in range(n)}
    log.info("%s: holding out %d of %d pairs for validation (add a split column to choose them)", layout.root, n,
             len(layout.train_pairs))
    return dataclasses.replace(
        layout, train_pairs=[p for i, p in enumerate(layout.train_pairs) if i not in held],
        val_pairs=[layout.train_pairs[i] for i in sorted(held)], explicit_split=True)


def label_values(pairs: Sequence[PairRecord]) -> tuple[int, ...]:
    """Sorted non-zero values found in the label maps of ``pairs`` (each distinct file read once)."""
    from eoir_cli.io import load_volume

    values: set[int] = set()
    for path in sorted({r.seg for p in pairs for r in (p.fixed, p.moving) if r.seg is not None}):
        values |= {int(v) for v in np.unique(load_volume(path, "label").data)}
    values.discard(0)
    if not values:
        raise DatasetError(f"{pairs[0].fixed.seg}: the label maps of the training pairs hold no non-zero label")
    return tuple(sorted(values))


def build_training_data(config: TrainConfig) -> TrainingData:
    """Training samples, validation pairs and label classes for ``config.dataset``."""
    if config.dataset == "synth":
        return _synth_training_data(config)
    layout = open_dataset(config.dataset, config.data_dir)
    if not layout.explicit_split:
        layout = hold_out_pairs(layout, config.val_pairs)
    if layout.labels is None and layout.name == "pairs" and layout.train_pairs and all(
            p.fixed.seg is not None and p.moving.seg is not None for p in layout.train_pairs):
        layout = dataclasses.replace(layout, labels=label_values(layout.train_pairs))
    train_labelled = layout.labels is not None and all(
        r.seg is not None for r in layout.train_images) and all(
        p.fixed.seg is not None and p.moving.seg is not None for p in layout.train_pairs)
    lut = label_lut(layout.labels) if train_labelled and layout.labels else None
    train = RealPairs(layout, config.seed, config.shape, lut)
    val = [load_pair(p, layout.normalization, True, config.shape, lut) for p in layout.val_pairs]
    num_classes = int(lut.max()) + 1 if lut is not None else 0
    epoch = len(layout.train_images) or len(layout.train_pairs)
    shape = config.shape
    if shape is None and val:
        shape = tuple(int(s) for s in val[0]["moving"].shape[1:])  # type: ignore[assignment]
    return TrainingData(train, epoch, val, num_classes, shape)


def _synth_training_data(config: TrainConfig) -> TrainingData:
    from eoir_cli.data.synth import SynthConfig, SynthPairs, default_synth_root

    shape = tuple(config.shape or SYNTH_DEFAULT_SHAPE)
    root = Path(config.data_dir) if config.data_dir else default_synth_root()
    synth = SynthConfig(shape=shape, real_fraction=config.real_fraction,  # type: ignore[arg-type]
                        shapes_fraction=config.shapes_fraction, flip_fraction=config.flip_fraction)
    # Training pairs are synthesised directly at the network size: generating at full size only to
    # downsample costs ~15x more per pair. Validation pairs stay full size (the model resamples them).
    scale = config.model_config().input_scale
    net_shape = tuple(int(round(s * scale)) for s in shape)
    train_synth = dataclasses.replace(synth, shape=net_shape) if net_shape != shape else synth
    train = SynthPairs(train_synth, root, seed=config.seed, length=SYNTH_EPOCH, exclude=config.holdout)
    if config.holdout:
        if root is None:
            raise DatasetError("--holdout: expected --data-dir with real labelled images to hold out, got none")
        val = holdout_pairs(root, config.holdout, shape)  # type: ignore[arg-type]
    else:
        val_set = SynthPairs(synth, root, seed=VAL_SEED)
        val = [val_set[i] for i in range(config.val_pairs)]
    return TrainingData(train, SYNTH_EPOCH, val, train.num_classes, shape)  # type: ignore[arg-type]


def holdout_pairs(root: Path, holdout: Sequence[str], shape: tuple[int, int, int]) -> list[dict[str, torch.Tensor]]:
    """Validation pairs of held-out subjects: every other labelled image registered to each held-out one.

    The held-out subject is the fixed image (as in the shared evaluation pairs). Labels keep their
    original values, restricted to the manifest's ``labels_eval`` when a ``*_dataset.json`` beside the
    images lists them (the challenge rule), so the validation Dice is the evaluation Dice. Images are
    scaled by /255 (uint8 brains).
    """
    from eoir_cli.data.synth import find_label_maps, read_array

    _, reals = find_label_maps(Path(root))
    labelled = [(img, lab) for img, lab, _ in reals if lab is not None]
    held = [r for r in labelled if any(h in r[0].name for h in holdout)]
    others = [r for r in labelled if r not in held]
    if not held or not others:
        raise DatasetError(f"--holdout {list(holdout)}: expected labelled images under {root} whose names contain "
                           f"it and at least one other, got {len(held)} held out of {len(labelled)}")
    keep: np.ndarray | None = None
    for manifest in sorted(Path(root).glob("*/*_dataset.json")):
        values = _read_json(manifest).get("labels_eval")
        if values:
            keep = np.asarray(sorted(int(v) for v in values))
            break
    record = {}
    for img, lab in held + others:
        image = read_array(img).astype(np.float32) / 255.0
        labels = read_array(lab).astype(np.int64)
        if keep is not None:
            labels = np.where(np.isin(labels, keep), labels, 0)
        record[img] = (_to_shape(torch.from_numpy(image)[None], shape, "trilinear"),
                       _to_shape(torch.from_numpy(labels), shape, "nearest"))
    pairs = []
    for first in held:
        for second in others:
            pairs.append({"fixed": record[first[0]][0], "moving": record[second[0]][0],
                          "fixed_labels": record[first[0]][1], "moving_labels": record[second[0]][1],
                          "has_labels": torch.tensor(True)})
    return pairs


# --------------------------------------------------------------------------------------------
# Released layouts


def _check_root(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise DatasetError(f"--dataset {name}: expected --data-dir pointing at the dataset root, got none")
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"--data-dir {path}: expected the {name} dataset root directory, got no such directory")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: malformed JSON manifest ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the manifest ({err.strerror})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object manifest, got {type(data).__name__}")
    return data


def _rooted(root: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: expected a file path string, got {value!r}")
    # Learn2Reg manifests write paths as "/imagesTr/x.nii.gz" (or "./imagesTr/..."), relative to the root.
    return root / value.lstrip("/").removeprefix("./")


def _exists(path: Path, where: str, check: bool = True) -> Path:
    if check and not path.is_file():
        raise DatasetError(f"{where}: file {path} does not exist")
    return path


def case_id(path: str | Path) -> str:
    """The 4-digit case id of a Learn2Reg/LUMIR file name (``LUMIRMRI_3454_0000.nii.gz`` -> ``3454``).

    The ids of submission names (``disp_<fixed id>_<moving id>.nii.gz``) and of batch folders.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    m = re.match(r"^.*?_(\d+)_\d{4}$", stem) or re.search(r"(\d+)(?!.*\d)", stem)
    return m.group(1).zfill(4) if m else stem


def _entries(manifest: dict[str, Any], key: str, path: Path, required: bool = True) -> list[Any]:
    value = manifest.get(key)
    if value is None:
        if required:
            raise DatasetError(f"{path}: expected a {key!r} list in the manifest, got none")
        return []
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected {key!r} to be a list, got {type(value).__name__}")
    return value


def _image_entry(root: Path, entry: Any, where: str, seg_key: str | None = None,
                 seg_from_image: bool = False, check: bool = True) -> ImageRecord:
    """One manifest image entry; ``check=False`` (a split this run does not read) skips the file checks."""
    if not isinstance(entry, dict) or "image" not in entry:
        raise DatasetError(f"{where}: expected an object with an 'image' path, got {entry!r}")
    image = _exists(_rooted(root, entry["image"], where), where, check)
    seg = None
    if seg_key and entry.get(seg_key):
        seg = _exists(_rooted(root, entry[seg_key], where), where, check)
    elif seg_from_image:
        guess = Path(str(image).replace("/images", "/labels"))
        seg = guess if guess.is_file() else None
    return ImageRecord(image=image, seg=seg, entry=where, id=case_id(image))


def _pair_entry(root: Path, entry: Any, where: str, seg_from_image: bool, check: bool = True) -> PairRecord:
    if not isinstance(entry, dict) or "fixed" not in entry or "moving" not in entry:
        raise DatasetError(f"{where}: expected an object with 'fixed' and 'moving' paths, got {entry!r}")
    recs = []
    for key in ("fixed", "moving"):
        image = _exists(_rooted(root, entry[key], f"{where}.{key}"), f"{where}.{key}", check)
        seg = None
        if seg_from_image:
            guess = Path(str(image).replace("/images", "/labels"))
            seg = guess if guess.is_file() else None
        recs.append(ImageRecord(image=image, seg=seg, entry=f"{where}.{key}", id=case_id(image)))
    return PairRecord(fixed=recs[0], moving=recs[1])


def _pairwise(images: Sequence[ImageRecord]) -> list[PairRecord]:
    """Every ordered pair (fixed != moving) of ``images``."""
    return [PairRecord(fixed=f, moving=m) for f in images for m in images if f is not m]


def _need(records: Sequence[Any], n: int, what: str) -> None:
    if len(records) < n:
        raise DatasetError(f"{what}: expected at least {n}, got {len(records)}")


def open_lumir(root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """LUMIR 2024: ``LUMIR_dataset.json`` (training / validation with seg / test pairs).

    Only the files of ``splits`` must exist (evaluating the validation pairs needs no training image).
    """
    base = _check_root(root, "lumir")
    manifest_path = _find_manifest(base, ("LUMIR_dataset.json",), "lumir")
    manifest = _read_json(manifest_path)
    train = [_image_entry(base, e, f"{manifest_path.name}: training[{i}]", check="train" in splits)
             for i, e in enumerate(_entries(manifest, "training", manifest_path, required="train" in splits))]
    val_images = [_image_entry(base, e, f"{manifest_path.name}: validation[{i}]", seg_key="seg",
                               check="val" in splits)
                  for i, e in enumerate(_entries(manifest, "validation", manifest_path, required=False))]
    val_images = [r for r in val_images if r.seg is not None]
    test = [_pair_entry(base, e, f"{manifest_path.name}: test[{i}]", seg_from_image=True, check="test" in splits)
            for i, e in enumerate(_entries(manifest, "test", manifest_path, required=False))]
    if "train" in splits:
        _need(train, 2, f"{manifest_path}: training images")
    return DatasetLayout("lumir", base, train_images=train, val_pairs=_pairwise(val_images), test_pairs=test,
                         normalization="u8", labels=None, labels_eval=_labels_eval(manifest, manifest_path))


def _find_manifest(base: Path, names: Sequence[str], dataset: str) -> Path:
    for name in names:
        if (base / name).is_file():
            return base / name
    found = sorted(p.name for p in base.glob("*_dataset.json"))
    if len(found) == 1:
        return base / found[0]
    raise DatasetError(f"--data-dir {base}: expected the {dataset} manifest {names[0]}, got "
                       f"{found or 'no *_dataset.json'}")


def _l2r_json_layout(name: str, base: Path, manifest_path: Path, labels: tuple[int, ...],
                     how: NormalizationAlias, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """Learn2Reg ``*_dataset.json`` (2022+): ``training`` images (+ ``label``), ``registration_val``
    pairs (labels = image path with images -> labels), ``registration_test`` pairs if listed.
    Only the files of ``splits`` must exist."""
    manifest = _read_json(manifest_path)
    tag = manifest_path.name
    images = [_image_entry(base, e, f"{tag}: training[{i}]", seg_key="label", seg_from_image=True,
                           check="train" in splits)
              for i, e in enumerate(_entries(manifest, "training", manifest_path, required="train" in splits))]
    val_key = next((k for k in ("registration_val", "validation") if k in manifest), "registration_val")
    val = [_pair_entry(base, e, f"{tag}: {val_key}[{i}]", seg_from_image=True,
                       check="val" in splits or ("test" in splits and not any(
                           k in manifest for k in ("registration_test", "test"))))
           for i, e in enumerate(_entries(manifest, val_key, manifest_path, required=False))]
    test_key = next((k for k in ("registration_test", "test") if k in manifest), None)
    test = [_pair_entry(base, e, f"{tag}: {test_key}[{i}]", seg_from_image=True, check="test" in splits)
            for i, e in enumerate(_entries(manifest, test_key, manifest_path, required=False))] if test_key else val
    in_val = {r.image for p in val for r in (p.fixed, p.moving)}
    train = [r for r in images if r.image not in in_val] or images
    if "train" in splits:
        _need(train, 2, f"{manifest_path}: training images (outside the validation pairs)")
    return DatasetLayout(name, base, train_images=train, val_pairs=[p for p in val if p.fixed.seg and p.moving.seg],
                         test_pairs=test, normalization=how, labels=labels,
                         labels_eval=_labels_eval(manifest, manifest_path))


def _labels_eval(manifest: dict[str, Any], path: Path) -> tuple[int, ...] | None:
    """The manifest's ``labels_eval`` list (the label set it says to score), or None."""
    value = manifest.get("labels_eval")
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: expected 'labels_eval' to be a list of integers, got {value!r}") from None


def manifest_labels(path: str | Path) -> tuple[int, ...] | None:
    """``labels_eval`` of a JSON pair list / manifest (None for CSV lists or when it lists none)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_pair_list reports unreadable lists
    return _labels_eval(data, path) if isinstance(data, dict) else None


def open_oasis(root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """OASIS: Learn2Reg 2022+ (``OASIS_dataset.json``) or 2021 task 3 (``L2R_2021_Task3_*`` folders)."""
    base = _check_root(root, "oasis")
    labels = tuple(range(1, 36))
    if (base / "OASIS_dataset.json").is_file():
        return _l2r_json_layout("oasis", base, base / "OASIS_dataset.json", labels, "minmax", splits)
    train_dir = base / "L2R_2021_Task3_train"
    if not train_dir.is_dir():
        raise DatasetError(f"--data-dir {base}: expected OASIS_dataset.json (Learn2Reg 2022+) or the folder "
                           "L2R_2021_Task3_train (Learn2Reg 2021 task 3), found neither")
    val_dir = base / "L2R_2021_Task3_val"

    def record(folder: Path, case: str, where: str) -> ImageRecord:
        image = _exists(folder / f"img{case}.nii.gz", where)
        seg = folder / f"seg{case}.nii.gz"
        return ImageRecord(image=image, seg=seg if seg.is_file() else None, entry=where, id=case)

    train = [record(train_dir, p.name[3:7], f"{train_dir.name}/{p.name}")
             for p in sorted(train_dir.glob("img*.nii.gz"))]
    if "train" in splits:
        _need(train, 2, f"{train_dir}: training images img*.nii.gz")
    csv_path = next((p for p in (base / "pairs_val.csv", val_dir / "pairs_val.csv") if p.is_file()), None)
    pairs: list[PairRecord] = []
    if csv_path is not None:
        for i, row in enumerate(_read_csv(csv_path, ("fixed", "moving"))):
            where = f"{csv_path.name}: row {i + 1}"
            ids = []
            for key in ("fixed", "moving"):
                try:
                    ids.append(f"{int(float(row[key])):04d}")
                except ValueError:
                    raise DatasetError(f"{where}: expected a numeric {key} id, got {row[key]!r}") from None
            folder = val_dir if (val_dir / f"img{ids[0]}.nii.gz").is_file() else train_dir
            pairs.append(PairRecord(fixed=record(folder, ids[0], f"{where}.fixed"),
                                    moving=record(folder, ids[1], f"{where}.moving")))
    return DatasetLayout("oasis", base, train_images=train,
                         val_pairs=[p for p in pairs if p.fixed.seg and p.moving.seg], test_pairs=pairs,
                         normalization="minmax", labels=labels)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            sample = f.read(4096)
            f.seek(0)
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample.strip() else csv.excel
            reader = csv.DictReader(f, dialect=dialect)
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the CSV ({err})") from None
    if not rows or any(k not in rows[0] for k in required):
        got = sorted(rows[0]) if rows else "no rows"
        raise DatasetError(f"{path}: expected a CSV with columns {list(required)}, got {got}")
    return rows


def open_abdomen(root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """Abdomen CT: Learn2Reg ``AbdomenCTCT_dataset.json`` or the original ``img/`` + ``label/`` layout."""
    base = _check_root(root, "abdomen")
    labels = tuple(range(1, 14))
    if (base / "AbdomenCTCT_dataset.json").is_file():
        return _l2r_json_layout("abdomen", base, base / "AbdomenCTCT_dataset.json", labels, "ct", splits)
    img_dir, lab_dir = base / "img", base / "label"
    if not img_dir.is_dir():
        raise DatasetError(f"--data-dir {base}: expected AbdomenCTCT_dataset.json or the folders img/ and label/, "
                           "found neither")
    records: dict[int, ImageRecord] = {}
    for path in sorted(img_dir.glob("img*.nii.gz")):
        case = int(re.sub(r"\D", "", path.name.split(".")[0]) or -1)
        seg = lab_dir / path.name.replace("img", "label", 1)
        records[case] = ImageRecord(image=path, seg=seg if seg.is_file() else None, entry=f"img/{path.name}",
                                    id=f"{case:04d}")
    # The original EOIR split: subjects 1-20 train, 21-23 validation, 24-30 test, all ordered pairs.
    train = [r for c, r in sorted(records.items()) if c <= 20]
    val = [r for c, r in sorted(records.items()) if 21 <= c <= 23]
    test = [r for c, r in sorted(records.items()) if c >= 24]
    if "train" in splits:
        _need(train, 2, f"{img_dir}: training subjects img0001..img0020")
    return DatasetLayout("abdomen", base, train_images=train,
                         val_pairs=[p for p in _pairwise(val) if p.fixed.seg and p.moving.seg],
                         test_pairs=_pairwise(test), normalization="ct", labels=labels)


_ACDC_TRAIN = {i for lo in (1, 21, 41, 61, 81) for i in range(lo, lo + 17)}


def _acdc_frames(folder: Path) -> tuple[ImageRecord, ImageRecord]:
    cfg = folder / "Info.cfg"
    if not cfg.is_file():
        raise DatasetError(f"{folder.name}: expected {cfg} with the ED and ES frame numbers, got no such file")
    values: dict[str, str] = {}
    for line in cfg.read_text(errors="replace").splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            values[key.strip().upper()] = value.strip()
    recs = []
    for phase in ("ED", "ES"):
        try:
            frame = int(values[phase])
        except (KeyError, ValueError):
            raise DatasetError(f"{cfg}: expected an integer '{phase}:' frame entry, "
                               f"got {values.get(phase)!r}") from None
        image = folder / f"{folder.name}_frame{frame:02d}.nii.gz"
        where = f"{folder.name}/Info.cfg {phase}={frame}"
        _exists(image, where)
        seg = folder / f"{folder.name}_frame{frame:02d}_gt.nii.gz"
        recs.append(ImageRecord(image=image, seg=seg if seg.is_file() else None, entry=where,
                                id=f"{folder.name[7:]}_{phase.lower()}"))
    return recs[0], recs[1]


def open_acdc(root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """ACDC as released (``patientXXX/`` folders with ``Info.cfg``); ED->ES and ES->ED pairs."""
    base = _check_root(root, "acdc")
    folders = sorted({p for pattern in ("patient[0-9]*", "*/patient[0-9]*") for p in base.glob(pattern) if p.is_dir()},
                     key=lambda p: p.name)
    if not folders:
        raise DatasetError(f"--data-dir {base}: expected ACDC patientXXX folders (or training/ and testing/ holding "
                           "them), found none")
    train: list[PairRecord] = []
    val: list[PairRecord] = []
    test: list[PairRecord] = []
    for folder in folders:
        try:
            number = int(folder.name[7:])
        except ValueError:
            continue
        ed, es = _acdc_frames(folder)
        both = [PairRecord(fixed=es, moving=ed), PairRecord(fixed=ed, moving=es)]
        (train if number in _ACDC_TRAIN else val if number <= 100 else test).extend(both)
    if "train" in splits:
        _need(train, 1, f"{base}: ACDC training patients (001-017, 021-037, 041-057, 061-077, 081-097)")
    return DatasetLayout("acdc", base, train_pairs=train,
                         val_pairs=[p for p in val if p.fixed.seg and p.moving.seg], test_pairs=test or val,
                         normalization="minmax", labels=(1, 2, 3))


PAIR_LIST_KEYS = ("pairs", "test", "validation", "registration_test", "registration_val", "eval_pairs")


def read_pair_list(path: str | Path) -> list[PairRecord]:
    """Read a pair list: the one reader behind ``--dataset pairs`` and ``eoir register --pairs``.

    Formats:
        * CSV with a header ``fixed,moving[,fixed_seg,moving_seg,name]`` (``,``/``;``/tab).
        * JSON: a list of ``{fixed, moving[, fixed_seg, moving_seg, name]}`` objects, or an object
          holding such a list under one of :data:`PAIR_LIST_KEYS` (a Learn2Reg ``*_dataset.json``:
          ``test``, ``registration_val``, ...; the first non-empty one is used).
    Relative paths (and Learn2Reg's ``/imagesTr/...`` or ``./imagesTr/...``) are relative to the
    list's folder. In a Learn2Reg manifest a label map without a ``*_seg`` entry is the image path
    with ``images`` -> ``labels`` when that file exists. Every listed file must exist.

    Raises:
        DatasetError: unreadable list, missing columns/keys or files, no pairs (one line naming the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: expected a pairs .csv/.json file, got no such file")
    manifest = False
    if path.suffix.lower() == ".csv":
        entries: list[Any] = _read_csv(path, ("fixed", "moving"))
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: malformed JSON pair list ({err})") from None
        if isinstance(data, dict):
            found = next((k for k in PAIR_LIST_KEYS if isinstance(data.get(k), list) and data[k]), None)
            manifest = found != "pairs"
            data = data.get(found) if found else None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a list of {{'fixed', 'moving'}} pairs, or such a list under one "
                               f"of {list(PAIR_LIST_KEYS)}")
        entries = data
    else:
        raise DatasetError(f"{path}: expected a .csv or .json pair list, got {path.suffix!r}")
    base = path.parent
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{path.name}: pair {i + 1}"
        if not isinstance(entry, dict) or not entry.get("fixed") or not entry.get("moving"):
            raise DatasetError(f"{where}: expected 'fixed' and 'moving' paths, got {entry!r}")
        recs = []
        for key in ("fixed", "moving"):
            image = _exists(_resolve(base, str(entry[key])), f"{where}.{key}")
            seg_value = entry.get(f"{key}_seg")
            seg = _exists(_resolve(base, str(seg_value)), f"{where}.{key}_seg") \
                if seg_value else (_labels_beside(image) if manifest else None)
            recs.append(ImageRecord(image=image, seg=seg, entry=f"{where}.{key}", id=case_id(image)))
        split = str(entry.get("split") or "").strip().lower()
        split = {"validation": "val", "training": "train"}.get(split, split)
        if split not in ("", "train", "val"):
            raise DatasetError(f"{where}: expected split 'train' or 'val', got {entry.get('split')!r}")
        pairs.append(PairRecord(fixed=recs[0], moving=recs[1], name=str(entry.get("name") or ""), split=split))
    _need(pairs, 1, f"{path}: pairs")
    return pairs


def _pair_list_labels(path: Path) -> tuple[int, ...] | None:
    """The ``labels`` key of a JSON pair list ``{"pairs": [...], "labels": [...]}``, else None."""
    if path.suffix.lower() != ".json":
        return None
    data = json.loads(path.read_text())  # read_pair_list has checked it parses
    values = data.get("labels") if isinstance(data, dict) else None
    if values is None:
        return None
    if not isinstance(values, list) or not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise DatasetError(f"{path}: expected 'labels' to be a list of positive integers, got {values!r}")
    return tuple(values)


def _labels_beside(image: Path) -> Path | None:
    """Learn2Reg layout: the label map is the image path with ``images*`` -> ``labels*`` (if it exists)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].startswith("images"):
            candidate = Path(*parts[:i], "labels" + parts[i][len("images"):], *parts[i + 1:])
            return candidate if candidate.is_file() else None
    return None


def open_pairs(root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """A pair list (:func:`read_pair_list`); ``--data-dir`` may be the file or a directory holding
    ``pairs.json``/``pairs.csv``.

    A ``split`` column (``train`` or ``val``) chooses what training validates on; without it every
    pair is a training pair and every labelled pair a validation pair (``eoir test`` evaluates them
    all; :func:`build_training_data` holds some out, see :func:`hold_out_pairs`). A JSON list's
    ``labels`` key gives the label values of the Dice loss and metrics (default: read from the
    label maps when training)."""
    if root is None:
        raise DatasetError("--dataset pairs: expected --data-dir pointing at a pairs .json/.csv file, got none")
    path = Path(root)
    if path.is_dir():
        path = next((path / n for n in ("pairs.json", "pairs.csv") if (path / n).is_file()), path / "pairs.json")
    if not path.is_file():
        raise DatasetError(f"--data-dir {root}: expected a pairs .json/.csv file (or a folder with pairs.json), "
                           "got no such file")
    pairs = read_pair_list(path)
    labels = _pair_list_labels(path)
    labelled = [p for p in pairs if p.fixed.seg and p.moving.seg]
    if any(p.split for p in pairs):
        train = [p for p in pairs if p.split != "val"]
        val = [p for p in labelled if p.split == "val"]
        if "train" in splits:
            _need(train, 1, f"{path}: training pairs (split 'train' or empty)")
        return DatasetLayout("pairs", path.parent, train_pairs=train, val_pairs=val, test_pairs=pairs,
                             normalization="minmax", labels=labels, labels_eval=manifest_labels(path),
                             explicit_split=True)
    return DatasetLayout("pairs", path.parent, train_pairs=pairs, val_pairs=labelled, test_pairs=pairs,
                         normalization="minmax", labels=labels, labels_eval=manifest_labels(path),
                         explicit_split=False)


def _resolve(base: Path, value: str) -> Path:
    """A listed path: absolute when it exists as such, else relative to ``base`` (Learn2Reg writes
    ``/imagesTr/x.nii.gz`` and ``./imagesTr/x.nii.gz`` relative to the manifest's folder)."""
    p = Path(value)
    if p.is_absolute() and (p.exists() or not (base / value.lstrip("/")).exists()):
        return p
    return base / value.lstrip("/").removeprefix("./")


def open_dataset(name: str, root: str | Path | None, splits: Sequence[str] = SPLITS) -> DatasetLayout:
    """Resolve a released dataset layout under ``root`` (see module docstring).

    Args:
        name: ``lumir``, ``oasis``, ``abdomen``, ``acdc`` or ``pairs``.
        root: data root (a pair list file for ``pairs``).
        splits: the splits this run reads (``train``, ``val``, ``test``): only their files must
            exist, so evaluating the validation pairs does not need the training images.
    """
    openers: dict[str, Callable[..., DatasetLayout]] = {
        "lumir": open_lumir, "oasis": open_oasis, "abdomen": open_abdomen, "acdc": open_acdc, "pairs": open_pairs}
    if name not in openers:
        raise DatasetError(f"--dataset: expected one of {sorted(openers)}, got {name!r}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"splits: expected a subset of {SPLITS}, got {unknown}")
    return openers[name](root, splits)
