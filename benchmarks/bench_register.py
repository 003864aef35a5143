"""Whole-process time of ``eoir register``, quiet and beside a competing CPU-bound process.

Method: every registration is a fresh ``python -m eoir_cli.cli register`` process timed from
start to exit (what a user waits for at the shell: interpreter and torch start-up, loading,
every stage, writing the default outputs), on the labelled pairs of a Learn2Reg-style manifest
(default: the three ``test`` pairs of ``shared/data/brain_lumirlike``, 160×224×192, 1 mm, scored
on the manifest's ``labels_eval``; ``--no-hd95`` because HD95 is evaluation, not registration).
Then the same pairs as one batch process (``--pairs``; each pair ``--batch-repeats`` times under its
own name, so a batch with several workers is measured past its last, half-empty round), whose wall
time is divided by the number of pairs. Both are run once with the machine otherwise idle
("quiet") and once while this script keeps one extra CPU-bound process running ("busy": a Python
busy loop, the stand-in for a second registration or a training job). Per-stage seconds come from
each pair's ``metrics.json``.

One command re-measures the default pipeline (e.g. after the bundled network changes):

    python benchmarks/bench_register.py --json benchmarks/results/register_process.json

Extra ``eoir register`` options go after ``--``, e.g. ``-- --refine 10``. On a shared machine
run it alone (here: through ``/work/quiet.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain_lumirlike" / "SYNBRAIN_dataset.json"
BUSY_LOOP = "while True:\n    pass\n"


def _pairs(manifest: Path) -> tuple[list[dict[str, Path]], list[int]]:
    data = json.loads(manifest.read_text())
    root = manifest.parent
    pairs = []
    for entry in data["test"]:
        fixed, moving = root / entry["fixed"].lstrip("/"), root / entry["moving"].lstrip("/")
        pairs.append({"fixed": fixed, "moving": moving,
                      "fixed_seg": Path(str(fixed).replace("imagesTr", "labelsTr")),
                      "moving_seg": Path(str(moving).replace("imagesTr", "labelsTr"))})
    return pairs, [int(v) for v in data.get("labels_eval", [])]


def _eoir(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eoir_cli.cli", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"eoir {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return seconds, proc


def _row(metrics: dict[str, Any], wall: float | None) -> dict[str, Any]:
    seg = metrics.get("segmentation") or {}
    return {"wall_s": None if wall is None else round(wall, 3), "stages_s": metrics.get("timings_s", {}),
            "dice_before": seg.get("dice_before_mean"), "dice_after": seg.get("dice_after_mean"),
            "ndv_percent": metrics["field"]["ndv_percent"], "sdlogj": metrics["field"]["sdlogj"],
            "jac_nonpos_percent": metrics["field"]["jac_nonpos_percent"], "refine_steps": metrics.get("refine_steps")}


def _batch_file(pairs: list[dict[str, Path]], repeats: int, path: Path) -> Path:
    """A pairs.csv with every pair ``repeats`` times (names p<pair>_<copy>)."""
    lines = ["fixed,moving,fixed_seg,moving_seg,name"]
    for r in range(repeats):
        for n, pair in enumerate(pairs):
            lines.append(f"{pair['fixed']},{pair['moving']},{pair['fixed_seg']},{pair['moving_seg']},p{n}_{r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_condition(pairs: list[dict[str, Path]], labels: list[int], repeats: int, extra: list[str], busy: bool,
                  work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Single-pair processes, then one batch process, with or without a competing busy loop."""
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        load_before = list(os.getloadavg())
        single = []
        label_arg = ["--labels", ",".join(map(str, labels))] if labels else []
        for n, pair in enumerate(pairs):
            out = work / f"{'busy' if busy else 'quiet'}_{n}"
            wall, _ = _eoir(["register", str(pair["fixed"]), str(pair["moving"]), "-o", str(out),
                             "--moving-seg", str(pair["moving_seg"]), "--fixed-seg", str(pair["fixed_seg"]),
                             "--no-hd95", *label_arg, *extra], env)
            row = _row(json.loads((out / "metrics.json").read_text()), wall)
            row.update(fixed=pair["fixed"].name, moving=pair["moving"].name)
            single.append(row)
            print(f"{'busy ' if busy else 'quiet'} {pair['moving'].name} -> {pair['fixed'].name}: {wall:.2f} s, "
                  f"Dice {row['dice_before']:.3f} -> {row['dice_after']:.3f}, NDV {row['ndv_percent']:.5f} %, "
                  f"stages {row['stages_s']}", flush=True)
        batch_out = work / f"{'busy' if busy else 'quiet'}_batch"
        batch = _batch_file(pairs, repeats, work / f"{'busy' if busy else 'quiet'}_pairs.csv")
        wall, _ = _eoir(["register", "--pairs", str(batch), "-o", str(batch_out), "--no-hd95", *label_arg, *extra],
                        env)
        batch_rows = [_row(json.loads(p.read_text()), None) for p in sorted(batch_out.glob("*/metrics.json"))]
        print(f"{'busy ' if busy else 'quiet'} batch of {len(batch_rows)}: {wall:.2f} s "
              f"({wall / max(len(batch_rows), 1):.2f} s per pair)", flush=True)
        return {"busy": busy, "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
                "single": single, "batch": {"wall_s": round(wall, 3), "pairs": len(batch_rows),
                                            "per_pair_s": round(wall / max(len(batch_rows), 1), 3),
                                            "rows": batch_rows}}
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def summarise(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean wall time, mean per-stage seconds, mean Dice and max NDV per condition, and busy/quiet ratios."""
    out: dict[str, Any] = {}
    for cond in conditions:
        rows = cond["single"]
        stages = sorted({k for r in rows for k in r["stages_s"]})
        out["busy" if cond["busy"] else "quiet"] = {
            "wall_s_mean": sum(r["wall_s"] for r in rows) / len(rows),
            "batch_per_pair_s": cond["batch"]["per_pair_s"],
            "stages_s_mean": {s: sum(r["stages_s"].get(s, 0.0) for r in rows) / len(rows) for s in stages},
            "dice_after_mean": sum(r["dice_after"] for r in rows) / len(rows),
            "dice_after_per_pair": [round(r["dice_after"], 4) for r in rows],
            "ndv_percent_max": max(r["ndv_percent"] for r in rows),
        }
    if "quiet" in out and "busy" in out:
        q, b = out["quiet"], out["busy"]
        out["busy_over_quiet"] = {
            "wall": b["wall_s_mean"] / q["wall_s_mean"], "batch": b["batch_per_pair_s"] / q["batch_per_pair_s"],
            "stages": {s: b["stages_s_mean"][s] / q["stages_s_mean"][s]
                       for s in q["stages_s_mean"] if q["stages_s_mean"][s] > 0.02 and s in b["stages_s_mean"]},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=DATA, help="Learn2Reg-style dataset JSON ('test' pairs)")
    parser.add_argument("--conditions", nargs="+", choices=("quiet", "busy"), default=["quiet", "busy"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--batch-repeats", type=int, default=2, help="each pair this many times in the batch")
    parser.add_argument("extra", nargs="*", help="extra eoir register options (after --)")
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        print(f"error: {args.manifest}: no such manifest", file=sys.stderr)
        return 1
    pairs, labels = _pairs(args.manifest)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)  # measure eoir's own thread policy, not a wrapper's
    work = Path(tempfile.mkdtemp(prefix="eoir-bench-register-"))
    try:
        conditions = [run_condition(pairs, labels, args.batch_repeats, args.extra, c == "busy", work, env)
                      for c in args.conditions]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from eoir_cli.bench import machine_info

    result = {"schema": "eoir-bench-register/1", "machine": machine_info(), "manifest": str(args.manifest),
              "extra_args": args.extra, "batch_repeats": args.batch_repeats, "labels": labels,
              "conditions": conditions, "summary": summarise(conditions)}
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        from eoir_cli.fileio import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
