"""One GPU check of EOIR: latency, peak memory and parity of every CUDA variant, in under 8 minutes, as JSON.

On a CUDA machine (default: 160×224×192, C=32, the LUMIR network with seeded random weights):

* PyTorch inference path (:func:`eoir_cli.lean.forward_lean`, channels_last_3d) in fp32, bf16 and fp16;
* the plain graph (``forward(lean=False)``) in fp32, contiguous and ``channels_last_3d``, under
  fp16 autocast (the way most PyTorch code runs it);
* ``torch.compile`` of the plain graph, fp32 and fp16 autocast (compile time reported separately);
* one AMP training step (``forward_pyramid`` + deep-supervision loss + backward + Adam) at the
  training resolution (half of the inference size per axis, as the LUMIR recipe);
* ONNX Runtime CUDA (gather export) and TensorRT fp16 rows when those packages are importable;
  otherwise the row says why.

Every inference row reports median / min latency (CUDA-synchronised, after a warm-up), peak GPU
memory (``torch.cuda.max_memory_allocated`` for PyTorch rows), and max / mean |Δdisp| (voxels)
against the fp32 inference row on the same smooth synthetic pair. Rows start only while the time
budget (``--budget``, default 420 s) allows; a row that does not fit says so. A failing row records its
error and the others still run.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json      # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --json /tmp/gpu_check_dry.json      # any CPU, 32³ C=4, ~1 min

``--dry-run`` runs every row's code on the CPU at 32³ with C=4 (bf16 only where the CPU has it;
fp16 rows and TensorRT are reported as not applicable; ``torch.compile`` uses the ``eager``
backend; onnxruntime uses its CPU provider), so the script is tested before a GPU is ever lent.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "eoir-gpu-check/1"
FULL_SHAPE = (160, 224, 192)
DRY_SHAPE = (32, 32, 32)


class Skip(Exception):
    """A row that cannot run here; the message says why."""


class Check:
    """Collects rows, keeps the time budget and the fp32 reference displacement."""

    def __init__(self, device: str, budget_s: float, runs: int, warmup: int) -> None:
        self.device = device
        self.deadline = time.perf_counter() + budget_s
        self.runs = runs
        self.warmup = warmup
        self.rows: list[dict[str, Any]] = []
        self.reference: np.ndarray | None = None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def row(self, name: str, fn: Callable[[], dict[str, Any]], needs_s: float = 0.0) -> dict[str, Any]:
        """Run one row unless the budget is spent; errors and skips become the row's content."""
        entry: dict[str, Any] = {"row": name}
        start = time.perf_counter()
        try:
            if self.left() < needs_s:
                raise Skip(f"time budget: {self.left():.0f} s left, row needs ~{needs_s:.0f} s")
            entry.update(fn())
            entry["status"] = "ok"
        except Skip as why:
            entry.update(status="skipped", reason=str(why))
        except Exception as err:  # a failing row is reported, the check goes on
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            entry.update(status="error", reason=f"{type(err).__name__}: {first}",
                         traceback=traceback.format_exc(limit=3))
        entry["wall_s"] = round(time.perf_counter() - start, 2)
        self.rows.append(entry)
        shown = {k: v for k, v in entry.items() if k not in ("traceback", "row")}
        print(f"{name:<34} {json.dumps(shown)}", flush=True)
        self._free()
        return entry

    def _free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None

    def time_calls(self, call: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
        """Warm-up, then timed calls; returns latency stats and the last output."""
        self.reset_peak()
        out = None
        for _ in range(self.warmup):
            out = call()
        self.sync()
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            out = call()
            self.sync()
            times.append(time.perf_counter() - start)
        return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
                "gpu_peak_mb": self.peak_mb()}, out

    def parity(self, disp: Any) -> dict[str, Any]:
        """max / mean |Δdisp| voxels against the fp32 inference row."""
        arr = disp.float().cpu().numpy() if hasattr(disp, "cpu") else np.asarray(disp)
        arr = arr.reshape(arr.shape[-4:])
        if self.reference is None:
            return {"max_abs_vs_fp32": None, "mean_abs_vs_fp32": None}
        diff = np.abs(arr - self.reference)
        return {"max_abs_vs_fp32": float(diff.max()), "mean_abs_vs_fp32": float(diff.mean()),
                "disp_max": float(np.abs(arr).max())}


