"""Benchmarks of the runtime backends (``eoir bench``): latency, throughput, peak memory, achieved FLOP rate.

Method (written down so numbers can be compared across machines):

* One measurement = one (model, backend, precision, shape). By default it runs in a **fresh child
  process** so its peak resident memory (``VmHWM``) belongs to that measurement alone; the RSS
  after loading the model (before the first pair) is reported too.
* ``warmup`` untimed calls, then ``runs`` timed calls of :func:`eoir_cli.inference.run_pair` (the
  path ``register`` and ``test`` take) on one smooth synthetic pair (:func:`smooth_pair`; numpy in,
  numpy out, so GPU work is synchronised by the copy back).
* Latency median / p10 / p90 in seconds; pairs/s = 1 / median; FLOPs from
  :func:`eoir_cli.info.count_flops` (convolutions; warps and resizes are not counted), achieved
  GFLOP/s = FLOPs / median.
* GPU: ``torch.cuda.max_memory_allocated`` for PyTorch backends.
* A measurement that fails becomes a row with its error; the others still run.
* Machine metadata: CPU model, cores, load average before and after (contention), GPU, library
  versions, git commit.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import dataclasses
import logging
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "eoir-bench/1"
BENCH_BACKENDS = ("torch", "onnx", "onnx-native", "tensorrt")
DEFAULT_SHAPE = (64, 64, 64)


@dataclasses.dataclass
class BenchSpec:
    """One measurement.

    Attributes:
        model: checkpoint / preset / ``"default"`` / ``.onnx`` / ``.engine`` path.
        backend: ``torch``, ``onnx`` (gather), ``onnx-native`` (GridSample) or ``tensorrt``.
        shape: spatial size ``(D, H, W)``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: intra-op threads (None = library default).
        runs: timed calls.
        warmup: untimed calls first.
        sampler: PyTorch sampler for the torch backend (``torch`` = grid_sample, ``gather``).
        label: row label (default built from the fields).
        overrides: model config overrides for presets (e.g. ``{"channels": 8}``).
        options: extra backend options (e.g. ``{"eager": True}``, ``{"mem_arena": True}``).
        save_disp: write the last run's displacement ``(3, D, H, W)`` float32 here (``.npy``), to
            compare backends' outputs afterwards.
    """

    model: str
    backend: str
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None
    runs: int = 5
    warmup: int = 1
    sampler: str = "torch"
    label: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    save_disp: str | None = None


def smooth_pair(shape: Sequence[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth random ``(D, H, W)`` volumes in [0, 1] that differ by a smooth deformation.

    The pair benchmarks and export verification run on. Realistic enough to exercise every warp:
    low-frequency structure (not white noise, which the network would never see), a shared
    anatomy-like pattern and a displaced copy.
    """
    import torch
    import torch.nn.functional as F

    from eoir_cli.spatial import warp

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[max(2, s // 8) for s in shape], generator=gen)
    base = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    flow = F.interpolate(torch.randn(1, 3, 4, 4, 4, generator=gen) * 2.0, size=tuple(shape), mode="trilinear",
                         align_corners=True)
    moving = warp(base, flow)
    norm = [(x - x.min()) / (x.max() - x.min() + 1e-6) for x in (moving, base)]
    return norm[0][0, 0].numpy().astype(np.float32), norm[1][0, 0].numpy().astype(np.float32)


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the checkout this code runs from (None outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, GPU, load average, library versions, git commit."""
    import torch

    from eoir_cli.info import versions

    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "memory_gb": mem_gb, "platform": platform.platform(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "versions": versions(), "git_commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def matmul_peak(device: str = "cpu", threads: int | None = None, size: int = 2048, repeats: int = 3) -> dict[str, Any]:
    """The machine's measured matrix-product rate (GFLOP/s) in fp32 and bf16: the ceiling for a row's GFLOP/s.

    Best of ``repeats`` products of two ``size``² matrices, on ``threads`` intra-op threads (the
    rows' setting; default: torch's current one). On a CPU two routes are timed and the faster one
    is the peak: ``torch.mm`` (the BLAS torch links, MKL on x86, which may not pick its best kernels
    on every CPU) and the same product as a 1×1×1 channels_last ``conv3d`` (oneDNN, the library that
    runs the network's convolutions). bf16 counts only where the CPU has bf16 instructions (else the
    figure is an emulation's and is still reported, flagged).

    Returns:
        ``{"fp32": GFLOP/s, "bf16": GFLOP/s, "routes": {...}, "threads", "size", "device"}``.
    """
    import torch
    import torch.nn.functional as F

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        flops = 2.0 * size**3
        routes: dict[str, float] = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if device.startswith("cuda") and not torch.cuda.is_available():
                break
            a = torch.randn(size, size, device=device).to(dtype)
            b = torch.randn(size, size, device=device).to(dtype)
            candidates = {"mm": lambda a=a, b=b: torch.mm(a, b)}
            if device == "cpu":
                # (1, K, M, 1, 1) channels_last input x (N, K, 1, 1, 1) weight = an (M, K) x (K, N) GEMM in oneDNN.
                x = a.t().contiguous().view(1, size, size, 1, 1).contiguous(memory_format=torch.channels_last_3d)
                w = b.t().contiguous().view(size, size, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
                candidates["onednn"] = lambda x=x, w=w: F.conv3d(x, w)
            for route, fn in candidates.items():
                with torch.inference_mode():
                    fn()
                    best = float("inf")
                    for _ in range(repeats):
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        fn()
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        best = min(best, time.perf_counter() - start)
                routes[f"{name}_{route}"] = flops / best / 1e9
        peak = {name: max((v for k, v in routes.items() if k.startswith(name + "_")), default=None)
                for name in ("fp32", "bf16")}
        return {**peak, "routes": routes, "threads": torch.get_num_threads(), "size": size, "device": device}
    finally:
        torch.set_num_threads(previous)


def _proc_status_mb(key: str) -> float | None:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def _high_water_mb(*samples: float | None) -> float | None:
    """Peak resident memory of this process image (VmHWM), never below the current resident size
    or a size sampled earlier in this process (``samples``).

    The kernel folds per-thread RSS counters into ``VmHWM`` lazily, so a read of it can trail a
    ``VmRSS`` read taken moments before (seen on CI: 802.72 < 802.84 MB). Not ``ru_maxrss`` (the
    fallback off Linux): Linux carries that over fork and exec, so a spawned child would report at
    least its parent's size.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return max(x for x in (peak, _rss_mb(), *samples) if x is not None)


def measure(spec: BenchSpec, model_path: str) -> dict[str, Any]:
    """Run one measurement in this process (see the module docstring for the method).

    Args:
        spec: what to measure.
        model_path: the file to open (an exported ``.onnx`` for ONNX rows of a checkpoint).

    Returns:
        A result row (without ``flops``; :func:`run_bench` adds those).
    """
    import torch

    from eoir_cli.backends import load_backend
    from eoir_cli.inference import run_pair

    if spec.threads:
        torch.set_num_threads(spec.threads)
    options: dict[str, Any] = {"threads": spec.threads}
    if spec.backend == "torch":
        options.update(precision=spec.precision, sampler=spec.sampler)
        if spec.overrides:
            options["overrides"] = spec.overrides
    options.update(spec.options)
    backend = load_backend(model_path, device=spec.device, **options)
    loaded_rss = _rss_mb()
    moving, fixed = smooth_pair(spec.shape)
    cuda = backend.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec.warmup):
        run_pair(backend, moving, fixed)
    times = []
    disp = None
    for _ in range(spec.runs):
        start = time.perf_counter()
        disp = run_pair(backend, moving, fixed)
        times.append(time.perf_counter() - start)
    if spec.save_disp and disp is not None:
        np.save(spec.save_disp, disp)
    t = np.asarray(times)
    return {
        "device": backend.device, "precision": backend.precision, "fallback_reason": backend.fallback_reason,
        "providers": getattr(backend, "providers", None),
        "latency_s": {"median": float(np.median(t)), "p10": float(np.percentile(t, 10)),
                      "p90": float(np.percentile(t, 90)), "mean": float(t.mean()), "min": float(t.min()),
                      "all": [float(x) for x in t]},
        "pairs_per_s": float(1.0 / np.median(t)),
        "loaded_rss_mb": loaded_rss, "peak_rss_mb": _high_water_mb(loaded_rss),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "config": backend.config.to_dict(),
    }


def _measure_child(spec: BenchSpec, model_path: str) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    return measure(spec, model_path)


def runtime_of(backend: str) -> str:
    """The runtime a bench backend runs on (``onnx-native`` is an ``onnx`` file with GridSample)."""
    if backend not in BENCH_BACKENDS:
        raise ValueError(f"backend: expected one of {BENCH_BACKENDS}, got {backend!r}")
    return "onnx" if backend in ("onnx", "onnx-native") else backend


def file_for(spec: BenchSpec, workdir: Path) -> tuple[str, float, str | None]:
    """The file a spec runs on when it needs no conversion: ``(path, prepare seconds, note)``.

    The default ``prepare`` of :func:`run_bench`. Converting a checkpoint to ONNX or an engine is
    export's job: pass ``prepare=export.convert.model_for_backend`` (``eoir bench`` does).
    """
    from eoir_cli.backends import backend_kind

    kind = backend_kind(spec.model)
    wanted = runtime_of(spec.backend)
    if kind != wanted:
        raise ValueError(f"{spec.model}: a {kind} file cannot run on the {spec.backend} backend"
                         + ("; pass a converter as prepare (export.convert.model_for_backend)"
                            if kind == "torch" else "; pass a checkpoint to have it exported"))
    return spec.model, 0.0, None


def _label(spec: BenchSpec) -> str:
    if spec.label:
        return spec.label
    extra = f" [{spec.sampler}]" if spec.backend == "torch" and spec.sampler != "torch" else ""
    return f"{spec.backend}{extra} {spec.precision}"


def run_bench(
    specs: Sequence[BenchSpec],
    isolate: bool = True,
    workdir: str | os.PathLike[str] | None = None,
    on_result: Any = None,
    prepare: Callable[[BenchSpec, Path], tuple[str, float, str | None]] | None = None,
    peak: bool = True,
) -> dict[str, Any]:
    """Measure every spec and return ``{"schema", "machine", "results"}`` (one row per spec).

    Args:
        specs: the measurements.
        isolate: run each in a fresh child process (true peak memory per row); False runs in
            this process (faster; ``peak_rss_mb`` is then this process's high-water mark).
        workdir: where exported ONNX/engine files go (default: a temporary directory).
        on_result: optional callback ``f(row)`` after each row (progress display).
        prepare: ``prepare(spec, workdir) -> (file, seconds, note)`` giving the file a spec runs on
            (default :func:`file_for`: no conversion; ``export.convert.model_for_backend`` exports
            checkpoints to ONNX / TensorRT on the fly).
        peak: measure the matrix-product peak first (:func:`matmul_peak`, a few seconds) and give each
            row its ``peak_gflops_per_s`` (the peak of its precision on its device) and
            ``fraction_of_peak``.
    """
    from eoir_cli.info import count_flops

    machine = machine_info()
    if peak:
        cpu_threads = next((s.threads for s in specs if s.threads), None)
        machine["matmul_peak"] = {"cpu": matmul_peak("cpu", cpu_threads)}
        if any(s.device.startswith("cuda") for s in specs):
            machine["matmul_peak"]["cuda"] = matmul_peak("cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="eoir-bench-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            row: dict[str, Any] = {"label": _label(spec), "model": spec.model, "backend": spec.backend,
                                   "shape": list(spec.shape), "precision": spec.precision, "threads": spec.threads,
                                   "runs": spec.runs, "warmup": spec.warmup, "sampler": spec.sampler,
                                   "overrides": spec.overrides, "options": spec.options, "isolated": isolate,
                                   "error": None}
            try:
                path, prep, note = (prepare or file_for)(spec, work)
                row.update(prepare_seconds=prep, note=note, file=path)
                if isolate:
                    ctx = multiprocessing.get_context("spawn")
                    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                        row.update(pool.submit(_measure_child, spec, path).result())
                else:
                    row.update(measure(spec, path))
                config = _config_of(row.get("config"))
                row["flops"] = count_flops(config, spec.shape) if config else None
                if row["flops"]:
                    row["gflops_per_s"] = row["flops"] / row["latency_s"]["median"] / 1e9
                    limit = _peak_for(machine.get("matmul_peak"), row)
                    if limit:
                        row["peak_gflops_per_s"] = limit
                        row["fraction_of_peak"] = row["gflops_per_s"] / limit
            except concurrent.futures.process.BrokenProcessPool:
                row["error"] = "the measurement process died (out of memory?)"
            except Exception as err:  # a failing backend becomes a row, not a crash
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                row["error"] = f"{type(err).__name__}: {text}" if text else type(err).__name__
            rows.append(row)
            if on_result is not None:
                on_result(row)
    machine["load_average_after"] = list(os.getloadavg())
    return {"schema": SCHEMA, "machine": machine, "results": rows}


def _peak_for(peaks: dict[str, Any] | None, row: dict[str, Any]) -> float | None:
    """The matrix-product peak that bounds a row: its device's, in its precision (fp16 rows: the bf16 one on a CPU)."""
    if not peaks:
        return None
    device = "cuda" if str(row.get("device", "cpu")).startswith("cuda") else "cpu"
    table = peaks.get(device) or {}
    precision = row.get("precision", "fp32")
    return table.get("bf16" if precision in ("bf16", "fp16") else "fp32")


def _config_of(raw: dict[str, Any] | None) -> Any:
    from eoir_cli.config import ModelConfig

    return ModelConfig.from_dict(raw) if raw else None
