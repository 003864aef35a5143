"""Print README's performance table (Markdown) from ``bench_inference.py --json`` result files.

Usage::

    python benchmarks/make_table.py benchmarks/results/cpu_64.json benchmarks/results/cpu_96x112x96.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[str]:
    """Markdown rows of one result file (one block per shape and width)."""
    data = json.loads(path.read_text())
    comparisons = {c["label"]: c for c in data.get("comparisons", [])}
    out = []
    previous = None
    for r in data["results"]:
        shape = "×".join(map(str, r["shape"]))
        if r.get("error"):
            out.append(f"| {shape} | {r['label']} | failed: {r['error']} | | | | | | |")
            continue
        label, c = r["label"].rsplit(" C=", 1)
        block = f"{shape}, C={c}"
        cmp = comparisons.get(r["label"], {})
        speed = f"{cmp['speedup_vs_eager']:.2f}×" if "speedup_vs_eager" in cmp else ""
        mem = f"{cmp['memory_vs_eager']:.2f}×" if "memory_vs_eager" in cmp else ""
        diff = f"{cmp['max_abs_vs_fp32']:.2g}" if "max_abs_vs_fp32" in cmp else "(reference)"
        gflops = f"{r['gflops_per_s']:.0f}" if r.get("gflops_per_s") else ""
        share = f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") else ""
        out.append(f"| {block if block != previous else ''} | {label} | {r['latency_s']['median']:.2f} | "
                   f"{r['peak_rss_mb'] / 1024:.2f} | {speed} | {mem} | {diff} | {gflops} | {share} |")
        previous = block
    for s in data.get("skipped", []):
        out.append(f"| | {s['label']} | skipped: {s['skipped']} | | | | | | |")
    return out


def main(paths: list[str]) -> int:
    print("| shape, C | row | median s | peak RSS GB | speed vs eager | memory vs eager | max \\|Δdisp\\| vs fp32 "
          "| GFLOP/s | share of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|")

    for p in paths:
        print("\n".join(rows(Path(p))))
    for p in paths:
        peak = json.loads(Path(p).read_text())["machine"].get("matmul_peak", {}).get("cpu")
        if peak:
            print(f"\n{Path(p).name}: measured matmul peak fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s "
                  f"({peak['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