@contextlib.contextmanager
def autocast(device: str, dtype: Any) -> Iterator[None]:
    import torch

    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        yield


def build_model(channels: int, device: str) -> Any:
    import torch

    from eoir_cli.checkpoint import load_model

    torch.manual_seed(0)
    return load_model("lumir", channels=channels).to(device).eval()


def torch_rows(check: Check, model: Any, moving: Any, fixed: Any, dry: bool) -> None:
    """Inference path in fp32 / bf16 / fp16, plain graph contiguous and channels_last, torch.compile."""
    import torch

    device = check.device
    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported() or device == "cpu"
    variants = [("torch fp32 (inference path)", None, "lean"),
                ("torch bf16 (inference path)", torch.bfloat16, "lean"),
                ("torch fp16 (inference path)", torch.float16, "lean"),
                ("plain fp32 (original graph)", None, "plain"),
                ("plain fp16 autocast", torch.float16, "plain"),
                ("plain fp16 autocast channels_last_3d", torch.float16, "plain-cl")]
    for name, dtype, kind in variants:
        def run(dtype: Any = dtype, kind: str = kind) -> dict[str, Any]:
            if dtype is torch.float16 and device == "cpu":
                raise Skip("fp16 is a CUDA row (CPU autocast runs bf16)")
            if dtype is torch.bfloat16 and not bf16_ok:
                raise Skip("this GPU has no bf16")
            net = model
            m, f = moving, fixed
            if kind == "plain-cl":
                net = model.to(memory_format=torch.channels_last_3d)
                m = moving.contiguous(memory_format=torch.channels_last_3d)
                f = fixed.contiguous(memory_format=torch.channels_last_3d)

            def call() -> Any:
                with torch.inference_mode(), autocast(device, dtype):
                    return net(m, f, lean=kind == "lean")

            stats, disp = check.time_calls(call)
            if kind == "plain-cl":
                model.to(memory_format=torch.contiguous_format)
            if check.reference is None and dtype is None and kind == "lean":
                check.reference = disp.float().cpu().numpy()[0]
            return {**stats, **check.parity(disp)}

        check.row(name, run, needs_s=10 if dry else 30)

    for name, dtype in (("torch.compile fp32 (plain graph)", None), ("torch.compile fp16 autocast", torch.float16)):
        def run_compiled(dtype: Any = dtype) -> dict[str, Any]:
            if dtype is torch.float16 and device == "cpu":
                raise Skip("fp16 is a CUDA row")
            backend = "eager" if dry else "inductor"
            compiled = torch.compile(model, backend=backend, dynamic=False)
            start = time.perf_counter()
            with torch.inference_mode(), autocast(device, dtype):
                compiled(moving, fixed, lean=False)
            check.sync()
            compile_s = time.perf_counter() - start

            def call() -> Any:
                with torch.inference_mode(), autocast(device, dtype):
                    return compiled(moving, fixed, lean=False)

            stats, disp = check.time_calls(call)
            torch._dynamo.reset()
            return {**stats, "compile_s": compile_s, "compile_backend": backend, **check.parity(disp)}

        check.row(name, run_compiled, needs_s=20 if dry else 150)


