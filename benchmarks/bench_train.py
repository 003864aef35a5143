"""Training step time and peak memory of EOIR (LUMIR preset), CPU at half resolution, GPU at full.

Method: synthetic [0, 1] inputs (random smooth images are not needed for timing), the full training
step (forward_pyramid, deep-supervision NCC + l2 smoothness, backward, Adam step), ``--warmup``
untimed steps then ``--steps`` timed steps; median and spread reported. Peak memory: process max
RSS (``resource.getrusage``, includes the Python/torch baseline) on CPU, ``torch.cuda.max_memory_allocated``
on GPU. Writes a JSON with machine metadata.

    python benchmarks/bench_train.py --channels 8 16 32 --steps 3 --out benchmarks/results/train.json
    # the bundled model's configuration, fp32 and bf16 autocast, one thread:
    python benchmarks/bench_train.py --channels 8 16 --cpu-size 40 56 48 --levels 4 --window 7 5 3 --cpu-amp \
        --threads 1 --steps 5 --out benchmarks/results/train_default_bf16.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from eoir_cli.config import resolve_config
from eoir_cli.losses import deep_supervision_loss
from eoir_cli.model import EOIR


def bench(channels: int, size: tuple[int, int, int], device: str, amp: bool, warmup: int, steps: int,
          levels: int | None = None, windows: tuple[int, ...] = (9,)) -> dict:
    torch.manual_seed(0)
    config = resolve_config("lumir", channels=channels, levels=levels)
    model = EOIR(config).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device == "cuda")
    dtype = torch.float16 if device == "cuda" else torch.bfloat16  # what eoir train --amp uses
    moving = torch.rand(1, 1, *size, device=device)
    fixed = torch.rand(1, 1, *size, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            out = model.forward_pyramid(moving, fixed)
        out.velocities = [v.float() for v in out.velocities]
        out.disps = [d.float() for d in out.disps]
        loss, _ = deep_supervision_loss(out, moving, fixed, windows=windows)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"channels": channels, "levels": config.levels, "windows": list(windows), "size": list(size),
            "device": device, "amp": (str(dtype).replace("torch.", "") if amp else False),
            "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
            "steps": steps, "peak_mem_mib": round(peak, 1),
            "peak_mem_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--cpu-size", type=int, nargs=3, default=[80, 112, 96])
    parser.add_argument("--gpu-size", type=int, nargs=3, default=[160, 224, 192])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--cpu-amp", action="store_true", help="also time bf16 autocast steps on the CPU")
    parser.add_argument("--levels", type=int, default=None, help="pyramid levels (default: the preset's)")
    parser.add_argument("--window", type=int, nargs="+", default=[9], help="NCC window per level")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    shape = {"levels": args.levels, "windows": tuple(args.window)}
    if not args.skip_cpu:
        for c in args.channels:
            for amp in (False, True) if args.cpu_amp else (False,):
                results.append(bench(c, tuple(args.cpu_size), "cpu", amp, args.warmup, args.steps, **shape))
                print(json.dumps(results[-1]), flush=True)
    if torch.cuda.is_available():
        for c in args.channels:
            for amp in (False, True):
                results.append(bench(c, tuple(args.gpu_size), "cuda", amp, args.warmup, args.steps, **shape))
                print(json.dumps(results[-1]), flush=True)
    else:
        print("no CUDA GPU: GPU rows skipped")
    print(f"\n{'device':6} {'C':>3} {'size':>14} {'amp':>5} {'step s (median)':>16} {'min-max':>14} {'peak MiB':>9}")
    for r in results:
        size = "x".join(map(str, r["size"]))
        print(f"{r['device']:6} {r['channels']:>3} {size:>14} {str(r['amp']):>5} {r['step_s_median']:>16.2f} "
              f"{r['step_s_min']:>6.2f}-{r['step_s_max']:<7.2f} {r['peak_mem_mib']:>9.0f}")
    meta = {"machine": platform.machine(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "method": f"warmup then timed full training steps; NCC windows {args.window} + l2 smoothness, "
                                 "no Dice; --amp = fp16 on CUDA, bf16 autocast on CPU"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
