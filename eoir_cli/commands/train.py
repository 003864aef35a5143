"""``eoir train``: train (or resume) an EOIR model; a thin skin over :func:`eoir_cli.train.train`."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from eoir_cli.commands.common import cli_command, console
from eoir_cli.config import LUMIR_SHAPE, TrainConfig
from eoir_cli.errors import InputError


class DatasetName(str, Enum):
    synth = "synth"
    lumir = "lumir"
    oasis = "oasis"
    abdomen = "abdomen"
    acdc = "acdc"
    pairs = "pairs"


class PresetName(str, Enum):
    lumir = "lumir"
    oasis = "oasis"
    abdomen = "abdomen"
    acdc = "acdc"


class Penalty(str, Enum):
    l1 = "l1"
    l2 = "l2"


def _default(name: str) -> str:
    """`` [default: X]`` for help text, X read from :class:`TrainConfig` (brackets escaped for rich)."""
    value = _TRAIN_DEFAULTS[name]
    shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    return f" \\[default: {shown}]"


_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


@cli_command(interrupted="the run folder keeps last.pt from the last --save-every step; continue with "
                         "`eoir train --resume RUN_DIR`")
def train_command(
    dataset: Annotated[DatasetName | None, typer.Option(
        help="Training data: synth needs no download." + _default("dataset"))] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Dataset root, or a pair list for pairs (synth: label maps) \\[default: synth: the shared sample "
             "data when present]")] = None,
    preset: Annotated[PresetName | None, typer.Option(help="Model preset." + _default("preset"))] = None,
    out: Annotated[Path | None, typer.Option(
        help="Run directory (checkpoints, metrics.csv, config.json)." + _default("out"))] = None,
    channels: Annotated[int | None, typer.Option(
        min=1, help="Start channels, overriding the preset (32 published, 8/16 ablations) \\[default: the "
                    "preset's]")] = None,
    input_scale: Annotated[float | None, typer.Option(
        min=0.01, max=1.0, help="Resample factor before the network (0.5 = half resolution) \\[default: the "
                                "preset's]")] = None,
    levels: Annotated[int | None, typer.Option(
        min=1, max=8, help="Pyramid levels \\[default: the preset's]")] = None,
    int_steps: Annotated[int | None, typer.Option(
        min=0, help="Scaling-and-squaring steps per level, 0 = none \\[default: the preset's]")] = None,
    shape: Annotated[tuple[int, int, int] | None, typer.Option(
        metavar="D H W", help="Image size fed to the model (synth: the generated size) \\[default: synth "
                              f"{' '.join(map(str, LUMIR_SHAPE))}, real data: native]")] = None,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Total optimisation steps, wins over --epochs \\[default: one epoch]")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (a synth epoch is 1000 pairs).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Pairs per step and per process." + _default("batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(
        min=0.0, help="Initial learning rate (Adam amsgrad, poly decay 0.9)." + _default("lr"))] = None,
    val_every: Annotated[int | None, typer.Option(
        min=0, help="Validate every N steps (0 = at the end)." + _default("val_every"))] = None,
    save_every: Annotated[int | None, typer.Option(
        min=0, help="Write last.pt every N steps." + _default("save_every"))] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights and of every sample." + _default("seed"))]
    = None,
    amp: Annotated[bool | None, typer.Option(
        "--amp/--no-amp", help="Mixed precision: fp16 on CUDA, bf16 on CPU (~1.8x faster steps on AVX512-BF16)."
                               + _default("amp"))] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N." + _default("device"))] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run: its last.pt or its run directory.")] = None,
    smooth_weight: Annotated[float | None, typer.Option(
        min=0.0, help="Weight of the velocity smoothness term." + _default("smooth_weight"))] = None,
    penalty: Annotated[Penalty | None, typer.Option(help="Smoothness penalty." + _default("penalty"))] = None,
    dice_weight: Annotated[float | None, typer.Option(
        min=0.0, help="Weight of the soft Dice term when labels exist." + _default("dice_weight"))] = None,
    windows: Annotated[list[int] | None, typer.Option(
        "--window", metavar="N",
        help="NCC window per level, repeatable \\[default: 9 for lumir, 9 5 3 otherwise]")] = None,
    real_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="synth: share of real-image pairs." + _default("real_fraction"))] = None,
    shapes_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="synth: share of random-shape pairs when label maps exist."
                               + _default("shapes_fraction"))] = None,
    val_pairs: Annotated[int | None, typer.Option(
        min=0, help="synth: seeded validation pairs; pairs without a split column: at most this many (and a "
                    "fifth) of the labelled pairs held out for validation." + _default("val_pairs"))] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Data-loader worker processes." + _default("num_workers"))] = None,
    holdout: Annotated[list[str] | None, typer.Option(
        help="synth: keep subjects whose file names contain this out of training and validate on their real "
             "pairs (repeatable).",
    )] = None,
    flip_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="synth: share of label-map pairs mirrored left-right." + _default("flip_fraction"),
    )] = None,
) -> None:
    """Train EOIR on a dataset (or synthetic pairs) and write checkpoints.

    Example: eoir train --dataset synth --shape 80 112 96 --channels 8 --steps 2000 --out runs/synth8
    """
    from eoir_cli.train import TrainConfig, load_resume_config, train

    given: dict[str, Any] = {
        "dataset": dataset.value if dataset else None, "data_dir": str(data_dir) if data_dir else None,
        "preset": preset.value if preset else None, "out": str(out) if out else None, "channels": channels,
        "input_scale": input_scale, "levels": levels, "int_steps": int_steps,
        "shape": tuple(shape) if shape else None, "steps": steps, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "val_every": val_every, "save_every": save_every, "seed": seed,
        "amp": amp, "device": device, "smooth_weight": smooth_weight, "penalty": penalty.value if penalty else None,
        "dice_weight": dice_weight, "windows": tuple(windows) if windows else None, "real_fraction": real_fraction,
        "shapes_fraction": shapes_fraction, "val_pairs": val_pairs, "num_workers": workers,
        "holdout": tuple(holdout) if holdout else None, "flip_fraction": flip_fraction,
    }
    given = {k: v for k, v in given.items() if v is not None}
    try:  # TrainConfig checks its fields ("expected ..., got ..."): here those are the user's values
        if resume is not None:
            base = load_resume_config(str(resume))
            config = base.replace(**given, resume=str(resume))
            if out is None:
                config = config.replace(out=str(resume if resume.is_dir() else resume.parent))
        else:
            config = TrainConfig(**given)
    except ValueError as err:
        raise InputError(str(err)) from None
    result = _run_with_progress(config, train)
    metric = f"best val {result.metric_name} {result.best_metric:.4f}" if result.best_metric is not None else ""
    console.print(f"[green]trained[/] {result.steps} steps -> {result.out} ({metric}); "
                  f"weights: {result.files.get('model.safetensors')}")


def make_train_progress(out_console: Any) -> Any:
    """The training bar. Step count, ETA and speed come first so that a narrow terminal (80 columns)
    cuts the loss terms, not them; the bar itself is short."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.table import Column
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            if not speed:
                return Text("-- s/it")
            return Text(f"{1 / speed:.1f} s/it" if speed < 1 else f"{speed:.1f} it/s")

    return Progress(TextColumn("[bold]train"), MofNCompleteColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    Speed(), BarColumn(bar_width=12),
                    TextColumn("{task.fields[terms]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                           ratio=1, min_width=0)),
                    console=out_console, transient=False, expand=True)


def train_terms_text(info: Any, last_val: str) -> str:
    """The loss terms shown after the bar: ``total ncc smooth [dice] lr [val_...]``."""
    t = info.terms
    text = " ".join(f"{k} {t[k]:.4f}" for k in ("total", "ncc", "smooth", "dice") if k in t and (k != "dice" or t[k]))
    return f"{text} lr {info.lr:.2e}{last_val}"


def _run_with_progress(config: Any, train: Any) -> Any:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return train(config)
    progress = make_train_progress(console)
    task: list[Any] = []  # the bar appears with the first step, never as an empty "0/?" before an error
    last_val = [""]

    def callback(info: Any) -> None:
        if info.val_metric is not None:
            last_val[0] = f" val_{info.val_name} {info.val_metric:.4f}"
        if not task:
            progress.start()
            task.append(progress.add_task("train", total=info.total_steps, terms=""))
        progress.update(task[0], total=info.total_steps, completed=info.step, terms=train_terms_text(info, last_val[0]))

    try:
        return train(config, callback)
    finally:
        if task:
            progress.stop()
