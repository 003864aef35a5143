"""Evaluating a model on a dataset's labelled validation pairs, and writing submission fields.

Metrics (from :mod:`eoir_cli.metrics`, the challenge definitions): Dice (mean and per label, before
and after registration), HD95 (mm), NDV (%), % of voxels with J <= 0, SDlogJ, and TRE (mm) when
landmark images exist (the image path with ``images`` -> ``landmarks``, one blob per landmark).
Submission fields: ``disp_<fixed id>_<moving id>.nii.gz``, float32 ``(D, H, W, 3)``, voxels in
array-axis order, on the fixed grid (``warped(x) = moving(x + u(x))``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eoir_cli.coords import voxel_spacing
from eoir_cli.errors import EoirError

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Per-pair rows, the summary and the files written."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def _landmarks(image: Path) -> Path | None:
    guess = Path(str(image).replace("/images", "/landmarks"))
    return guess if guess != image and guess.is_file() else None


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


RESULT_NAMES = ("pairs.csv", "summary.json", "submission")


def check_eval_output(out: Path, layout: Any, save_disp: bool, overwrite: bool) -> None:
    """Refuse an output folder before any computation: not a folder we can create, inside the data
    directory, replacing an input file, or holding earlier results (unless ``overwrite``).

    Raises:
        EoirError: with the reason, naming ``--out``.
    """
    from eoir_cli.fileio import check_output_dir

    check_output_dir(out, "--out")
    if layout.name == "pairs":
        # A pair list may live in the working directory: only refuse outputs that would replace an input.
        inputs = {r.resolve() for p in [*layout.val_pairs, *layout.test_pairs] for rec in (p.fixed, p.moving)
                  for r in (rec.image, rec.seg) if r is not None}
        inputs |= {f.resolve() for f in layout.root.glob("pairs.*")}
        for name in RESULT_NAMES[:2]:
            if (out / name).resolve() in inputs:
                raise EoirError(f"--out {out}: {name} would replace the input {out / name}; choose another --out")
    else:
        _refuse_inside(out, layout.root)
    if not overwrite:
        found = [n for n in RESULT_NAMES if (out / n).exists() and (n != "submission" or any((out / n).iterdir()))]
        if found:
            raise EoirError(f"--out {out}: already holds results ({', '.join(found)}); pass --overwrite to replace "
                            "them or choose another --out")


def evaluate(model_path: str, dataset: str, data_dir: str | Path, out: str | Path | None = None,
             save_disp: bool = False, device: str = "cpu", hd95: bool = True,
             callback: Callable[[str, int, int], None] | None = None, *, affine: bool = False, refine: int = 0,
             labels: Sequence[int] | None = None, overwrite: bool = False) -> EvalResult:
    """Evaluate ``model_path`` on the labelled validation pairs of a dataset.

    By default the network alone is evaluated on the dataset's own grid and intensity
    normalisation (the challenge setting). With ``affine`` or ``refine > 0`` every pair goes through
    :func:`eoir_cli.pipeline.register` instead (the ``eoir register`` pipeline: percentile
    intensities, the model's network grid, affine pre-alignment, refinement), and metrics are
    computed on the fixed image's grid from that pipeline's field.

    Args:
        model_path: checkpoint (ours or an original EOIR ``.pth``/``.pth.tar``), ``default``/preset name, or an
            exported ``.onnx``/``.engine`` (anything :func:`eoir_cli.backends.open_backend` opens).
        dataset: ``lumir``, ``oasis``, ``abdomen``, ``acdc`` or ``pairs``.
        data_dir: dataset root (read only); only the evaluated files must exist.
        out: where ``pairs.csv``, ``summary.json`` (and ``submission/``) go; None = write nothing.
            Checked before anything is computed.
        save_disp: also write submission fields for the manifest's ``test`` pairs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        hd95: compute HD95 (the slowest metric).
        callback: ``callback(stage, done, total)`` after each pair (progress display).
        affine: affine pre-alignment (the register pipeline).
        refine: instance-optimisation steps after the network (the register pipeline).
        labels: label values scored (default: the manifest's ``labels_eval``, else the dataset's
            label table, else every non-zero label in either map; :func:`eoir_cli.metrics.scored_labels`).
        overwrite: replace earlier results in ``out``.

    Intensities are normalised as the model file records (its deployment facts); for files that
    record none (original EOIR checkpoints, older files) as the dataset's own convention.

    Raises:
        EoirError: bad dataset layout or files, a bad output folder, a dataset with nothing to evaluate.
    """
    from eoir_cli.data.datasets import open_dataset

    if dataset == "synth":
        raise EoirError("eoir test: --dataset synth has no released validation pairs; use lumir, oasis, abdomen, "
                        "acdc or pairs")
    if refine < 0:
        raise EoirError(f"--refine: expected >= 0 steps, got {refine}")
    if save_disp and out is None:
        raise EoirError("--save-disp: expected --out for the submission files, got none")
    layout = open_dataset(dataset, data_dir, splits=("val", "test") if save_disp else ("val",))
    if not layout.val_pairs and not (save_disp and layout.test_pairs):
        raise EoirError(f"--data-dir {data_dir}: the {dataset} dataset has no labelled validation pairs to evaluate"
                        + ("" if save_disp else " (and --save-disp was not asked)"))
    if save_disp and not layout.test_pairs:
        raise EoirError(f"--save-disp: the {dataset} manifest lists no test pairs")
    if out is not None:
        out = Path(out)
        check_eval_output(out, layout, save_disp, overwrite)
    from eoir_cli.backends import open_backend

    pipeline = affine or refine > 0
    net = open_backend(model_path, device=device)
    facts = net.deployment
    norm = layout.normalization if facts.source == "assumed" else facts.normalization
    wanted = [int(v) for v in labels] if labels is not None else layout.scored_labels
    rows: list[dict[str, Any]] = []
    per_label: dict[int, list[float]] = {}
    for i, pair in enumerate(layout.val_pairs):
        t0 = time.perf_counter()
        if pipeline:
            row, dice = _pipeline_row(net, pair, affine, refine, hd95, wanted)
        else:
            row, dice = _network_row(net, pair, norm, hd95, wanted)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        for k, v in dice.items():
            per_label.setdefault(int(k), []).append(v)
        if callback is not None:
            callback("evaluate", i + 1, len(layout.val_pairs))

    summary: dict[str, Any] = {"model": str(model_path), "dataset": dataset, "data_dir": str(data_dir),
                               "pairs": len(rows), "pipeline": {"affine": affine, "refine": refine,
                                                                "network_alone": not pipeline}}
    if rows:
        for key in rows[0]:
            if key not in ("fixed", "moving"):
                summary[key] = _nanmean([r.get(key, float("nan")) for r in rows])
        if "tre_mm" in {k for r in rows for k in r}:
            summary["tre_mm"] = _nanmean([r.get("tre_mm", float("nan")) for r in rows])
        summary["dice_per_label"] = {str(k): _nanmean(v) for k, v in sorted(per_label.items())}

    files: dict[str, Path] = {}
    if out is not None:
        from eoir_cli.fileio import write_json_atomic, write_text_atomic

        if rows:
            buf = io.StringIO()
            columns = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(buf, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            files["pairs.csv"] = write_text_atomic(out / "pairs.csv", buf.getvalue())
            files["summary.json"] = write_json_atomic(out / "summary.json", summary)
        if save_disp:
            files["submission"] = write_submission(net, layout, out / "submission", callback, norm,
                                                   pipeline=(affine, refine) if pipeline else None)
    return EvalResult(rows, summary, files)


def _tre(pair: Any, disp_np: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
    """Mean TRE (mm) over the landmarks both images carry, or None without landmark images."""
    from eoir_cli.metrics import landmarks_from_label_image, tre_mm

    lm_f, lm_m = _landmarks(pair.fixed.image), _landmarks(pair.moving.image)
    if lm_f is None or lm_m is None:
        return None
    from eoir_cli.io import load_volume

    pf = landmarks_from_label_image(load_volume(lm_f, "label").data)
    pm = landmarks_from_label_image(load_volume(lm_m, "label").data)
    common = sorted(set(pf) & set(pm))
    if not common:
        return None
    return float(np.mean(tre_mm(np.stack([pf[k] for k in common]), np.stack([pm[k] for k in common]), disp_np,
                                spacing)))


def _network_row(net: Any, pair: Any, normalization: Any, hd95: bool,
                 labels: Sequence[int] | None) -> tuple[dict[str, Any], dict[int, float]]:
    """Metrics of the network alone on the dataset's grid (the challenge setting)."""
    from eoir_cli.data.datasets import load_pair
    from eoir_cli.metrics import dice_per_label_each, field_metrics, hd95_per_label, scored_labels
    from eoir_cli.spatial import warp

    sample = load_pair(pair, normalization, True, affines=True)  # type: ignore[arg-type]
    disp = torch.from_numpy(_predict(net, sample))[None]
    warped = warp(sample["moving_labels"][None, None].float(), disp, mode="nearest")[0, 0]
    warped_np = warped.long().numpy()
    fixed_lab, moving_lab = sample["fixed_labels"].numpy(), sample["moving_labels"].numpy()
    labels = scored_labels(fixed_lab, moving_lab, labels)
    dice, before = dice_per_label_each([warped_np, moving_lab], fixed_lab, labels)
    disp_np = disp[0].cpu().numpy().astype(np.float64)
    spacing = voxel_spacing(sample["fixed_affine"].numpy())
    row: dict[str, Any] = {"fixed": pair.fixed.id, "moving": pair.moving.id,
                           "dice": _nanmean(list(dice.values())), "dice_before": _nanmean(list(before.values()))}
    if hd95:
        row["hd95_mm"] = _nanmean(list(hd95_per_label(warped_np, fixed_lab, labels, spacing).values()))
    row.update(field_metrics(disp_np))
    tre = _tre(pair, disp_np, spacing)
    if tre is not None:
        row["tre_mm"] = tre
    return row, dice


def _pipeline_row(backend: Any, pair: Any, affine: bool, refine: int, hd95: bool,
                  labels: Sequence[int] | None) -> tuple[dict[str, Any], dict[int, float]]:
    """Metrics of the ``eoir register`` pipeline (affine + network + refinement) on the fixed grid."""
    from eoir_cli.pipeline import register

    res = register(pair.fixed.image, pair.moving.image, None, model=backend, moving_seg=pair.moving.seg,
                   fixed_seg=pair.fixed.seg, affine=affine, refine=refine, hd95=hd95, qc=False, labels=labels)
    seg = res.metrics["segmentation"]
    dice = {int(k): v for k, v in seg["dice_after"].items()}
    row: dict[str, Any] = {"fixed": pair.fixed.id, "moving": pair.moving.id, "dice": seg["dice_after_mean"],
                           "dice_before": seg["dice_before_mean"]}
    if hd95:
        row["hd95_mm"] = seg["hd95_after_mean"]
    field = res.metrics["field"]  # also holds a note saying which grid: keep the three numbers of field_metrics
    row.update({k: field[k] for k in ("ndv_percent", "jac_nonpos_percent", "sdlogj")})
    from eoir_cli.io import load_volume

    spacing = voxel_spacing(load_volume(pair.fixed.image, "image").affine)
    tre = _tre(pair, res.disp.transpose(3, 0, 1, 2).astype(np.float64), spacing)  # type: ignore[arg-type]
    if tre is not None:
        row["tre_mm"] = tre
    return row, dice


def _refuse_inside(out: Path, root: Path) -> None:
    out_r, root_r = out.resolve(), root.resolve()
    if out_r == root_r or root_r in out_r.parents:
        raise EoirError(f"--out {out}: expected a directory outside the data directory {root} (never written)")


def _predict(net: Any, sample: dict[str, Any]) -> np.ndarray:
    """``(3, D, H, W)`` voxels for a loaded dataset sample (:func:`eoir_cli.inference.run_pair`)."""
    from eoir_cli.inference import run_pair

    return run_pair(net, sample["moving"][0].numpy(), sample["fixed"][0].numpy())


def write_submission(net: Any, layout: Any, folder: Path,
                     callback: Callable[[str, int, int], None] | None = None, normalization: Any = None,
                     pipeline: tuple[bool, int] | None = None) -> Path:
    """Write ``disp_<fixed id>_<moving id>.nii.gz`` (float32 ``(D, H, W, 3)``, voxels) per test pair.

    Args:
        net: an opened backend (:func:`eoir_cli.backends.open_backend`).
        normalization: intensity spec (default: the dataset's own).
        pipeline: ``(affine, refine)``: each field comes from the ``eoir register`` pipeline; None:
            the network alone on the dataset's grid.
    """
    from eoir_cli.data.datasets import load_pair
    from eoir_cli.io import save_volume

    if layout.name != "pairs":
        _refuse_inside(folder, layout.root)
    for i, pair in enumerate(layout.test_pairs):
        if pipeline is not None:
            from eoir_cli.pipeline import register

            res = register(pair.fixed.image, pair.moving.image, None, model=net, affine=pipeline[0],
                           refine=pipeline[1], qc=False)
            field_np, affine_np = res.disp, _fixed_affine(pair)
        else:
            sample = load_pair(pair, normalization or layout.normalization, False, affines=True)
            field_np = np.ascontiguousarray(_predict(net, sample).transpose(1, 2, 3, 0))
            affine_np = sample["fixed_affine"].numpy()
        save_volume(folder / f"disp_{pair.fixed.id}_{pair.moving.id}.nii.gz", field_np, affine_np, dtype=np.float32,
                    intent="vector")
        if callback is not None:
            callback("submission", i + 1, len(layout.test_pairs))
    return folder


def _fixed_affine(pair: Any) -> np.ndarray:
    from eoir_cli.io import load_volume

    return load_volume(pair.fixed.image, "image").affine
