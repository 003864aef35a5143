"""``eoir demo``: register two brains from the shared sample data and show what every stage did."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import Device, cli_command, console


class DemoPair(str, Enum):
    subjects = "subjects"
    template = "template"


def default_data_dir() -> Path:
    """``$EOIR_DATA``, else ``../shared/data`` beside the checkout (the package's grandparent)."""
    env = os.environ.get("EOIR_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


@cli_command
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("eoir_demo"),
    data_dir: Annotated[Path | None, typer.Option(help="Sample data root (default: $EOIR_DATA or "
                                                  "../shared/data beside the checkout).")] = None,
    pair: Annotated[DemoPair, typer.Option(help="subjects: SYNBRAIN_0001 -> SYNBRAIN_0002 with label maps "
                                           "(Dice); template: MNI152 T1 -> SYNBRAIN_0001.")] = DemoPair.subjects,
    model: Annotated[str, typer.Option(help="Model (default: the bundled brain model; an untrained one if "
                                       "this install has none).")] = "default",
    refine: Annotated[int | None, typer.Option(min=0, help="Refinement steps [default: 20, --fast: 10].")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="CI mode: network grid at 3 mm, fewer refinement "
                                       "steps, no HD95.")] = False,
    spacing: Annotated[float | None, typer.Option(min=0.5, help="Network voxel size in mm (overrides --fast).")] = None,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
) -> None:
    """Register a sample pair, print Dice before/after and per-stage timings, write outputs + qc.png.

    Example: eoir demo --fast -o eoir_demo
    """
    from rich.table import Table

    from eoir_cli.errors import EoirError
    from eoir_cli.register import register

    root = data_dir or default_data_dir()
    if not root.is_dir():
        raise EoirError(f"--data-dir {root}: no such folder (point --data-dir or $EOIR_DATA at the shared sample data)")
    brains = root / "brain_lumirlike"
    if pair == DemoPair.subjects:
        fixed, moving = brains / "imagesTr/SYNBRAIN_0002_0000.nii.gz", brains / "imagesTr/SYNBRAIN_0001_0000.nii.gz"
        fixed_seg, moving_seg = (brains / "labelsTr/SYNBRAIN_0002_0000.nii.gz",
                                 brains / "labelsTr/SYNBRAIN_0001_0000.nii.gz")
    else:
        fixed = brains / "imagesTr/SYNBRAIN_0001_0000.nii.gz"
        moving = root / "brain_template/MNI152_2009a_T1_lumirgrid.nii.gz"
        fixed_seg = moving_seg = None
    net: object = model
    if model == "default":
        from eoir_cli.weights import DEFAULT_WEIGHTS

        if not DEFAULT_WEIGHTS.is_file():
            from eoir_cli.checkpoint import load_model

            channels = 8 if fast else 32
            console.print(f"[yellow]note:[/] this install ships no trained model yet: using an untrained "
                          f"{channels}-channel network, so the result reflects the affine stage and --refine.")
            net = load_model("lumir", channels=channels)
    steps = refine if refine is not None else (10 if fast else 20)
    result = register(fixed, moving, out, model=net, device=device.value, moving_seg=moving_seg, fixed_seg=fixed_seg,
                      refine=steps, spacing=spacing or (3.0 if fast else None), hd95=not fast)
    m = result.metrics
    console.print(f"moving {moving.name} -> fixed {fixed.name}; network grid "
                  f"{'×'.join(map(str, m['network_grid']['shape']))} at {m['network_grid']['spacing_mm'][0]:g} mm")
    seg = m.get("segmentation")
    if seg:
        console.print(f"Dice (mean over {len(seg['labels'])} labels): before {seg['dice_before_mean']:.3f}, "
                      f"after {seg['dice_after_mean']:.3f}")
    console.print(f"field: NDV {m['field']['ndv_percent']:.4f}%, |J|<=0 {m['field']['jac_nonpos_percent']:.4f}%, "
                  f"SDlogJ {m['field']['sdlogj']:.3f}")
    table = Table(title="time per stage (s)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in m["timings_s"].items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)
    console.print(f"outputs in {out}/ (open {out / 'qc.png'})", highlight=False)
