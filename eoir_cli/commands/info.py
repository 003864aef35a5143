"""``eoir info``: presets, parameter counts, FLOPs, versions and devices."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from eoir_cli.commands.common import cli_command, console
from eoir_cli.config import LUMIR_SHAPE


@cli_command
def info_command(
    shape: Annotated[tuple[int, int, int], typer.Option(
        metavar="D H W", help="D H W at which FLOPs are counted.")] = LUMIR_SHAPE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show presets (parameters, FLOPs per pair), library versions and available devices.

    Example: eoir info --shape 160 224 192
    """
    from rich.table import Table

    from eoir_cli.info import devices, preset_table, versions

    rows, vers, devs = preset_table(shape), versions(), devices()
    if as_json:
        console.print_json(json.dumps({"presets": rows, "versions": vers, "devices": devs, "shape": shape}))
        return
    table = Table(title=f"EOIR presets (FLOPs per pair at {'×'.join(map(str, shape))})")
    for col in ("preset", "parameters", "GFLOP", "configuration"):
        table.add_column(col, justify="right" if col in ("parameters", "GFLOP") else "left")
    for row in rows:
        gflops = f"{row['gflops']:.0f}" if row.get("gflops") is not None else "n/a (size)"
        table.add_row(row["preset"], f"{row['parameters']:,}", gflops, row["note"])
    console.print(table)
    vt = Table(title="versions")
    vt.add_column("package")
    vt.add_column("version")
    for name, ver in vers.items():
        vt.add_row(name, ver or "[dim]not installed[/]")
    console.print(vt)
    gpus = ", ".join(devs["gpus"]) or "none"
    console.print(f"devices: CPU {devs['cpu']} ({devs['cpu_cores']} cores); CUDA GPUs: {gpus}; "
                  f"onnxruntime providers: {', '.join(devs['onnxruntime_providers']) or 'none'}")
