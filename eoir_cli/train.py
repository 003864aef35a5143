"""Training EOIR: one function, :func:`train`, driven by one frozen :class:`~eoir_cli.config.TrainConfig`
(defined beside ``ModelConfig`` in :mod:`eoir_cli.config`; ``from eoir_cli.train import TrainConfig``
keeps working).

Objective (``eoir_cli.losses.deep_supervision_loss``): local NCC + velocity smoothness (+ soft Dice
when the dataset has labels) summed over the pyramid levels with weights 1/2^i, computed at
network scale (the images are resampled by the model's ``input_scale`` first). Adam (amsgrad) with
polynomial learning-rate decay (power 0.9) over the total number of steps, batch size 1 by default.

Reproducibility: sample ``i`` of every dataset is a pure function of ``(seed, i)`` and step ``s``
uses samples ``(s * world_size + rank) * batch_size + b``, so a run resumed from ``last.pt``
(weights, optimizer, scheduler, AMP scaler, step, RNG states) reproduces the uninterrupted run's
losses exactly, without any data-loader state.

Every checkpoint records the run's deployment facts (:mod:`eoir_cli.deployment`: spacing, grid,
intensity normalisation spec, domain) so the model is later run the way it was trained.

Outputs in ``out``: ``config.json`` (resolved config, written at start), ``metrics.csv``,
``last.pt`` (every ``save_every`` steps), ``best.pt`` (best validation Dice, or NCC without
labels), ``model.safetensors`` (final weights only) and TensorBoard events when installed.

Multi-GPU / multi-node: launch the CLI module with ``torchrun`` (``torchrun --nproc_per_node N -m
eoir_cli.cli train ...``; ``RANK``/``WORLD_SIZE`` set) and training runs under DistributedDataParallel
(NCCL on CUDA, gloo on CPU); rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eoir_cli.config import TrainConfig
from eoir_cli.deployment import Deployment, training_deployment
from eoir_cli.errors import EoirError
from eoir_cli.fileio import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)



# Fields a resumed run may change; everything else must match the stored run.
RESUMABLE_OVERRIDES = frozenset({"resume", "device", "num_workers", "steps", "epochs", "val_every", "save_every",
                                 "log_every", "out"})


@dataclass
class StepInfo:
    """What the progress callback receives after every step (and after validations)."""

    step: int
    total_steps: int
    terms: dict[str, float]
    lr: float
    val_metric: float | None = None
    val_name: str | None = None


@dataclass
class TrainResult:
    """Summary of a finished run."""

    out: Path
    steps: int
    final_terms: dict[str, float]
    best_metric: float | None
    metric_name: str
    files: dict[str, Path] = field(default_factory=dict)


class _Pyramid(nn.Module):
    """Wraps EOIR so DistributedDataParallel sees ``forward_pyramid`` as the forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out = self.model.forward_pyramid(moving, fixed)
        return out.velocities, out.disps


