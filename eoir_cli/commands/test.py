"""``eoir test``: evaluate a model on a dataset's labelled validation pairs (and write submissions)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from eoir_cli.commands.common import Device, cli_command, console
from eoir_cli.commands.register import parse_labels


class EvalDataset(str, Enum):
    """Datasets with released validation pairs (``synth`` has none)."""

    lumir = "lumir"
    oasis = "oasis"
    abdomen = "abdomen"
    acdc = "acdc"
    pairs = "pairs"


@cli_command(interrupted="nothing was written (results are written when every pair is done)")
def test_command(
    dataset: Annotated[EvalDataset, typer.Option(help="Dataset layout of --data-dir.")],
    data_dir: Annotated[Path, typer.Option(help="Dataset root, or a pairs .json/.csv (read only; only the "
                                                "evaluated files must exist).")],
    model: Annotated[str, typer.Option(help="Checkpoint (.pt/.pth/.pth.tar/.safetensors, original EOIR too) or "
                                            "'default'.")],
    out: Annotated[Path, typer.Option(help="Output folder for pairs.csv, summary.json, submission/.")] = Path(
        "runs/test"),
    save_disp: Annotated[bool, typer.Option(
        "--save-disp", help="Write disp_<fixed>_<moving>.nii.gz for the manifest's test pairs.")] = False,
    hd95: Annotated[bool, typer.Option("--hd95/--no-hd95", help="Compute HD95 (slowest metric).")] = True,
    device: Annotated[Device, typer.Option(help="Where to run the model.")] = Device.auto,
    affine: Annotated[bool, typer.Option("--affine/--no-affine", help="Affine pre-alignment first, as eoir register "
                                         "does (off: the network alone, the challenge setting).")] = False,
    refine: Annotated[int, typer.Option(min=0, help="Instance-optimisation steps after the network, as eoir "
                                        "register does (0: none).")] = 0,
    labels: Annotated[str | None, typer.Option(help="Label values scored, e.g. 2,3,41 (default: the manifest's "
                                               "labels_eval, else the dataset's label table, else every "
                                               "non-zero label in either map).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the results of an earlier run in --out.")]
    = False,
) -> None:
    """Evaluate Dice, HD95, NDV, %J<=0, SDlogJ (and TRE) on the validation pairs.

    By default this evaluates the network alone on the dataset's grid (no affine, no refinement);
    eoir register and eoir demo run affine + network + refinement: add --affine --refine 5 for that.

    Example: eoir test --dataset lumir --data-dir LUMIR --model runs/eoir/best.pt --save-disp --out runs/test
    """
    from rich.progress import Progress
    from rich.table import Table

    from eoir_cli.evaluate import evaluate

    if affine or refine:
        console.print(f"evaluating the eoir register pipeline: {'affine + ' if affine else ''}network"
                      f"{f' + {refine} refinement steps' if refine else ''} (percentile intensities, the model's "
                      "network grid, metrics on the fixed grid)", highlight=False)
    else:
        console.print("evaluating the network alone on the dataset's grid (no affine, no refinement); eoir "
                      "register adds both: --affine --refine 5 evaluates that pipeline", highlight=False)
    progress = Progress(console=console, transient=True)
    tasks: dict[str, Any] = {}

    def callback(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()  # only once a pair is done: no empty bar before an early error
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    try:
        result = evaluate(model, dataset.value, data_dir, out, save_disp, device.value, hd95,
                          callback, affine=affine, refine=refine, labels=parse_labels(labels), overwrite=overwrite)
    finally:
        if tasks:
            progress.stop()
    if result.rows:
        table = Table(title=f"{dataset.value}: {len(result.rows)} validation pairs")
        columns = [k for k in result.rows[0] if k != "seconds"]
        for c in columns:
            table.add_column(c, justify="right")
        for row in [*result.rows, {"fixed": "mean", "moving": "", **result.summary}]:
            table.add_row(*[_fmt(row.get(c, "")) for c in columns])
        console.print(table)
    for name, path in result.files.items():
        console.print(f"wrote {name}: {path}")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
