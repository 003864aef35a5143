"""``eoir test``: evaluate a model on a dataset's labelled validation pairs (and write submissions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from eoir_cli.commands.common import Device, cli_command, console
from eoir_cli.commands.train import DatasetName


@cli_command
def test_command(
    dataset: Annotated[DatasetName, typer.Option(help="Dataset layout of --data-dir.")],
    data_dir: Annotated[Path, typer.Option(help="Dataset root (read only).")],
    model: Annotated[str, typer.Option(help="Checkpoint (.pt/.pth/.safetensors, original EOIR too) or 'default'.")],
    out: Annotated[Path, typer.Option(help="Output directory for pairs.csv, summary.json, submission/.")] = Path(
        "runs/test"),
    save_disp: Annotated[bool, typer.Option(
        "--save-disp", help="Write disp_<fixed>_<moving>.nii.gz for the manifest's test pairs.")] = False,
    hd95: Annotated[bool, typer.Option("--hd95/--no-hd95", help="Compute HD95 (slowest metric).")] = True,
    device: Annotated[Device, typer.Option(help="Where to run the model.")] = Device.auto,
    labels: Annotated[str | None, typer.Option(help="Label values scored, e.g. 2,3,41 (default: the manifest's "
                                               "labels_eval, else the dataset's label table, else every "
                                               "non-zero label in either map).")] = None,
) -> None:
    """Evaluate Dice, HD95, NDV, %J<=0, SDlogJ (and TRE) on the validation pairs.

    Example: eoir test --dataset lumir --data-dir LUMIR --model runs/eoir/best.pt --save-disp --out runs/test
    """
    from rich.progress import Progress
    from rich.table import Table

    from eoir_cli.commands.register import parse_labels
    from eoir_cli.evaluate import evaluate

    with Progress(console=console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def callback(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        result = evaluate(model, dataset.value, data_dir, out, save_disp, device.value, hd95,
                          callback, labels=parse_labels(labels))
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
