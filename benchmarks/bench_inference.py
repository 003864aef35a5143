"""Reproduce README's performance table: EOIR inference per backend on this machine.

Every row runs the same weights (lumir architecture, random init with seed 0, saved once per width C;
speed and memory do not depend on the weight values). Rows (each measured in a fresh process, see
``export/bench.py`` for the method):

* ``eager``: the original code's way of running: ``torch.no_grad``, NCDHW, grid_sample sampler.
* ``eager bf16 autocast``: the same under CPU bf16 autocast (casts around every block, norms in fp32).
* ``torch fp32``: our inference path (:func:`eoir_cli.lean.forward_lean`: ``inference_mode``,
  channels_last_3d, one image at a time through the encoder, in-place InstanceNorm + PReLU, slab convs).
* ``torch bf16``: the same with bf16 storage end to end (fp32 statistics, velocity head, warps' coordinates).
* ``ORT gather`` / ``ORT native``: onnxruntime CPU on the two export samplers (arena off).
* GPU rows (CUDA fp32/bf16, ORT-CUDA, TensorRT fp32/fp16) when a GPU exists, else listed as skipped.

Usage::

    python benchmarks/bench_inference.py --shape 64 64 64 --channels 32 8 --json benchmarks/results/64.json
    python benchmarks/bench_inference.py --shape 160 224 192 --channels 32 --rows eager torch-bf16

Comparisons printed at the end: speed-up and peak-memory ratio against ``eager``, gather/native
time ratio, and max |Δdisp| (voxels) of bf16 and the ONNX rows against ``torch fp32``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROWS = ("eager", "eager-bf16", "torch-fp32", "torch-bf16", "ort-gather", "ort-native",
        "cuda-fp32", "cuda-bf16", "ort-cuda", "trt-fp32", "trt-fp16")


def build_specs(shape, channels, rows, runs, warmup, threads, workdir):
    """BenchSpecs for the requested rows; GPU rows are replaced by skip notes without a GPU."""
    import torch

    from eoir_cli.bench import BenchSpec

    gpu = torch.cuda.is_available()
    try:
        import onnxruntime as ort

        ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        ort_cuda = False
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    from eoir_cli.checkpoint import load_model, save_checkpoint

    specs, skipped = [], []
    for c in channels:
        # One weight file per width so every row (and every process) runs the same network.
        torch.manual_seed(0)
        ckpt = str(save_checkpoint(Path(workdir) / f"lumir_c{c}.pt", load_model("lumir", channels=c)))
        common = {"shape": tuple(shape), "runs": runs, "warmup": warmup, "threads": threads}

        def add(row, backend, label, device="cpu", precision="fp32", c=c, ckpt=ckpt, common=common, **kw):
            if row not in rows:
                return
            disp = str(Path(workdir) / f"disp-{row}-C{c}.npy")
            specs.append(BenchSpec(ckpt, backend, label=f"{label} C={c}", device=device, precision=precision,
                                   save_disp=disp, **common, **kw))

        add("eager", "torch", "eager (original style)", options={"eager": True})
        add("eager-bf16", "torch", "eager bf16 autocast", precision="bf16", options={"eager": True})
        add("torch-fp32", "torch", "torch fp32")
        add("torch-bf16", "torch", "torch bf16", precision="bf16")
        add("ort-gather", "onnx", "ORT gather", options={})
        add("ort-native", "onnx-native", "ORT native GridSample")
        gpu_rows = [("cuda-fp32", "torch", "CUDA fp32", "fp32", gpu, "no CUDA GPU"),
                    ("cuda-bf16", "torch", "CUDA bf16", "bf16", gpu, "no CUDA GPU"),
                    ("ort-cuda", "onnx", "ORT-CUDA gather", "fp32", gpu and ort_cuda,
                     "no CUDA GPU / onnxruntime-gpu"),
                    ("trt-fp32", "tensorrt", "TensorRT fp32", "fp32", gpu and has_trt, "no CUDA GPU / TensorRT"),
                    ("trt-fp16", "tensorrt", "TensorRT fp16", "fp16", gpu and has_trt, "no CUDA GPU / TensorRT")]
        for row, backend, label, precision, ok, why in gpu_rows:
            if row not in rows:
                continue
            if ok:
                add(row, backend, label, device="cuda", precision=precision)
            else:
                skipped.append({"label": f"{label} C={c}", "skipped": why})
    return specs, skipped


def compare(results, workdir):
    """Ratios and output differences between rows of the same C."""
    by = {r["label"]: r for r in results if not r.get("error")}
    out = []
    for label, r in by.items():
        c = label.rsplit("C=", 1)[1]
        eager = by.get(f"eager (original style) C={c}")
        native = by.get(f"ORT native GridSample C={c}")
        entry = {"label": label, "median_s": r["latency_s"]["median"], "peak_rss_gb": r["peak_rss_mb"] / 1024}
        if eager:
            entry["speedup_vs_eager"] = eager["latency_s"]["median"] / r["latency_s"]["median"]
            entry["memory_vs_eager"] = r["peak_rss_mb"] / eager["peak_rss_mb"]
        if native and label.startswith("ORT gather"):
            entry["time_vs_native"] = r["latency_s"]["median"] / native["latency_s"]["median"]
        ref = Path(workdir) / f"disp-torch-fp32-C{c}.npy"
        own = r.get("saved_disp")
        if ref.exists() and own and Path(own).exists() and not label.startswith("torch fp32"):
            a, b = np.load(ref), np.load(own)
            entry["max_abs_vs_fp32"] = float(np.abs(a - b).max())
            entry["mean_abs_vs_fp32"] = float(np.abs(a - b).mean())
        out.append(entry)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from eoir_cli.bench import run_bench
    from eoir_cli.fileio import write_json_atomic
    from export.convert import model_for_backend

    with tempfile.TemporaryDirectory(prefix="eoir-bench-") as workdir:
        specs, skipped = build_specs(args.shape, args.channels, args.rows, args.runs, args.warmup, args.threads,
                                     workdir)

        def show(row):
            if row["error"]:
                print(f"{row['label']:<32} ERROR {row['error']}", flush=True)
            else:
                share = row.get("fraction_of_peak")
                share = f" ({100 * share:.0f}% of the matmul peak)" if share else ""
                print(f"{row['label']:<32} {row['latency_s']['median']:8.2f} s  "
                      f"peak {row['peak_rss_mb'] / 1024:6.2f} GB  {row.get('gflops_per_s', 0):6.1f} GFLOP/s{share}",
                      flush=True)

        report = run_bench(specs, isolate=True, workdir=workdir, on_result=show, prepare=model_for_backend)
        for spec, row in zip(specs, report["results"], strict=True):
            row["saved_disp"] = spec.save_disp
        report["skipped"] = skipped
        report["comparisons"] = compare(report["results"], workdir)
        for s in skipped:
            print(f"{s['label']:<32} skipped: {s['skipped']}")
        for cmp in report["comparisons"]:
            extras = {k: float(f"{v:.3g}") for k, v in cmp.items() if k not in ("label",)}
            print(cmp["label"], extras)
        peaks = report["machine"].get("matmul_peak", {}).get("cpu")
        if peaks:
            print(f"matmul peak ({peaks['threads']} threads): fp32 {peaks['fp32']:.0f}, "
                  f"bf16 {peaks['bf16']:.0f} GFLOP/s "
                  f"(routes: {', '.join(f'{k} {v:.0f}' for k, v in peaks['routes'].items())})")
        load = report["machine"]["load_average"][0], report["machine"]["load_average_after"][0]
        print(f"load average before/after: {load[0]:.1f} / {load[1]:.1f} on {report['machine']['cpu_cores']} cores")
        for row in report["results"]:
            row.pop("saved_disp", None)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