@dataclass
class _Pyr:
    velocities: list[torch.Tensor]
    disps: list[torch.Tensor]


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def poly_lr_lambda(total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """Multiplier ``(1 - step / total) ** power`` for ``LambdaLR`` (floored at 0)."""

    def fn(step: int) -> float:
        return max(0.0, 1.0 - step / max(total_steps, 1)) ** power

    return fn


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors/plain lists (loadable with ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def total_steps(config: TrainConfig, epoch_length: int, world: int = 1) -> int:
    """``steps`` when given, else ``epochs`` × steps per epoch (default 1 epoch)."""
    if config.steps is not None:
        return config.steps
    per_epoch = max(1, math.ceil(epoch_length / (config.batch_size * world)))
    return (config.epochs or 1) * per_epoch


def _find_resume(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise EoirError(f"--resume {path}: expected a last.pt file or a run directory holding one, got no such file")
    return p


def load_resume_config(path: str) -> TrainConfig:
    """The training config stored in a checkpoint written by :func:`train`."""
    p = _find_resume(path)
    data = _load_checkpoint(p)
    raw = data.get("train_config")
    if not isinstance(raw, dict):
        raise EoirError(f"--resume {p}: expected a checkpoint written by eoir train (with a train_config), got none")
    return TrainConfig.from_dict(raw)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        raise EoirError(f"--resume {path}: not a readable checkpoint ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    if not isinstance(data, dict) or data.get("format") != "eoir" or "optimizer" not in data:
        raise EoirError(f"--resume {path}: expected a training checkpoint (last.pt/best.pt) written by eoir train")
    return data


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    return [r for r in rows if int(float(r["step"])) <= upto]


def _write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _downsample(batch: dict[str, torch.Tensor], net_size: tuple[int, int, int], num_classes: int,
                use_dice: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    from eoir_cli.spatial import resize

    moving, fixed = batch["moving"], batch["fixed"]
    if tuple(moving.shape[2:]) != net_size:
        moving, fixed = resize(moving, size=net_size), resize(fixed, size=net_size)
    if not use_dice:
        return moving, fixed, None, None
    onehots = []
    valid = batch["has_labels"].to(moving.dtype).view(-1, 1, 1, 1, 1)
    for key in ("moving_labels", "fixed_labels"):
        labels = batch[key][:, None].float()
        if tuple(labels.shape[2:]) != net_size:
            labels = resize(labels, size=net_size, mode="nearest")
        onehot = torch.nn.functional.one_hot(labels[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).float()
        # Pairs without labels get all-zero one-hots: their Dice is the constant eps/eps, no gradient.
        onehots.append(onehot * valid)
    # Only classes present in this batch: absent ones would add a constant Dice of 1 and dilute
    # the term by a factor that depends on the label table (16 shape classes vs ~50 brain labels).
    present = (onehots[0].sum(dim=(0, 2, 3, 4)) + onehots[1].sum(dim=(0, 2, 3, 4))) > 0
    if not bool(present.any()):
        return moving, fixed, None, None
    return moving, fixed, onehots[0][:, present], onehots[1][:, present]


def validate(model: nn.Module, pairs: Sequence[dict[str, torch.Tensor]], device: torch.device,
             windows: Sequence[int]) -> tuple[float, str]:
    """Mean foreground Dice over labelled pairs (``"dice"``), else mean local NCC (``"ncc"``).

    Runs ``model`` (an EOIR) in eval mode on full-size inputs (padded when needed).
    """
    from eoir_cli.inference import predict_disp
    from eoir_cli.losses import ncc_loss
    from eoir_cli.metrics import mean_dice
    from eoir_cli.spatial import warp

    was_training = model.training
    model.eval()
    dices: list[float] = []
    nccs: list[float] = []
    with torch.no_grad():
        for pair in pairs:
            moving = pair["moving"][None].to(device)
            fixed = pair["fixed"][None].to(device)
            disp = predict_disp(model, moving, fixed)
            if "moving_labels" in pair and bool(pair.get("has_labels", torch.tensor(True))):
                warped = warp(pair["moving_labels"][None, None].float().to(device), disp, mode="nearest")[0, 0]
                dices.append(mean_dice(warped.long().cpu().numpy(), pair["fixed_labels"].numpy()))
            else:
                nccs.append(-float(ncc_loss(warp(moving, disp), fixed, windows[0])))
    model.train(was_training)
    if dices:
        return float(np.mean(dices)), "dice"
    return float(np.mean(nccs)) if nccs else float("nan"), "ncc"


def train(config: TrainConfig, callback: Callable[[StepInfo], None] | None = None) -> TrainResult:
    """Train (or resume training) an EOIR model; see the module docstring for outputs.

    Args:
        config: the run; with ``config.resume`` the stored run continues (fields outside
            :data:`RESUMABLE_OVERRIDES` must match the stored ones).
        callback: called on rank 0 after every step (progress display); exceptions propagate,
            so a callback can stop the run (``last.pt`` then holds the last saved step).

    Returns:
        :class:`TrainResult` with the files written.

    Raises:
        EoirError: bad data, output directory in use, incompatible resume, missing GPU.
    """
    import torch.distributed as dist

    from eoir_cli.data.datasets import build_training_data
    from eoir_cli.losses import deep_supervision_loss
    from eoir_cli.model import EOIR

    rank, world, local_rank = _dist_env()
    from eoir_cli.devices import resolve_device

    device = torch.device(resolve_device(config.device, local_rank if world > 1 else None))
    if config.amp and device.type != "cuda":
        raise EoirError("--amp: mixed precision needs a CUDA device, got --device " + str(device))
    resume_data: dict[str, Any] | None = None
    if config.resume:
        resume_path = _find_resume(config.resume)
        resume_data = _load_checkpoint(resume_path)
        stored = TrainConfig.from_dict(resume_data["train_config"])
        diff = [k for k in config.to_dict() if k not in RESUMABLE_OVERRIDES
                and config.to_dict()[k] != stored.to_dict()[k]]
        if diff:
            raise EoirError(f"--resume {resume_path}: options {diff} differ from the stored run "
                            f"({ {k: stored.to_dict()[k] for k in diff} }); only {sorted(RESUMABLE_OVERRIDES)} "
                            "may change")
    out = Path(config.out)
    if rank == 0 and not config.resume and (out / "last.pt").exists():
        raise EoirError(f"--out {out}: already holds a run (last.pt); pass --resume {out} or choose another --out")

    initialised_here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        initialised_here = True
    if device.type == "cuda":
        torch.cuda.set_device(device)

    try:
        return _train(config, callback, device, rank, world, resume_data, build_training_data,
                      deep_supervision_loss, EOIR)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, callback: Callable[[StepInfo], None] | None, device: torch.device, rank: int,
           world: int, resume_data: dict[str, Any] | None, build_training_data: Any, deep_supervision_loss: Any,
           eoir_cls: Any) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel

    out = Path(config.out)
    model_config = config.model_config()
    data = build_training_data(config)
    shape = data.shape
    net_size = tuple(int(round(s * model_config.input_scale)) for s in shape) if shape else None
    if net_size is not None:
        from eoir_cli.spatial import check_size

        if any(abs(s * model_config.input_scale - n) > 1e-6 for s, n in zip(shape, net_size, strict=True)):
            raise EoirError(f"--shape {shape}: expected sizes that --input-scale {model_config.input_scale} "
                            "maps to whole numbers")
        check_size(net_size, model_config.size_multiple(), "network input (--shape x --input-scale)")
    use_dice = data.num_classes > 0 and config.dice_weight > 0
    steps_total = total_steps(config, data.epoch_length, world)

    torch.manual_seed(config.seed)
    model = eoir_cls(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(steps_total))
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp)
    start_step, best, elapsed0 = 0, None, 0.0
    rows: list[dict[str, Any]] = []
    if resume_data is not None:
        model.load_state_dict(resume_data["model"])
        optimizer.load_state_dict(resume_data["optimizer"])
        scheduler.load_state_dict(resume_data["scheduler"])
        if resume_data.get("scaler"):
            scaler.load_state_dict(resume_data["scaler"])
        start_step = int(resume_data["step"])
        best = resume_data.get("best_metric")
        elapsed0 = float(resume_data.get("elapsed_s", 0.0))
        set_rng_state(resume_data["rng"])
        rows = _read_metrics(out / "metrics.csv", start_step)
        # A longer --steps on resume stretches the decay; the stored lambda has no state to fix.
        scheduler.lr_lambdas[0] = poly_lr_lambda(steps_total)
        log.info("resumed %s at step %d", config.resume, start_step)

    # What the checkpoints tell `eoir register` / `eoir export` about running this model.
    facts = training_deployment(config.dataset, shape if config.dataset == "synth" else config.shape)
    metric_name = "dice" if any(bool(p.get("has_labels", False)) and "moving_labels" in p for p in data.val) \
        else "ncc"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", {
            "train": config.to_dict(), "model": model_config.to_dict(), "total_steps": steps_total,
            "world_size": world, "dataset": {"name": config.dataset, "shape": list(shape) if shape else None,
                                             "num_classes": data.num_classes, "epoch_length": data.epoch_length,
                                             "val_pairs": len(data.val)},
            "normalization": facts.normalization.describe(), "deployment": facts.to_dict(),
        })
    writer = _tensorboard(out) if rank == 0 else None

    wrapped: nn.Module = _Pyramid(model)
    if world > 1:
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    wrapped.train()

    indices = [(s * world + rank) * config.batch_size + b for s in range(start_step, steps_total)
               for b in range(config.batch_size)]
    loader = torch.utils.data.DataLoader(data.train, batch_size=config.batch_size, sampler=indices,
                                         num_workers=config.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    files: dict[str, Path] = {}
    terms: dict[str, float] = {}
    t0 = time.perf_counter()

    def save(name: str, step: int) -> None:
        files[name] = _save_training_checkpoint(out / name, model, optimizer, scheduler, scaler, step, best,
                                                config, elapsed0 + time.perf_counter() - t0, facts)

    windows = config.loss_windows()
    step = start_step
    for step, batch in enumerate(loader, start=start_step + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        size = net_size or tuple(batch["moving"].shape[2:])
        moving, fixed, moving_oh, fixed_oh = _downsample(batch, size, data.num_classes, use_dice)
        with torch.autocast(device.type, dtype=torch.float16, enabled=config.amp):
            velocities, disps = wrapped(moving, fixed)
        output = _Pyr([v.float() for v in velocities], [d.float() for d in disps])
        loss, terms = deep_supervision_loss(
            output, moving, fixed, moving_oh, fixed_oh, windows=windows, smooth_weight=config.smooth_weight,
            penalty=config.penalty, dice_weight=config.dice_weight, level_factors=model_config.level_factors)
        if not math.isfinite(float(loss.detach())):
            raise EoirError(f"step {step}: the loss is {float(loss.detach())} (diverged); lower --lr or use --amp off")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if rank != 0:
            continue
        row = {"step": step, **{k: round(v, 7) for k, v in terms.items()}, "lr": lr,
               "time_s": round(elapsed0 + time.perf_counter() - t0, 3)}
        info = StepInfo(step, steps_total, terms, lr)
        last = step == steps_total
        if (config.val_every and step % config.val_every == 0) or last:
            metric, metric_name = validate(model, data.val, device, windows)
            row[f"val_{metric_name}"] = metric
            info.val_metric, info.val_name = metric, metric_name
            if writer is not None:
                writer.add_scalar(f"val/{metric_name}", metric, step)
            if best is None or (math.isfinite(metric) and metric > best):
                best = metric
                save("best.pt", step)
        rows.append(row)
        if writer is not None:
            for k, v in terms.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/lr", lr, step)
        if (config.save_every and step % config.save_every == 0) or last:
            save("last.pt", step)
        if step % max(config.log_every, 1) == 0 or last or (config.save_every and step % config.save_every == 0):
            _write_metrics(out / "metrics.csv", rows)
        if callback is not None:
            callback(info)

    if rank == 0:
        _write_metrics(out / "metrics.csv", rows)
        if "last.pt" not in files and (out / "last.pt").exists():
            files["last.pt"] = out / "last.pt"
        if (out / "best.pt").exists():
            files["best.pt"] = out / "best.pt"
        from eoir_cli.checkpoint import save_checkpoint

        files["model.safetensors"] = save_checkpoint(out / "model.safetensors", model, extra={
            "normalization": facts.normalization.describe(), "deployment": facts.to_dict(),
            "train_step": step, "dataset": config.dataset,
            "best_metric": best, "metric": metric_name})
        files["metrics.csv"] = out / "metrics.csv"
        files["config.json"] = out / "config.json"
        if writer is not None:
            writer.close()
    return TrainResult(out, step, terms, best, metric_name, files)


def _save_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                              scaler: Any, step: int, best: float | None, config: TrainConfig,
                              elapsed: float, facts: Deployment) -> Path:
    from eoir_cli.checkpoint import save_checkpoint

    return save_checkpoint(path, model, extra={  # type: ignore[arg-type]
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "step": step,
        "best_metric": best,
        "elapsed_s": elapsed,
        "rng": rng_state(),
        "train_config": config.to_dict(),
        "normalization": facts.normalization.describe(),
        "deployment": facts.to_dict(),
    })


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(log_dir=str(out / "tensorboard"))
    except Exception as err:  # a broken tensorboard install must not stop training
        log.warning("tensorboard disabled: %s", err)
        return None
