"""``eoir apply``: move images and points through a saved registration (a thin skin over eoir_cli.apply)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import cli_command, console, fail


class InterpChoice(str, Enum):
    linear = "linear"
    nearest = "nearest"
    label = "label"


@cli_command
def apply_command(
    registration: Annotated[Path, typer.Argument(help="Folder written by eoir register, or one ITK displacement "
                                                 "field file (e.g. its warp_itk.nii.gz).")],
    image: Annotated[Path | None, typer.Argument(help="Image (.nii/.nii.gz) in the moving space (--inverse: the "
                                                 "fixed space), any grid.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output image (.nii.gz) or, with --points, "
                                             "CSV.")] = None,
    inverse: Annotated[bool, typer.Option("--inverse", help="Fixed space -> moving space (the folder's inverse field, "
                                          "else computed from the forward one on the moving grid).")] = False,
    interp: Annotated[InterpChoice, typer.Option(help="linear (images), nearest, or label (label-preserving: "
                                                 "argmax of per-label linear weights).")] = InterpChoice.linear,
    labels: Annotated[bool, typer.Option("--labels", help="IMAGE is a label map: same as --interp label.")] = False,
    points: Annotated[Path | None, typer.Option(help="Points CSV with columns R,A,S or L,P,S / x,y,z (LPS mm) "
                                                "or i,j,k (voxel indices).")] = None,
    reference: Annotated[Path | None, typer.Option(help="With i,j,k points: the image they index (default: the "
                                                   "registration's grid of the source space). With --inverse and "
                                                   "no saved inverse: the moving image (default: the one "
                                                   "metrics.json names).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Apply a saved registration: moving-space images/points -> fixed space (--inverse: the way back).

    Example: eoir apply out/ moving_seg.nii.gz -o seg_in_fixed.nii.gz --labels

    Points:  eoir apply out/ --points landmarks.csv -o landmarks_in_fixed.csv
    """
    if out is None:
        raise fail("expected -o OUTPUT (an image .nii.gz, or a .csv with --points)")
    if image is not None and points is not None:
        raise fail("give either IMAGE or --points CSV, not both")
    if out.exists() and not overwrite:
        raise fail(f"{out} exists; choose another -o or pass --overwrite")
    from eoir_cli.apply import apply_to_image, apply_to_points, open_transform

    transform = open_transform(registration)
    if points is not None:
        if out.suffix.lower() != ".csv":
            raise fail(f"-o {out}: expected a .csv for --points")
        from eoir_cli.fileio import write_text_atomic

        text = apply_to_points(transform, points, inverse=inverse, reference=reference)
        write_text_atomic(out, text)
        console.print(f"[green]mapped[/] {text.count(chr(10)) - 1} points -> {out}", highlight=False)
        return
    from eoir_cli.io import is_nifti_path, load_volume, save_volume

    if image is None:
        raise fail("expected IMAGE (or --points CSV); see eoir apply --help")
    if not is_nifti_path(out):
        raise fail(f"-o {out}: expected a .nii or .nii.gz image")
    mode = "label" if labels else interp.value
    target = reference
    if inverse and transform.inverse is None:
        target = reference or transform.moving_image()  # metrics.json read once, here
        if target is not None:
            target = load_volume(target, what="reference")  # a bad --reference fails before the message
            console.print("computing the inverse from the forward field (the registration was saved without "
                          "--inverse) ...", highlight=False)
    warped = apply_to_image(transform, image, inverse=inverse, interp=mode, reference=target)
    save_volume(out, warped.data, warped.affine, _scalar_header(warped.header), warped.data.dtype)
    console.print(f"[green]wrote[/] {out} ({'x'.join(map(str, warped.shape))}, {mode})", highlight=False)


def _scalar_header(header: object) -> object:
    """The field's header without its vector intent/shape, for a scalar image on the same grid."""
    if header is None:
        return None
    hdr = header.copy()  # type: ignore[attr-defined]
    hdr.set_intent("none", (), "")
    return hdr