def train_row(check: Check, channels: int, shape: tuple[int, int, int], dry: bool) -> None:
    """One AMP training step at half the inference size per axis (bf16 autocast on CPU, fp16 + scaler on CUDA)."""
    import torch

    from eoir_cli.losses import deep_supervision_loss

    def run() -> dict[str, Any]:
        device = check.device
        size = tuple(max(s // 2, 32) for s in shape)
        model = build_model(channels, device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)
        gen = torch.Generator().manual_seed(0)
        moving = torch.rand(1, 1, *size, generator=gen).to(device)
        fixed = torch.rand(1, 1, *size, generator=gen).to(device)

        def step() -> float:
            with torch.autocast(device, dtype=dtype):
                out = model.forward_pyramid(moving, fixed)
            out.velocities = [v.float() for v in out.velocities]
            out.disps = [d.float() for d in out.disps]
            loss, _ = deep_supervision_loss(out, moving, fixed, windows=(9,))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return float(loss.detach())

        stats, loss = check.time_calls(step)
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        return {**stats, "size": list(size), "autocast": str(dtype).replace("torch.", ""), "loss": loss,
                "nonfinite_weights": bad}

    check.row("AMP training step", run, needs_s=10 if dry else 40)


def onnx_rows(check: Check, model: Any, shape: tuple[int, int, int], workdir: Path, dry: bool) -> None:
    """onnxruntime CUDA (CPU provider in a dry run) on the gather export; TensorRT fp16 when importable."""
    from eoir_cli.bench import smooth_pair
    from export.onnx_export import torch2onnx

    state: dict[str, Any] = {}

    def export() -> Path:
        if "onnx" not in state:
            cpu_model = copy.deepcopy(model).float().cpu()
            state["onnx"] = torch2onnx(cpu_model, workdir / "eoir.onnx", shape=shape, verify=False).path
        return state["onnx"]

    moving, fixed = smooth_pair(shape)

    def run_ort() -> dict[str, Any]:
        try:
            import onnxruntime as ort
        except ImportError:
            raise Skip("onnxruntime is not installed (pip install onnxruntime-gpu)") from None
        provider = "CPUExecutionProvider" if dry else "CUDAExecutionProvider"
        if provider not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no {provider} (have {ort.get_available_providers()}; "
                       "pip install onnxruntime-gpu)")
        from eoir_cli.backends import OnnxBackend

        backend = OnnxBackend(export(), providers=[provider])
        stats, disp = check.time_calls(lambda: backend(moving, fixed))
        stats["gpu_peak_mb"] = None  # onnxruntime allocates outside torch's allocator
        return {**stats, "providers": backend.providers, **check.parity(disp)}

    check.row("ONNX Runtime gather" + (" (CPU, dry run)" if dry else " CUDA"), run_ort, needs_s=10 if dry else 60)

    def run_trt() -> dict[str, Any]:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise Skip("tensorrt is not installed (pip install tensorrt)") from None
        if check.device != "cuda":
            raise Skip("TensorRT needs a CUDA GPU")
        from eoir_cli.backends import TensorRTBackend
        from export.tensorrt import onnx2engine

        start = time.perf_counter()
        engine = onnx2engine(export(), fp16=True)
        build_s = time.perf_counter() - start
        backend = TensorRTBackend(engine)
        stats, disp = check.time_calls(lambda: backend(moving, fixed))
        stats["gpu_peak_mb"] = None
        return {**stats, "engine_build_s": build_s, **check.parity(disp)}

    check.row("TensorRT fp16 (gather export)", run_trt, needs_s=120)


def machine() -> dict[str, Any]:
    import torch

    from eoir_cli.bench import machine_info

    info = machine_info()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, 32³, C=4: exercise every row's code")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="D H W (default 160 224 192)")
    parser.add_argument("--channels", type=int, default=None, help="start channels (default 32)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per row (default 3, dry run 1)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; rows that do not fit are skipped")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run:
        device, shape, channels, runs = "cpu", DRY_SHAPE, 4, 1
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU on this machine (run with --dry-run to exercise the script on the CPU)",
                  file=sys.stderr)
            return 1
        device, shape, channels, runs = "cuda", FULL_SHAPE, 32, 3
        torch.backends.cudnn.benchmark = True
    shape = tuple(args.shape) if args.shape else shape
    channels = args.channels or channels
    runs = args.runs or runs
    started = time.perf_counter()
    check = Check(device, args.budget, runs=runs, warmup=1)
    from eoir_cli.bench import smooth_pair

    model = build_model(channels, device)
    moving, fixed = (torch.from_numpy(a)[None, None].to(device) for a in smooth_pair(shape))
    with tempfile.TemporaryDirectory(prefix="eoir-gpu-check-") as tmp:
        torch_rows(check, model, moving, fixed, args.dry_run)
        train_row(check, channels, shape, args.dry_run)
        onnx_rows(check, model, shape, Path(tmp), args.dry_run)
    report = {"schema": SCHEMA, "dry_run": args.dry_run, "device": device, "shape": list(shape),
              "channels": channels, "runs": runs, "budget_s": args.budget,
              "elapsed_s": round(time.perf_counter() - started, 1), "machine": machine(), "rows": check.rows}
    if args.json:
        from eoir_cli.fileio import write_json_atomic

        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    failed = [r["row"] for r in check.rows if r["status"] == "error"]
    print(f"{len(check.rows)} rows in {report['elapsed_s']} s; errors: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
