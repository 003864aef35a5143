"""``eoir export``: a checkpoint -> ONNX (gather or native GridSample sampler) [-> TensorRT engine]."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from eoir_cli.commands.common import cli_command, console, fail


class ExportSamplerChoice(str, Enum):
    gather = "gather"
    native = "native"


def _default_output(model: str) -> Path:
    return Path(Path(model).stem + ".onnx")


@cli_command(interrupted="no partial file was left (files are written atomically)")
def export_command(
    model: Annotated[str, typer.Argument(help="Checkpoint (.pt/.pth/.pth.tar/.safetensors, ours or the original EOIR "
                                              "code's), 'default' (bundled brain model), a preset name (random "
                                              "weights), or an .onnx written by eoir export (with --trt: build its "
                                              "engine).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output .onnx path (default: MODEL.onnx "
                                                                       "in the current directory).")] = None,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="D H W",
        help="Input size D H W in voxels (default: the grid the model file records, else 160 224 192).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Leave D, H, W symbolic (multiples of the pyramid "
                                                            "divisor); --shape is the example size.")] = False,
    sampler: Annotated[ExportSamplerChoice, typer.Option(
        help="gather: no GridSample node (TensorRT 10+, every onnxruntime); native: opset-20 GridSample "
             "(onnxruntime CPU, TensorRT >= 11.2).")] = ExportSamplerChoice.gather,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: 18 gather, 20 native).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 weights, activations and I/O (TensorRT 11 strongly "
                                                      "typed path; with --trt on TensorRT 10 the builder flag "
                                                      "is used on an fp32 ONNX instead).")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build OUT.engine (+ OUT.engine.json) with TensorRT; "
                                                    "needs tensorrt and a CUDA GPU. Without them the .onnx is still "
                                                    "written and the command to build the engine is printed.")]
    = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare onnxruntime with PyTorch on a "
                                                                      "smooth synthetic pair (fp32: within 100x "
                                                                      "PyTorch's own rounding spread, 1e-3 to "
                                                                      "0.1 voxels).")] = True,
    verify_with: Annotated[tuple[Path, Path] | None, typer.Option(
        "--verify-with", exists=True, dir_okay=False,
        help="Verify on this real pair MOVING FIXED (NIfTI; percentile-normalised, resampled to --shape) "
             "instead of synthetic volumes.")] = None,
    workspace: Annotated[float, typer.Option(help="TensorRT builder workspace limit in GB.")] = 4.0,
) -> None:
    """Export MODEL to ONNX, check it, verify it against PyTorch and report TensorRT compatibility.

    Example: eoir export default -o eoir.onnx --shape 160 224 192

    Engine on the GPU machine: eoir export eoir.onnx --trt
    """
    from rich.table import Table

    from eoir_cli.checkpoint import load_model
    from eoir_cli.errors import GpuUnavailableError
    from eoir_cli.fileio import model_suffix
    from export.onnx_export import torch2onnx

    from_onnx = model_suffix(model) == ".onnx"
    if from_onnx and not trt:
        raise fail(f"{model} is already an ONNX file: pass --trt to build a TensorRT engine from it")
    output = output or _default_output(model)
    onnx_fp16 = fp16
    no_trt = None  # why TensorRT cannot run here: the ONNX is still written, and the command to finish is printed
    if trt:
        from export.tensorrt import require_tensorrt, trt_major

        try:
            trt_mod = require_tensorrt()  # checked before any work
        except GpuUnavailableError as err:
            if from_onnx:
                raise
            no_trt = str(err)
        else:
            if fp16 and trt_major(trt_mod) < 11 and not from_onnx:
                onnx_fp16 = False  # TensorRT 10: fp32 ONNX + BuilderFlag.FP16
                console.print(f"TensorRT {trt_mod.__version__}: fp16 via BuilderFlag.FP16 on an fp32 ONNX")
    if from_onnx:
        from export.tensorrt import onnx2engine

        with console.status(f"building the TensorRT engine from {model}..."):
            engine = onnx2engine(model, fp16=fp16, workspace_gb=workspace)
        console.print(f"wrote {engine} (+ {engine.name}.json)", highlight=False)
        return
    net = load_model(model, device="cpu")
    info = getattr(net, "checkpoint_info", {}) or {}
    from eoir_cli.config import LUMIR_SHAPE
    from eoir_cli.deployment import deployment_of

    size = tuple(shape) if shape else tuple(deployment_of(info).grid or LUMIR_SHAPE)
    pair = None
    if verify and verify_with:
        from export.onnx_export import pair_from_files

        pair = pair_from_files(verify_with[0], verify_with[1], size, deployment_of(info).normalization)
    with console.status(f"exporting {model} at {size} ({sampler.value} sampler)..."):
        result = torch2onnx(net, output, shape=size, sampler=sampler.value, dynamic=dynamic, opset=opset,
                            fp16=onnx_fp16, verify=verify, verify_pair=pair)
    table = Table(title=f"eoir export: {output}", show_header=False)
    table.add_row("file", f"{output} ({result.size_bytes / 1e6:.2f} MB, {sum(result.ops.values())} nodes, "
                          f"exported in {result.seconds:.1f} s)")
    table.add_row("inputs", f"moving, fixed (1, 1, {'D, H, W' if dynamic else ', '.join(map(str, size))}) "
                            f"{'float16' if onnx_fp16 else 'float32'} in [0, 1]; output disp (1, 3, ...) voxels")
    table.add_row("sampler / opset", f"{sampler.value} / {result.metadata['opset']}")
    table.add_row("ops", ", ".join(f"{k}×{v}" for k, v in result.ops.items()))
    table.add_row("normalisation", result.metadata["normalization"])
    from eoir_cli.deployment import Deployment

    table.add_row("deployment", Deployment.from_dict(result.metadata["deployment"]).describe())
    if result.verify:
        v = result.verify
        table.add_row("verify", f"max |Δdisp| {v['max_abs']:.2e} voxels (≤ {v['tolerance_max']:.2g}), mean "
                                f"{v['mean_abs']:.2e} (≤ {v['tolerance_mean']:.2g}) (onnxruntime vs PyTorch, "
                                f"{v['pair']}, {tuple(v['shape'])}, |disp| ≤ {v['disp_max']:.2f}; PyTorch's own "
                                f"rounding spread {v['spread_max']:.1e})")
    else:
        table.add_row("verify", "skipped (--no-verify)")
    report = result.trt or {}
    table.add_row("TensorRT", f"{report.get('summary', '?')} [assumes {report.get('assumes', '?')}]")
    if trt and no_trt is None:
        from export.tensorrt import onnx2engine

        with console.status("building the TensorRT engine..."):
            engine = onnx2engine(output, fp16=fp16, workspace_gb=workspace)
        table.add_row("engine", f"{engine} (+ {engine.name}.json)")
    elif trt:
        table.add_row("engine", "[yellow]not built here[/] (see below)")
    console.print(table)
    if no_trt is not None:
        raise fail(f"{no_trt}. Wrote {output} only; build the engine where TensorRT and the GPU are: "
                   f"eoir export {output} --trt{' --fp16' if fp16 else ''}")
