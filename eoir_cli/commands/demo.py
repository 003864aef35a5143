"""``eoir demo``: register two brains from the shared sample data and show what every stage did."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import Device, cli_command, console
from eoir_cli.config import PIPELINE


class DemoPair(str, Enum):
    subjects = "subjects"
    template = "template"


SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"


def default_out_dir() -> Path:
    """Where ``eoir demo`` writes without ``-o``: ``$EOIR_CACHE`` or the user cache folder
    (``$XDG_CACHE_HOME/eoir/demo``, else ``~/.cache/eoir/demo``), never the working directory."""
    env = os.environ.get("EOIR_CACHE")
    if env:
        return Path(env) / "demo"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eoir" / "demo"


def default_data_dir() -> Path | None:
    """``$EOIR_DATA`` if set, else None (the sample pair shipped inside the package is used)."""
    env = os.environ.get("EOIR_DATA")
    return Path(env) if env else None


def demo_inputs(pair: DemoPair, data_dir: Path | None) -> tuple[Path, Path, Path | None, Path | None]:
    """(fixed, moving, fixed_seg, moving_seg) of the demo pair.

    Without ``data_dir`` the subjects pair shipped in ``eoir_cli/sample_data`` is used (no download);
    with it, the layout of the shared sample data (``brain_lumirlike/``, ``brain_template/``).
    """
    from eoir_cli.errors import EoirError

    if data_dir is None:
        if pair == DemoPair.template:
            raise EoirError("--pair template needs --data-dir (the MNI template is not shipped in the package)")
        return (SAMPLE_DIR / "SYNBRAIN_0002_image.nii.gz", SAMPLE_DIR / "SYNBRAIN_0001_image.nii.gz",
                SAMPLE_DIR / "SYNBRAIN_0002_labels.nii.gz", SAMPLE_DIR / "SYNBRAIN_0001_labels.nii.gz")
    if not data_dir.is_dir():
        raise EoirError(f"--data-dir {data_dir}: no such folder (point it at the shared sample data)")
    brains = data_dir / "brain_lumirlike"
    if pair == DemoPair.subjects:
        return (brains / "imagesTr/SYNBRAIN_0002_0000.nii.gz", brains / "imagesTr/SYNBRAIN_0001_0000.nii.gz",
                brains / "labelsTr/SYNBRAIN_0002_0000.nii.gz", brains / "labelsTr/SYNBRAIN_0001_0000.nii.gz")
    return (brains / "imagesTr/SYNBRAIN_0001_0000.nii.gz",
            data_dir / "brain_template/MNI152_2009a_T1_lumirgrid.nii.gz", None, None)


@cli_command
def demo_command(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: the user cache folder, "
                                                        "~/.cache/eoir/demo or $EOIR_CACHE/demo; printed).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Shared sample data root (default: $EOIR_DATA, else the "
                                                  "pair shipped in the package).")] = None,
    pair: Annotated[DemoPair, typer.Option(help="subjects: SYNBRAIN_0001 -> SYNBRAIN_0002 with label maps "
                                           "(Dice); template: MNI152 T1 -> SYNBRAIN_0001 (needs --data-dir).")]
    = DemoPair.subjects,
    model: Annotated[str, typer.Option(help="Model: the bundled brain model, a preset or a file.")] = "default",
    refine: Annotated[int | None, typer.Option(
        min=0, help=f"Refinement steps (default: the pipeline's, {PIPELINE.refine}).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="Skip HD95, the slowest metric (for CI).")] = False,
    spacing: Annotated[float | None, typer.Option(min=0.5, help="Network voxel size in mm (default: the "
                                                  "model's).")] = None,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace earlier results in -o DIR (the default "
                                            "cache folder is always replaced).")] = False,
) -> None:
    """Register a sample brain pair, print Dice before/after and per-stage timings, write outputs + qc.png.

    Example: eoir demo            (outputs in ~/.cache/eoir/demo)

    Example: eoir demo -o my_demo --fast
    """
    from rich.table import Table

    from eoir_cli.data.datasets import manifest_labels
    from eoir_cli.pipeline import register
    root = data_dir or default_data_dir()
    fixed, moving, fixed_seg, moving_seg = demo_inputs(pair, root)
    # The label rule of register and test: the data's manifest labels_eval.
    manifest = SAMPLE_DIR / "labels.json" if root is None else root / "brain_lumirlike" / "SYNBRAIN_dataset.json"
    labels = manifest_labels(manifest)
    if out is None:
        out, overwrite = default_out_dir(), True  # the demo's own cache folder
        console.print(f"writing to {out}/ (the user cache folder; -o DIR to choose)", highlight=False)
    result = register(fixed, moving, out, model=model, device=device.value, moving_seg=moving_seg,
                      fixed_seg=fixed_seg, refine=refine, spacing=spacing, hd95=not fast,
                      labels=labels, overwrite=overwrite)
    m = result.metrics
    console.print(f"moving {moving.name} -> fixed {fixed.name}; network grid "
                  f"{'×'.join(map(str, m['network_grid']['shape']))} at {m['network_grid']['spacing_mm'][0]:g} mm")
    seg = m.get("segmentation")
    if seg:
        console.print(f"Dice (mean over {len(seg['labels'])} labels): before {seg['dice_before_mean']:.3f}, "
                      f"after {seg['dice_after_mean']:.3f}")
    console.print(f"field (network grid): NDV {m['field']['ndv_percent']:.4f}%, "
                  f"|J|<=0 {m['field']['jac_nonpos_percent']:.4f}%, SDlogJ {m['field']['sdlogj']:.3f}")
    table = Table(title="time per stage (s)")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in m["timings_s"].items():
        table.add_row(stage, f"{seconds:.2f}")
    console.print(table)
    console.print(f"outputs in {out}/ (open {out / 'qc.png'})", highlight=False)
