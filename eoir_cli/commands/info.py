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
    """Show the bundled default model, presets (parameters, FLOPs per pair), library versions and devices.

    Example: eoir info --shape 160 224 192
    """
    from rich.table import Table

    from eoir_cli.info import default_model_info, devices, preset_table, versions

    rows, vers, devs, bundled = preset_table(shape), versions(), devices(), default_model_info()
    if as_json:
        console.print_json(json.dumps({"default_model": bundled, "presets": rows, "versions": vers, "devices": devs,
                                       "shape": shape}))
        return
    dt = Table(title="bundled default model (--model default, used by eoir register and eoir demo)", show_header=False)
    dt.add_column(style="bold")
    dt.add_column()
    if not bundled["present"]:
        dt.add_row("file", f"[red]missing[/]: {bundled['path']} (reinstall eoir, or pass --model)")
    else:
        check = ("[green]SHA-256 matches the record[/]" if bundled["sha256_ok"]
                 else "[red]SHA-256 differs from the record[/]")
        dt.add_row("file", f"{bundled['path']} ({bundled['bytes'] / 1e3:.0f} kB, {check})")
    cfg = bundled["model_config"] or {}
    dt.add_row("what", f"EOIR, {bundled['parameters']:,} parameters: {cfg.get('channels')} start channels, "
                       f"{cfg.get('levels')} levels, {cfg.get('int_steps')} squaring steps; {bundled['grid']}")
    t = bundled["trained"]
    dt.add_row("trained", f"{t['steps']} steps ({t['train_seconds'] / 60:.1f} min, seed {t['seed']}) at commit "
                          f"{t['commit']} on {t['machine']}")
    dt.add_row("data", bundled["data"] or "")
    d = bundled["dice"]
    if d.get("after_default_pipeline") is not None:
        dt.add_row("Dice", f"{d['before']:.3f} before -> {d['after_default_pipeline']:.3f} after the default pipeline, "
                           f"mean of {len(d['pairs'] or [])} brain pairs; held out: {bundled['held_out']}")
    dt.add_row("reproduce", bundled["command"] or "")
    console.print(dt, highlight=False)
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
