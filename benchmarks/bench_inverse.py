"""Accuracy and time of the inverse transform on the labelled sample brains.

For each of the three ``SYNBRAIN_dataset.json`` test pairs of ``shared/data/brain_lumirlike``:

1. the default pipeline (``eoir_cli.pipeline``, bundled model, affine, refinement) with the
   inverse, and with ``--variants`` without its parts (``no fit``: Newton's inverse as it is;
   ``no smoothing``: refinement updates not smoothed): Dice, forward registration time (load ..
   compose), inverse time (inversion on the network grid + the inverse chain on the moving grid),
   ``metrics.json``'s inverse consistency in the foreground at grid voxels (both directions, through
   the written fields), and the same at 200,000 random points between voxels;
2. ``--compare``: the two ways to invert, on the network's own field (``--refine 0``, where the
   exact velocity inverse exists): negated per-level velocities composed in reverse order
   (:func:`eoir_cli.inverse.invert_pyramid`) against Newton (:func:`eoir_cli.inverse.invert_disp`),
   scored by ``|f(g(y)) - y|`` at the brain's network voxels (voxels = mm here) and by time.

Example:
    python benchmarks/bench_inverse.py --variants "default,no fit,no smoothing,neither (previous default)" \
        --json benchmarks/results/inverse.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain_lumirlike"
FORWARD_STAGES = ("load", "model", "preprocess", "affine", "network", "refine", "compose")


def _pairs(data: Path) -> list[tuple[Path, Path]]:
    spec = json.loads((data / "SYNBRAIN_dataset.json").read_text())
    return [(data / e["fixed"].lstrip("./"), data / e["moving"].lstrip("./")) for e in spec["test"]]


VARIANTS = {  # name -> register() options; "default" is today's pipeline
    "default": {},
    "no fit": {"inverse_fit": 0},
    "no smoothing": {"refine_sigma": 0.0},
    "neither (previous default)": {"inverse_fit": 0, "refine_sigma": 0.0},
}


def pipeline(data: Path, variants: list[str]) -> list[dict[str, Any]]:
    from eoir_cli import metrics
    from eoir_cli.deployment import normalize
    from eoir_cli.io import load_volume
    from eoir_cli.pipeline import register
    from eoir_cli.preprocess import FOREGROUND

    pairs = _pairs(data)
    spec = json.loads((data / "SYNBRAIN_dataset.json").read_text())
    labels = [int(v) for v in spec["labels_eval"]]
    register(pairs[0][0], pairs[0][1], None, hd95=False, qc=False, inverse=True)  # warm-up (allocator, model load)
    rows = []
    for variant in variants:
        for fixed, moving in pairs:
            seg = {"fixed_seg": _label_path(fixed), "moving_seg": _label_path(moving), "labels": labels}
            result = register(fixed, moving, None, hd95=False, qc=False, inverse=True, **seg, **VARIANTS[variant])
            t = result.metrics["timings_s"]
            ic = result.metrics["inverse_consistency"]
            f_img, m_img = load_volume(fixed), load_volume(moving)
            # The same masks as metrics.json's, scored at random points between voxels.
            between = metrics.inverse_consistency(result.disp, f_img.affine, normalize(f_img.data) > FOREGROUND,
                                                  result.inverse_disp, m_img.affine, normalize(m_img.data) > FOREGROUND,
                                                  between=200_000)
            forward_s = sum(t.get(k, 0.0) for k in FORWARD_STAGES)
            rows.append({"variant": variant, "pair": f"{fixed.name} <- {moving.name}",
                         "dice": result.metrics["segmentation"]["dice_after_mean"],
                         "ndv_percent": result.metrics["field"]["ndv_percent"],
                         "forward_s": round(forward_s, 3), "inverse_s": t["inverse"],
                         "inverse_over_forward": round(t["inverse"] / forward_s, 3), "iterations": ic["iterations"],
                         "at_voxels": {k: ic[k] for k in ("fixed_to_moving_to_fixed", "moving_to_fixed_to_moving")},
                         "between_voxels": between})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _label_path(image: Path) -> Path:
    return image.parent.parent / "labelsTr" / image.name


def compare(data: Path) -> list[dict[str, Any]]:
    import torch

    from eoir_cli.affine import affine_align
    from eoir_cli.checkpoint import load_model
    from eoir_cli.deployment import normalize
    from eoir_cli.inverse import inverse_residual, invert_disp, invert_pyramid
    from eoir_cli.io import load_volume
    from eoir_cli.preprocess import FOREGROUND, resample_affine
    from eoir_cli.spatial import resize, resize_disp

    model = load_model("default").eval()
    rows = []
    for fixed_path, moving_path in _pairs(data):
        fixed, moving = load_volume(fixed_path), load_volume(moving_path)
        f01, m01 = normalize(fixed.data), normalize(moving.data)
        # These images are on the LUMIR grid, which is the network grid as it is.
        transform = affine_align(f01, fixed.affine, m01, moving.affine)
        m_net = resample_affine(m01, np.linalg.inv(moving.affine) @ transform @ fixed.affine, f01.shape)
        size = f01.shape
        ft, mt = (torch.from_numpy(np.ascontiguousarray(a))[None, None] for a in (f01, m_net))
        with torch.no_grad():
            small = model.network_size(size)
            pyramid = model.forward_pyramid(resize(mt, size=small), resize(ft, size=small))
            disp = resize_disp(pyramid.disps[0], size)
            brain = torch.from_numpy(f01 > FOREGROUND)
            row: dict[str, Any] = {"pair": f"{fixed_path.name} <- {moving_path.name}"}
            for name in ("velocities", "newton"):
                start = time.perf_counter()
                inverse = invert_pyramid(model, pyramid.velocities, size) if name == "velocities" \
                    else invert_disp(disp).inverse
                seconds = time.perf_counter() - start
                res = inverse_residual(disp, inverse)[0][brain]
                row[name] = {"mean": float(res.mean()), "p95": float(torch.quantile(res[::7], 0.95)),
                             "seconds": round(seconds, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--compare", action="store_true", help="also compare velocities with Newton")
    parser.add_argument("--variants", default="default", help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from eoir_cli.threads import retain_freed_memory

    retain_freed_memory()  # as the eoir command does: without it page faults add ~0.5-1 s per stage at random

    out: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(),
                                       "threads": torch.get_num_threads(), "torch": torch.__version__},
                           "pipeline": pipeline(args.data, [v.strip() for v in args.variants.split(",")])}
    if args.compare:
        out["compare"] = compare(args.data)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
