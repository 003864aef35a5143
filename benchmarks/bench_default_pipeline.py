"""Accuracy vs time of the default registration pipeline on the labelled sample brains.

Runs ``eoir_cli.pipeline`` on the three labelled pairs of ``shared/data/brain_lumirlike`` (the
SYNBRAIN_dataset.json ``test`` pairs, 31 evaluation labels) for several pipeline settings:
network alone, network + affine, network + refinement (N steps), and refinement without the
network (an untrained-network baseline is not meaningful, so "refine only" uses a zero network).
Reports Dice before/after (mean over the 31 labels), NDV, % |J| <= 0 and the registration time
per pair (load + preprocess + affine + network + refine + compose; evaluation, QC and writing
excluded, as for the ANTs anchor).

Example:
    python benchmarks/bench_default_pipeline.py --model default --refine 0 10 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain_lumirlike"
REG_STAGES = ("load", "model", "preprocess", "affine", "network", "refine", "compose")


class ZeroNetwork:
    """A backend whose answer is the identity, to measure refinement on its own."""

    name, device, precision, input_shape, metadata = "zero", "cpu", "fp32", (160, 224, 192), {}

    def __init__(self) -> None:
        from eoir_cli.config import PRESETS

        self.config = PRESETS["lumir"]

    def __call__(self, moving: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        return np.zeros((3, *fixed.shape), dtype=np.float32)


def run(model: str, settings: list[dict[str, Any]], data: Path, threads: int | None) -> dict[str, Any]:
    import torch

    from eoir_cli import metrics
    from eoir_cli.backends import open_backend
    from eoir_cli.io import load_volume
    from eoir_cli.pipeline import register

    if threads:
        torch.set_num_threads(threads)
    manifest = json.loads((data / "SYNBRAIN_dataset.json").read_text())
    labels = manifest["labels_eval"]
    pairs = [(data / p["fixed"].lstrip("/"), data / p["moving"].lstrip("/")) for p in manifest["test"]]
    net = open_backend(model)
    rows = []
    for setting in settings:
        backend = ZeroNetwork() if setting.get("zero_network") else net
        for fixed, moving in pairs:
            fseg = data / "labelsTr" / fixed.name
            mseg = data / "labelsTr" / moving.name
            res = register(fixed, moving, None, model=backend, moving_seg=mseg, affine=setting["affine"],
                           refine=setting["refine"], shape=(160, 224, 192), hd95=False, qc=False,
                           **({"refine_coarse": setting["coarse"]} if "coarse" in setting else {}),
                           **({"refine_search_int_steps": setting["search"]} if "search" in setting else {}))
            fixed_labels = load_volume(fseg, kind="label").data
            moving_labels = load_volume(mseg, kind="label").data
            before = metrics.mean_dice(moving_labels, fixed_labels, labels)
            after = metrics.mean_dice(res.warped_seg, fixed_labels, labels)
            times = res.metrics["timings_s"]
            rows.append({
                "setting": setting["name"], "fixed": fixed.name, "moving": moving.name,
                "dice_before": before, "dice_after": after,
                "ndv_percent": res.metrics["field"]["ndv_percent"],
                "jac_nonpos_percent": res.metrics["field"]["jac_nonpos_percent"],
                "seconds": sum(times.get(s, 0.0) for s in REG_STAGES),
                "stages_s": {s: times.get(s, 0.0) for s in REG_STAGES},
            })
            print(f"{setting['name']:>24} {moving.name[:13]}->{fixed.name[:13]} Dice {before:.3f} -> "
                  f"{rows[-1]['dice_after']:.3f}  NDV {rows[-1]['ndv_percent']:.4f}%  {rows[-1]['seconds']:.1f} s",
                  flush=True)
    summary = {}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting["name"]]
        summary[setting["name"]] = {
            "dice_before": float(np.mean([r["dice_before"] for r in mine])),
            "dice_after": float(np.mean([r["dice_after"] for r in mine])),
            "dice_after_per_pair": [round(r["dice_after"], 4) for r in mine],
            "ndv_percent_max": float(max(r["ndv_percent"] for r in mine)),
            "jac_nonpos_percent_max": float(max(r["jac_nonpos_percent"] for r in mine)),
            "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
        }
    return {"model": model, "machine": {"cpu": platform.processor() or platform.machine(),
                                        "threads": threads or torch.get_num_threads()},
            "date": time.strftime("%Y-%m-%d"), "labels": labels, "rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--refine", type=int, nargs="*", default=[0, 10, 20])
    parser.add_argument("--no-affine-row", action="store_true", help="skip the network-alone row")
    parser.add_argument("--refine-only", type=int, default=0, help="also run refinement from a zero network")
    parser.add_argument("--coarse", type=int, nargs="*", default=None,
                        help="quarter-resolution steps before each --refine row's steps (one value per row "
                             "or one for all; default: the pipeline's)")
    parser.add_argument("--search", type=int, nargs="*", default=None,
                        help="squaring steps inside each --refine row's search (one value per row or one for all; "
                             "default: the pipeline's)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    settings: list[dict[str, Any]] = []
    if not args.no_affine_row:
        settings.append({"name": "network", "affine": False, "refine": 0})
    per_row = {}
    for option, values in (("coarse", args.coarse), ("search", args.search)):
        values = values or [None]
        if len(values) not in (1, len(args.refine)):
            parser.error(f"--{option}: expected 1 or {len(args.refine)} values, got {len(values)}")
        per_row[option] = values * len(args.refine) if len(values) == 1 else values
    for n, c, q in zip(args.refine, per_row["coarse"], per_row["search"], strict=True):
        row = {"name": f"network+affine+refine{n}" if n else "network+affine", "affine": True, "refine": n}
        if c is not None and n:
            row.update(coarse=c, name=f"network+affine+coarse{c}+refine{n}")
        if q is not None and n:
            row.update(search=q, name=f"{row['name']}+search{q}")
        settings.append(row)
    if args.refine_only:
        settings.append({"name": f"affine+refine{args.refine_only} (no network)", "affine": True,
                         "refine": args.refine_only, "zero_network": True})
    result = run(args.model, settings, args.data, args.threads)
    for name, s in result["summary"].items():
        print(f"{name:>32}: Dice {s['dice_before']:.3f} -> {s['dice_after']:.3f} {s['dice_after_per_pair']}, "
              f"NDV max {s['ndv_percent_max']:.4f}%, |J|<=0 max {s['jac_nonpos_percent_max']:.4f}%, "
              f"{s['seconds_mean']:.1f} s/pair")
    if args.json:
        from eoir_cli.fileio import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
