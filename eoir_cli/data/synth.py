"""SynthMorph-style synthetic training pairs: endless, label-driven, deterministic by seed.

Every pair is drawn from label maps (brain label maps on disk, or random smooth shapes when no
file is available): each of the two images gets its own random smooth diffeomorphic deformation
of the label map (a smoothed random velocity integrated by scaling and squaring) and its own
random contrast (per-label intensities, Gaussian blur, multiplicative bias field, gamma, noise).
The network therefore never sees the same contrast twice and learns to register anatomy, not
intensities (Hoffmann et al., SynthMorph, IEEE TMI 2022).

Optionally a fraction of pairs are real images (e.g. the LUMIR-like brains and the MNI template),
so a model also sees real contrast. Sample ``index`` always gives the same pair for the same
seed, which makes resuming a run exact without any data-loader state.

Convention: images ``(1, D, H, W)`` float32 in [0, 1]; labels ``(D, H, W)`` int64 holding
*contiguous* class indices ``0..num_classes-1`` (the source map's label IDs mapped through a
per-table lookup, so moving and fixed labels of one pair always share one table).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eoir_cli.errors import EoirError, InputError
from eoir_cli.losses import gaussian_blur
from eoir_cli.spatial import integrate, resize, resize_disp, warp

log = logging.getLogger(__name__)

SHAPES_TABLE = "shapes"


def default_synth_root() -> Path | None:
    """The shared sample data beside the checkout (``../shared/data``), if it exists."""
    root = Path(__file__).resolve().parents[3] / "shared" / "data"
    return root if (root / "brain_lumirlike").is_dir() else None


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic pair generator (one source of defaults).

    Attributes:
        shape: output size ``(D, H, W)`` in voxels.
        num_shape_labels: classes of the random-shapes label maps.
        shapes_fraction: probability that a synthetic pair uses random shapes although label
            maps are available (always 1 without label maps).
        real_fraction: probability that a pair is a pair of real images instead of synthetic.
        deform_max: maximum standard deviation of the random velocity, voxels of the output grid.
        deform_spacing: control-point spacing of the random velocity, voxels (larger = smoother).
        blur_max: maximum Gaussian blur sigma, voxels.
        bias_max: maximum standard deviation of the log bias field.
        noise_max: maximum standard deviation of the additive Gaussian noise (intensity units).
        gamma_std: standard deviation of the log gamma exponent.
        background_zero: probability that label 0 gets intensity 0 (skull-stripped look).
        flip_fraction: probability that a label-map pair is mirrored along the first (left-right)
            axis, both images together (a mirrored brain is still a plausible brain; mirroring one
            image alone would ask the network for a left-right swap).
    """

    shape: tuple[int, int, int] = (160, 224, 192)
    num_shape_labels: int = 16
    shapes_fraction: float = 0.5
    real_fraction: float = 0.0
    deform_max: float = 3.0
    deform_spacing: int = 16
    blur_max: float = 1.0
    bias_max: float = 0.3
    noise_max: float = 0.05
    gamma_std: float = 0.25
    background_zero: float = 0.5
    flip_fraction: float = 0.0

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 2:
            raise InputError(f"synth shape: expected 3 sizes >= 2, got {self.shape}")
        for name in ("shapes_fraction", "real_fraction", "background_zero", "flip_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"{name}: expected a probability in [0, 1], got {value}")
        if self.num_shape_labels < 2:
            raise InputError(f"num_shape_labels: expected >= 2, got {self.num_shape_labels}")


@dataclass
class _Source:
    labels: torch.Tensor  # (D, H, W) int64 contiguous classes at the output shape
    table: str
    name: str


@dataclass
class _RealImage:
    image: torch.Tensor  # (1, D, H, W) float32 in [0, 1] at the output shape
    labels: torch.Tensor | None
    table: str | None
    name: str


def read_array(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as err:  # nibabel raises many types for broken files
        raise EoirError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from None
    if data.ndim != 3:
        raise EoirError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def _resize_labels(labels: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    t = torch.from_numpy(labels.astype(np.int64))
    if tuple(t.shape) == tuple(shape):
        return t
    return resize(t[None, None].float(), size=shape, mode="nearest")[0, 0].long()


def _resize_image(image: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    t = torch.from_numpy(image.astype(np.float32))[None, None]
    if tuple(t.shape[2:]) != tuple(shape):
        t = resize(t, size=shape)
    return t[0].clamp(0.0, 1.0)


def find_label_maps(root: Path, exclude: Sequence[str] = ()
                    ) -> tuple[list[tuple[Path, str]], list[tuple[Path, Path | None, str | None]]]:
    """Label maps and real images under ``root``.

    Recognised layouts: the shared sample data (``brain_lumirlike/{imagesTr,labelsTr}`` and
    ``brain_template/``), or any directory of label maps (``labelsTr/*.nii.gz`` or ``*.nii.gz``).
    Files whose name contains one of ``exclude`` (held-out subjects) are left out.

    Returns:
        ``(label maps as (path, table), real images as (image path, label path or None, table))``.
    """
    if not root.is_dir():
        raise EoirError(f"synth --data-dir {root}: expected a directory of label maps, got no such directory")
    maps: list[tuple[Path, str]] = []
    reals: list[tuple[Path, Path | None, str | None]] = []
    brains = root / "brain_lumirlike"
    if brains.is_dir():
        for lab in sorted((brains / "labelsTr").glob("*.nii.gz")):
            maps.append((lab, "freesurfer"))
            img = brains / "imagesTr" / lab.name
            if img.is_file():
                reals.append((img, lab, "freesurfer"))
        template = root / "brain_template"
        for tissue in sorted(template.glob("*tissue*.nii.gz")):
            maps.append((tissue, "tissue"))
        for t1 in sorted(template.glob("*_T1_*.nii.gz")):
            reals.append((t1, None, None))
    else:
        folder = root / "labelsTr" if (root / "labelsTr").is_dir() else root
        maps = [(p, "labels") for p in sorted(folder.glob("*.nii.gz"))]
    if not maps:
        raise EoirError(f"synth --data-dir {root}: expected label maps (*.nii.gz, labelsTr/ or brain_lumirlike/), "
                        "found none")
    held = [h for h in exclude if h]
    if held:
        maps = [(p, t) for p, t in maps if not any(h in p.name for h in held)]
        reals = [r for r in reals if not any(h in r[0].name for h in held)]
        if not maps:
            raise EoirError(f"synth --holdout {list(held)}: every label map under {root} is held out")
    return maps, reals


def blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, D, H, W)`` with ``sigma`` voxels (replicate borders, kernel to 2.5 sigma)."""
    if sigma <= 0.05:
        return image
    return gaussian_blur(image, sigma, truncate=2.5)


def _smooth_noise(shape: tuple[int, int, int], spacing: float, channels: int, gen: torch.Generator) -> torch.Tensor:
    """Standard-normal noise on a coarse grid upsampled to ``shape``: ``(1, channels, D, H, W)``."""
    coarse = [max(2, int(math.ceil(s / spacing)) + 1) for s in shape]
    noise = torch.randn((1, channels, *coarse), generator=gen)
    return resize(noise, size=shape)


def random_disp(shape: tuple[int, int, int], config: SynthConfig, gen: torch.Generator) -> torch.Tensor:
    """A random smooth diffeomorphic displacement ``(1, 3, D, H, W)`` in voxels."""
    std = float(torch.rand((), generator=gen)) * config.deform_max
    # The field is smooth on the scale of deform_spacing, so integrating it at half resolution and
    # upsampling loses nothing visible and is ~8x cheaper than integrating at full size.
    half = tuple(max(2, (s + 1) // 2) for s in shape)
    velocity = _smooth_noise(half, config.deform_spacing / 2, 3, gen) * (std / 2)
    return resize_disp(integrate(velocity, steps=7), shape)


def random_shapes(shape: tuple[int, int, int], num_labels: int, gen: torch.Generator) -> torch.Tensor:
    """Random smooth label map ``(D, H, W)`` int64 in ``[0, num_labels)``: argmax of smooth noise."""
    spacing = float(8 + 24 * torch.rand((), generator=gen))
    # argmax at half resolution (nearest upsampled): the random deformations smooth the staircase.
    half = tuple(max(2, (s + 1) // 2) for s in shape)
    labels = _smooth_noise(half, spacing / 2, num_labels, gen)[0].argmax(0)
    return resize(labels[None, None].float(), size=shape, mode="nearest")[0, 0].long()


def synthesize_image(labels: torch.Tensor, config: SynthConfig, gen: torch.Generator) -> torch.Tensor:
    """A random-contrast image ``(1, D, H, W)`` in [0, 1] from a label map of contiguous classes."""
    num = int(labels.max()) + 1
    means = torch.rand(num, generator=gen)
    if float(torch.rand((), generator=gen)) < config.background_zero:
        means[0] = 0.0
    stds = torch.rand(num, generator=gen) * 0.05
    image = means[labels] + stds[labels] * torch.randn(labels.shape, generator=gen)
    image = image[None, None]
    image = blur(image, float(torch.rand((), generator=gen)) * config.blur_max)
    bias_std = float(torch.rand((), generator=gen)) * config.bias_max
    image = image * torch.exp(_smooth_noise(tuple(labels.shape), 32, 1, gen) * bias_std)
    image = image.clamp_min(0.0)
    image = image / image.max().clamp_min(1e-6)
    gamma = math.exp(float(torch.randn((), generator=gen)) * config.gamma_std)
    image = image.pow(gamma)
    noise_std = float(torch.rand((), generator=gen)) * config.noise_max
    image = image + noise_std * torch.randn(image.shape, generator=gen)
    return image[0].clamp(0.0, 1.0)


class SynthPairs(torch.utils.data.Dataset):
    """Endless synthetic pairs; ``dataset[i]`` is the same pair for the same seed and ``i``.

    Args:
        config: generator parameters.
        root: directory of label maps (see :func:`find_label_maps`); ``None`` = random shapes only.
        seed: base seed; sample ``i`` uses ``torch.Generator().manual_seed(hash(seed, i))``.
        length: nominal length (``len()``), any index is valid.
        exclude: held-out subjects: label maps and images whose file name contains one of these.

    Each item is a dict: ``moving``/``fixed`` ``(1, D, H, W)`` float32 in [0, 1],
    ``moving_labels``/``fixed_labels`` ``(D, H, W)`` int64 classes, ``has_labels`` bool tensor.
    """

    def __init__(self, config: SynthConfig, root: Path | None = None, seed: int = 0, length: int = 1000,
                 exclude: Sequence[str] = ()) -> None:
        self.config = config
        self.seed = int(seed)
        self.length = int(length)
        self.sources: list[_Source] = []
        self.reals: list[_RealImage] = []
        tables: dict[str, dict[int, int]] = {SHAPES_TABLE: {i: i for i in range(config.num_shape_labels)}}
        if root is not None:
            maps, reals = find_label_maps(Path(root), exclude)
            raw = [(p, table, read_array(p)) for p, table in maps]
            for _, table, data in raw:
                ids = tables.setdefault(table, {0: 0})
                for value in np.unique(data).tolist():
                    ids.setdefault(int(value), len(ids))
            for path, table, data in raw:
                self.sources.append(_Source(self._lookup(data, tables[table], config.shape), table, path.name))
            for img_path, lab_path, table in reals:
                image = read_array(img_path).astype(np.float32) / 255.0
                labels = None
                if lab_path is not None and table is not None:
                    data = read_array(lab_path)
                    if data.shape != image.shape:
                        raise EoirError(f"{lab_path}: label shape {data.shape} differs from image shape "
                                        f"{image.shape} ({img_path})")
                    labels = self._lookup(data, tables[table], config.shape)
                self.reals.append(_RealImage(_resize_image(image, config.shape), labels, table, img_path.name))
        self.num_classes = max(len(t) for t in tables.values())
        if config.real_fraction > 0 and len(self.reals) < 2:
            raise EoirError(f"synth --real-fraction {config.real_fraction}: expected >= 2 real images under "
                            f"{root}, got {len(self.reals)}")
        log.info("synth: %d label maps, %d real images, %d classes", len(self.sources), len(self.reals),
                 self.num_classes)

    @staticmethod
    def _lookup(data: np.ndarray, table: dict[int, int], shape: tuple[int, int, int]) -> torch.Tensor:
        values = np.unique(data)
        lut = {int(v): table[int(v)] for v in values}
        out = np.zeros(data.shape, dtype=np.int64)
        for v, c in lut.items():
            if c:
                out[data == v] = c
        return _resize_labels(out, shape)

    def __len__(self) -> int:
        return self.length

    def with_seed(self, seed: int) -> SynthPairs:
        """The same generator (sharing the loaded maps) with another seed, e.g. for validation."""
        other = copy.copy(self)
        other.seed = int(seed)
        return other

    def generator(self, index: int) -> torch.Generator:
        # Mix seed and index so neighbouring seeds do not share samples.
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(index) * 7919 + 12345) % (2**63 - 1))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = self.generator(index)
        shape = self.config.shape
        if self.reals and float(torch.rand((), generator=gen)) < self.config.real_fraction:
            return self._real_pair(gen)
        use_shapes = not self.sources or float(torch.rand((), generator=gen)) < self.config.shapes_fraction
        if use_shapes:
            base = random_shapes(shape, self.config.num_shape_labels, gen)
            moving_src = fixed_src = base
        else:
            first = self.sources[int(torch.randint(len(self.sources), (), generator=gen))]
            same = [s for s in self.sources if s.table == first.table]
            second = same[int(torch.randint(len(same), (), generator=gen))]
            moving_src, fixed_src = first.labels, second.labels
            # Drawn only when enabled, so runs without flips keep their exact sample stream.
            if self.config.flip_fraction > 0 and float(torch.rand((), generator=gen)) < self.config.flip_fraction:
                moving_src, fixed_src = moving_src.flip(0), fixed_src.flip(0)
        moving_labels = self._deform_labels(moving_src, gen)
        fixed_labels = self._deform_labels(fixed_src, gen)
        return {
            "moving": synthesize_image(moving_labels, self.config, gen),
            "fixed": synthesize_image(fixed_labels, self.config, gen),
            "moving_labels": moving_labels,
            "fixed_labels": fixed_labels,
            "has_labels": torch.tensor(True),
        }

    def _deform_labels(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        disp = random_disp(tuple(labels.shape), self.config, gen)
        return warp(labels[None, None].float(), disp, mode="nearest")[0, 0].long()

    def _real_pair(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        i = int(torch.randint(len(self.reals), (), generator=gen))
        j = int(torch.randint(len(self.reals) - 1, (), generator=gen))
        j = j + 1 if j >= i else j
        out: dict[str, Any] = {}
        pair = (("moving", self.reals[i]), ("fixed", self.reals[j]))
        labelled = all(r.labels is not None for _, r in pair) and pair[0][1].table == pair[1][1].table
        for name, real in pair:
            disp = random_disp(self.config.shape, self.config, gen)
            out[name] = warp(real.image[None], disp)[0].clamp(0.0, 1.0)
            if labelled:
                assert real.labels is not None
                out[f"{name}_labels"] = warp(real.labels[None, None].float(), disp, mode="nearest")[0, 0].long()
            else:
                out[f"{name}_labels"] = torch.zeros(self.config.shape, dtype=torch.int64)
        out["has_labels"] = torch.tensor(labelled)
        return out
