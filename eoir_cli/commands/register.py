"""``eoir register``: one pair, or a batch from pairs.csv / dataset.json (a thin skin over eoir_cli.pipeline)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import Device, PrecisionChoice, cli_command, console, err_console, fail
from eoir_cli.config import PIPELINE
from eoir_cli.errors import InputError


class BackendChoice(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    tensorrt = "tensorrt"


def parse_window(text: str | None) -> tuple[float, float] | None:
    """``"-500,800"`` -> ``(-500.0, 800.0)``."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--window: expected LOW,HIGH (e.g. -500,800), got {text!r}") from None
    return lo, hi


def parse_labels(text: str | None) -> list[int] | None:
    """``"2,3,41"`` -> ``[2, 3, 41]``."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--labels: expected comma-separated integers (e.g. 2,3,41), got {text!r}") from None


@cli_command(interrupted="no partial output was left (outputs appear only when a pair is complete); a batch "
                         "keeps its finished pairs and resumes where it stopped when run again")
def register_command(
    fixed: Annotated[Path | None, typer.Argument(help="Fixed image (.nii/.nii.gz): outputs live on its grid.")] = None,
    moving: Annotated[Path | None, typer.Argument(help="Moving image (.nii/.nii.gz), any orientation/spacing.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("eoir_out"),
    pairs: Annotated[Path | None, typer.Option(help="Batch: pairs.csv (fixed,moving[,fixed_seg,moving_seg,name]) "
                                               "or a Learn2Reg dataset.json.")] = None,
    model: Annotated[str, typer.Option(help="'default', a preset name or a .pt/.pth/.safetensors/.onnx/.engine "
                                       "file.")] = "default",
    backend: Annotated[BackendChoice, typer.Option(help="Runtime (auto: by suffix).")] = BackendChoice.auto,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    moving_seg: Annotated[Path | None, typer.Option(help="Moving label map -> warped_seg.nii.gz.")] = None,
    fixed_seg: Annotated[Path | None, typer.Option(help="Fixed label map -> Dice/HD95 in metrics.json.")] = None,
    affine: Annotated[bool, typer.Option("--affine/--no-affine", help="Affine pre-alignment.")] = True,
    refine: Annotated[int, typer.Option(min=0, help="Instance-optimisation steps after the network "
                                        "(0 = network only).")] = PIPELINE.refine,
    refine_coarse: Annotated[int, typer.Option(min=0, help="Refinement steps at a quarter of the network grid "
                                               "before the --refine steps at half (large grids).")]
    = PIPELINE.refine_coarse,
    refine_sigma: Annotated[float, typer.Option(min=0.0, help="Gaussian (voxels of each refinement level, 0-8) the "
                                                "refinement's updates pass through; 0 = none.")]
    = PIPELINE.refine_sigma,
    precision: Annotated[PrecisionChoice, typer.Option(help="PyTorch precision.")] = PrecisionChoice.fp32,
    lumir: Annotated[bool, typer.Option("--lumir", help="Inputs on the LUMIR grid; also write "
                                        "disp_<fixed>_<moving>.nii.gz.")] = False,
    spacing: Annotated[float | None, typer.Option(min=0.01, help="Network voxel size in mm "
                                                  "(default: the one the model file records).")] = None,
    window: Annotated[str | None, typer.Option(help="Intensity window LOW,HIGH (CT in HU), e.g. --window=-500,800 "
                                               "(default: the normalisation the model file records).")] = None,
    fit_grid: Annotated[bool, typer.Option("--fit-grid", help="Size the network grid to the fixed image instead of "
                                           "the model's trained grid (when that grid does not cover it).")] = False,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Run even when the images are not of the "
                                                 "model's domain (e.g. CT given to a brain MRI model).")] = False,
    no_hd95: Annotated[bool, typer.Option("--no-hd95", help="Skip HD95 (faster with many labels).")] = False,
    labels: Annotated[str | None, typer.Option(help="Label values scored by Dice/HD95, e.g. 2,3,41 "
                                               "(default: a --pairs manifest's labels_eval, else every "
                                               "non-zero label in either map).")] = None,
    inverse: Annotated[bool | None, typer.Option("--inverse/--no-inverse", help="Also write the inverse transform "
                                                 "(inverse_*.nii.gz on the moving grid) and its inverse "
                                                 "consistency (off by default: ~2 s more per pair).")] = None,
    outputs: Annotated[str, typer.Option(help="Outputs to write, comma-separated: warped,disp,warp_itk,"
                                         "warped_seg,jacobian,inverse,qc; all (with the inverse), default "
                                         "(all but the inverse) or none (metrics.json always).")] = "default",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: $EOIR_THREADS, else "
                                                "$OMP_NUM_THREADS, else one per core this process may use).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Batch: pairs registered at once, each on one thread "
                                                "(default: one per thread up to 4 on a CPU, 1 on a GPU).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results already in -o (one pair), or "
                                            "register the finished pairs of a batch again (else skipped).")]
    = False,
) -> None:
    """Register MOVING to FIXED; write warped, disp, warp_itk, warped_seg, jacobian, metrics, qc.png (+ --inverse).

    Example: eoir register fixed.nii.gz moving.nii.gz -o out/ --moving-seg moving_seg.nii.gz --refine 20

    Batch:   eoir register --pairs data/LUMIR_dataset.json -o out/ --lumir
    """
    from eoir_cli.outputs import parse_outputs
    from eoir_cli.threads import configure_threads

    configure_threads(threads)  # before torch loads: the OpenMP waiting policy is read once
    chosen = parse_outputs(outputs)
    options = dict(affine=affine, refine=refine, refine_coarse=refine_coarse, refine_sigma=refine_sigma, lumir=lumir,
                   spacing=spacing, window=parse_window(window), hd95=not no_hd95, labels=parse_labels(labels),
                   fit_grid=fit_grid, allow_mismatch=allow_mismatch, inverse=inverse, outputs=chosen,
                   overwrite=overwrite)
    if workers is not None and pairs is None:
        raise fail("--workers applies to a batch (--pairs FILE)")
    if pairs is not None:
        if fixed is not None or moving is not None:
            raise fail("give either FIXED MOVING or --pairs, not both")
        if moving_seg is not None or fixed_seg is not None:
            raise fail("--moving-seg/--fixed-seg apply to one pair; put them in the pairs.csv columns instead")
        try:
            _run_batch(pairs, out, model, backend.value, device.value, precision.value, options, workers)
        except KeyboardInterrupt:
            raise _interrupted(f"finished pairs in {out}/ are kept (each has its metrics.json), the pairs in "
                               "progress left nothing; run the same command to resume") from None
        return
    if fixed is None or moving is None:
        raise fail("expected FIXED and MOVING images (or --pairs FILE); see eoir register --help")
    from eoir_cli.pipeline import DomainMismatch, register

    def show_stage(stage: str, seconds: float) -> None:
        console.print(f"  {stage:<10} {seconds:6.2f} s", highlight=False)

    try:
        result = register(fixed, moving, out, model=model, backend=backend.value, device=device.value,
                          moving_seg=moving_seg, fixed_seg=fixed_seg, precision=precision.value,
                          progress=show_stage, **options)
    except DomainMismatch as err:
        raise fail(f"{err}; --allow-mismatch runs it anyway") from None
    except KeyboardInterrupt:
        raise _interrupted(f"nothing was written to {out}/ (outputs appear only when a pair has finished); "
                           "files already there are untouched") from None
    m = result.metrics
    line = (f"[green]done[/] in {m['timings_s']['total']:.1f} s ({m['backend']} on {m['device']}): "
            f"NDV {m['field']['ndv_percent']:.4f}%, |J|<=0 {m['field']['jac_nonpos_percent']:.4f}% (network grid)")
    seg = m.get("segmentation")
    if seg:
        line += f", Dice {seg['dice_before_mean']:.3f} -> {seg['dice_after_mean']:.3f}"
    console.print(line + f"\noutputs in {out}/: " + ", ".join(sorted(result.paths)), highlight=False)


def _interrupted(what: str) -> typer.Exit:
    """One line on Ctrl-C saying what was kept; exit code 130 (the shell's code for SIGINT)."""
    err_console.print(f"[yellow]interrupted:[/] {what}", highlight=False, soft_wrap=True)
    return typer.Exit(130)


def _run_batch(pairs_file: Path, out: Path, model: str, backend: str, device: str, precision: str,
               options: dict, workers: int | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from eoir_cli.batch import read_pair_list, register_pairs
    from eoir_cli.data.datasets import manifest_labels

    jobs = read_pair_list(pairs_file)
    if options.get("labels") is None:
        options = {**options, "labels": manifest_labels(pairs_file)}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("registering", total=len(jobs))

        def progress(done: int, total: int, outcome: object) -> None:
            bar.update(task, completed=done, description=f"{getattr(outcome, 'name', '')} "
                                                         f"{getattr(outcome, 'status', '')}")

        outcomes = register_pairs(jobs, out, model=model, backend=backend, device=device, precision=precision,
                                  progress=progress, workers=workers, **options)
    table = Table(title=f"eoir register: {len(outcomes)} pairs -> {out}")
    for col in ("pair", "status", "seconds", "Dice before", "Dice after", "NDV %"):
        table.add_column(col, justify="left" if col in ("pair", "status") else "right")

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for o in outcomes:
        status = {"done": "[green]done[/]", "skipped": "[cyan]skipped[/]"}.get(o.status, f"[red]failed[/]: {o.error}")
        table.add_row(o.name, status, fmt(o.seconds, ".1f"), fmt(o.dice_before, ".3f"), fmt(o.dice_after, ".3f"),
                      fmt(o.ndv_percent, ".4f"))
    console.print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise fail(f"{len(failed)} of {len(outcomes)} pairs failed (see the table; summary in {out}/summary.csv)")
