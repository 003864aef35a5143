"""``eoir bench``: latency, throughput, peak memory and FLOP rate per backend, as a table and JSON."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import PrecisionChoice, cli_command, console


class BenchBackend(str, Enum):
    torch = "torch"
    onnx = "onnx"
    onnx_native = "onnx-native"
    tensorrt = "tensorrt"


def default_model() -> tuple[str, str | None]:
    """The bundled model, or the lumir preset with random weights (and a note saying so)."""
    from eoir_cli.weights import DEFAULT_WEIGHTS

    if DEFAULT_WEIGHTS.is_file():
        return "default", None
    return "lumir", "bundled weights not found: benchmarking the lumir preset (C=32) with random weights"


@cli_command
def bench_command(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Model to measure (repeatable): checkpoint, .onnx, .engine, preset name or 'default' "
                        "(default: the bundled model).")] = None,
    backend: Annotated[list[BenchBackend] | None, typer.Option(
        help="Backend (repeatable); checkpoints are exported on the fly for onnx/onnx-native/tensorrt "
             "(default: the file's own backend; with no --model: torch and onnx).")] = None,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="D H W",
        help="Input size D H W in voxels (default: the bundled model's LUMIR grid 160 224 192; 64 64 64 for "
             "other models).")] = None,
    runs: Annotated[int, typer.Option(min=1, help="Timed runs per row.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 1,
    threads: Annotated[int | None, typer.Option(min=1, help="Intra-op threads (default: library default).")] = None,
    precision: Annotated[PrecisionChoice, typer.Option(help="fp32; bf16 (torch, CPU AVX512-BF16 or CUDA); "
                                                            "fp16 (CUDA / TensorRT).")] = PrecisionChoice.fp32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    channels: Annotated[int | None, typer.Option(min=1, help="Start channels for preset models (e.g. 8).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    isolate: Annotated[bool, typer.Option("--isolate/--no-isolate", help="Measure each row in a fresh process "
                                                                         "(true peak memory).")] = True,
) -> None:
    """Benchmark backends: latency median/p10/p90, pairs/s, peak memory, GFLOP/s.

    Example: eoir bench --model lumir --backend torch --backend onnx --shape 64 64 64 --json bench.json
    """
    from rich.table import Table

    from eoir_cli.backends import BackendError, backend_kind
    from eoir_cli.bench import BenchSpec, run_bench
    from eoir_cli.fileio import write_json_atomic
    from export.convert import model_for_backend

    notes = []
    models = list(model or [])
    backends = [b.value for b in backend or []]
    if not models:
        name, note = default_model()
        models = [name]
        if note:
            notes.append(note)
        backends = backends or ["torch", "onnx"]
    if shape is None:
        # The bundled model works on the LUMIR grid (it runs its network at a quarter of it).
        from eoir_cli.config import LUMIR_SHAPE

        shape = LUMIR_SHAPE if models == ["default"] else (64, 64, 64)
    overrides = {"channels": channels} if channels else {}
    specs = []
    for m in models:
        try:
            kinds = backends or [backend_kind(m)]
        except BackendError:
            kinds = ["torch"]  # the row will carry the suffix error
        for b in kinds:
            specs.append(BenchSpec(m, b, tuple(shape), precision.value, device, threads, runs, warmup,
                                   overrides=overrides))
    for n in notes:
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"measuring {len(specs)} row(s) at {tuple(shape)} voxels, {runs} runs + {warmup} warm-up each"
                  f"{' (each in a fresh process)' if isolate else ''}...")
    with console.status("benchmarking..."):
        report = run_bench(specs, isolate=isolate, prepare=model_for_backend,
                           on_result=lambda r: console.print(f"  {r['model']} {r['label']}: "
                                                             + (f"[red]{r['error']}[/]" if r["error"] else
                                                                f"{r['latency_s']['median']:.3f} s"),
                                                             highlight=False))
    report["notes"] = notes
    machine = report["machine"]
    table = Table(title=f"eoir bench: {machine['cpu']} ({machine['cpu_cores']} cores)"
                        + (f", {', '.join(machine['gpus'])}" if machine["gpus"] else ", no GPU"))
    for col in ("row", "device", "shape", "median s", "p10–p90 s", "pairs/s", "peak MB", "GFLOP/s",
                "matmul peak (share)"):
        table.add_column(col, justify="left" if col == "row" else "right")
    footnotes = []
    for i, r in enumerate(report["results"], 1):
        name = f"{i}. {Path(r['model']).name} {r['label']}"
        shape_text = "×".join(map(str, r["shape"]))
        if r["error"]:
            table.add_row(name, "-", shape_text, "[red]failed[/]", "-", "-", "-", "-", "-")
            footnotes.append(f"[red]{i}. {r['error']}[/]")
            continue
        lat = r["latency_s"]
        mem = f"{r['peak_rss_mb']:.0f}" + (f" (GPU {r['gpu_peak_mb']:.0f})" if r.get("gpu_peak_mb") else "")
        table.add_row(name, r["device"], shape_text, f"{lat['median']:.3f}", f"{lat['p10']:.3f}–{lat['p90']:.3f}",
                      f"{r['pairs_per_s']:.2f}", mem, f"{r['gflops_per_s']:.1f}" if r.get("gflops_per_s") else "-",
                      f"{r['peak_gflops_per_s']:.0f} ({100 * r['fraction_of_peak']:.0f}%)"
                      if r.get("peak_gflops_per_s") else "-")
        for text in (r.get("fallback_reason"), r.get("note")):
            if text:
                footnotes.append(f"{i}. {text}")
    console.print(table)
    peaks = machine.get("matmul_peak", {}).get("cpu")
    if peaks:
        console.print(f"matmul peak: {peaks['size']}² products on {peaks['threads']} thread(s), best of torch.mm "
                      f"and oneDNN: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s (CPU)", highlight=False)
    for line in footnotes:
        console.print(line, highlight=False)
    load = machine["load_average"][0]
    if load > (machine["cpu_cores"] or 1):
        console.print(f"[yellow]note:[/] load average {load:.1f} on {machine['cpu_cores']} cores: "
                      "other work was running; timings are pessimistic")
    if json_path is not None:
        write_json_atomic(json_path, report)
        console.print(f"wrote {json_path}")
