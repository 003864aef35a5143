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


def poly_lr_lambda(total_steps: int, power: float = 0.9, start: int = 0, factor: float = 1.0) -> Callable[[int], float]:
    """Learning-rate multiplier for ``LambdaLR``: polynomial decay from ``factor`` at ``start`` to 0 at ``total_steps``.

    ``factor * ((total - step) / (total - start)) ** power`` (floored at 0); with the defaults this is
    the usual ``(1 - step / total) ** power``. A resumed run that changes ``--steps`` continues from the
    multiplier it had reached (``start``, ``factor``), so the rate never jumps.
    """
    span = max(total_steps - start, 1)

    def fn(step: int) -> float:
        return factor * max(0.0, (total_steps - step) / span) ** power

    return fn


def resumed_schedule(stored: dict[str, float], step: int, total: int) -> dict[str, float]:
    """The decay segment a run resumed at ``step`` with ``total`` steps follows.

    Same total: the stored segment (the resumed run reproduces the uninterrupted one exactly).
    Another total: a new segment that starts at ``step`` with the multiplier the stored one had reached
    there and decays to 0 at ``total``. A finished run (multiplier 0) restarts at the multiplier the
    longer schedule would have had at ``step``, said in the log.

    Raises:
        EoirError: ``total`` not above ``step``.
    """
    if total <= step:
        raise EoirError(f"--steps {total}: expected more than the {step} steps this run has done")
    if int(stored["end"]) == total:
        return stored
    reached = poly_lr_lambda(int(stored["end"]), start=int(stored["start"]), factor=float(stored["factor"]))(step)
    if reached <= 0.0:
        reached = poly_lr_lambda(total)(step)
        log.warning("the stored run had finished its decay (learning rate 0); restarting at %.3g x --lr for the "
                    "remaining %d steps", reached, total - step)
    return {"start": step, "factor": reached, "end": total}


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
             windows: Sequence[int]) -> dict[str, float]:
    """Validation metrics of ``model`` (an EOIR, fp32, eval mode) on full-size pairs.

    Returns:
        ``ncc`` (mean local NCC of warped and fixed, window ``windows[0]``), ``ndv`` (mean
        non-diffeomorphic volume, percent) and, when pairs carry labels, ``dice`` (mean foreground
        Dice of the nearest-warped moving labels).
    """
    from eoir_cli.inference import predict_disp
    from eoir_cli.losses import ncc_loss
    from eoir_cli.metrics import mean_dice, ndv
    from eoir_cli.spatial import warp

    was_training = model.training
    model.eval()
    dices: list[float] = []
    nccs: list[float] = []
    ndvs: list[float] = []
    with torch.no_grad():
        for pair in pairs:
            moving = pair["moving"][None].to(device)
            fixed = pair["fixed"][None].to(device)
            disp = predict_disp(model, moving, fixed)
            nccs.append(-float(ncc_loss(warp(moving, disp), fixed, windows[0])))
            ndvs.append(ndv(disp[0].cpu().numpy()))
            if "moving_labels" in pair and bool(pair.get("has_labels", torch.tensor(True))):
                warped = warp(pair["moving_labels"][None, None].float().to(device), disp, mode="nearest")[0, 0]
                dices.append(mean_dice(warped.long().cpu().numpy(), pair["fixed_labels"].numpy()))
    model.train(was_training)
    out = {"ncc": float(np.mean(nccs)) if nccs else float("nan"), "ndv": float(np.mean(ndvs)) if ndvs else 0.0}
    if dices:
        out["dice"] = float(np.mean(dices))
    return out


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
    if config.amp and device.type == "cpu" and net_size is not None:
        coarsest = tuple(n // m for n, m in zip(net_size, model_config.size_multiple(), strict=True))
        # oneDNN (torch 2.13) returns garbage weight gradients (~1e35) for bf16 convolutions on a 2^3
        # input; 3^3 and larger are exact and bit-reproducible.
        if min(coarsest) < 3:
            raise EoirError(f"--amp on CPU: expected the coarsest pyramid level to be >= 3 voxels per axis, got "
                            f"{coarsest} (use fewer --levels or a larger --shape, or --no-amp)")
    use_dice = data.num_classes > 0 and config.dice_weight > 0
    steps_total = total_steps(config, data.epoch_length, world)

    torch.manual_seed(config.seed)
    model = eoir_cls(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, amsgrad=True)
    schedule = {"start": 0, "factor": 1.0, "end": steps_total}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(steps_total))
    # fp16 needs loss scaling; bf16 (CPU) has fp32's exponent range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
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
        stored = resume_data.get("schedule") or {"start": 0, "factor": 1.0,
                                                 "end": total_steps(TrainConfig.from_dict(resume_data["train_config"]),
                                                                    data.epoch_length, world)}
        schedule = resumed_schedule(stored, start_step, steps_total)
        scheduler.lr_lambdas[0] = poly_lr_lambda(int(schedule["end"]), start=int(schedule["start"]),
                                                 factor=float(schedule["factor"]))
        # The optimizer holds the rate the stored lambda chose for the next step: recompute it.
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
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
                                                config, elapsed0 + time.perf_counter() - t0, facts, schedule)

    windows = config.loss_windows()
    step = start_step
    for step, batch in enumerate(loader, start=start_step + 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        size = net_size or tuple(batch["moving"].shape[2:])
        moving, fixed, moving_oh, fixed_oh = _downsample(batch, size, data.num_classes, use_dice)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp):
            velocities, disps = wrapped(moving, fixed)
        output = _Pyr([v.float() for v in velocities], [d.float() for d in disps])
        loss, terms = deep_supervision_loss(
            output, moving, fixed, moving_oh, fixed_oh, windows=windows, smooth_weight=config.smooth_weight,
            penalty=config.penalty, dice_weight=config.dice_weight, level_factors=model_config.level_factors)
        if not math.isfinite(float(loss.detach())):
            raise EoirError(f"step {step}: the loss is {float(loss.detach())} (diverged); lower --lr or use --no-amp")
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
            metrics = validate(model, data.val, device, windows)
            metric_name = "dice" if "dice" in metrics else "ncc"
            metric = metrics[metric_name]
            row.update({f"val_{k}": round(v, 6) for k, v in metrics.items()})
            info.val_metric, info.val_name = metric, metric_name
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"val/{k}", v, step)
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
        if info.val_metric is not None:
            _write_curves(out / "curves.png", rows)
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
        if (out / "curves.png").exists():
            files["curves.png"] = out / "curves.png"
        files["config.json"] = out / "config.json"
        if writer is not None:
            writer.close()
    return TrainResult(out, step, terms, best, metric_name, files)


def _save_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                              scaler: Any, step: int, best: float | None, config: TrainConfig,
                              elapsed: float, facts: Deployment, schedule: dict[str, float]) -> Path:
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
        "schedule": schedule,
    })


def _write_curves(path: Path, rows: Sequence[dict[str, Any]]) -> Path | None:
    """Draw the learning curves of ``metrics.csv`` rows as a PNG (atomically); None without matplotlib.

    Panels: training loss (raw and a 50-step running mean) and learning rate against step; validation
    Dice (or NCC) against step and against wall time; validation NCC and NDV against step.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    from eoir_cli.fileio import atomic_path

    def series(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        picked = [r for r in rows if r.get(key) not in (None, "")]
        return (np.array([float(r["step"]) for r in picked]), np.array([float(r["time_s"]) for r in picked]) / 3600,
                np.array([float(r[key]) for r in picked]))

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    step, _, loss = series("total")
    ax = axes[0, 0]
    if loss.size:
        ax.plot(step, loss, color="0.8", lw=0.6, label="loss")
        window = min(50, loss.size)
        ax.plot(step[window - 1:], np.convolve(loss, np.ones(window) / window, mode="valid"), color="C0",
                label=f"{window}-step mean")
        ax.legend(loc="upper right")
    ax.set(title="training loss", xlabel="step")
    ax2 = ax.twinx()
    lr_step, _, lr = series("lr")
    ax2.plot(lr_step, lr, color="C3", lw=0.8)
    ax2.set_ylabel("learning rate", color="C3")
    key = "val_dice" if any(r.get("val_dice") not in (None, "") for r in rows) else "val_ncc"
    vstep, vtime, value = series(key)
    for ax, x, label in ((axes[0, 1], vstep, "step"), (axes[0, 2], vtime, "wall time (h)")):
        ax.plot(x, value, "o-", color="C2")
        ax.set(title=f"validation {key[4:]}", xlabel=label)
        if value.size:
            best = int(np.argmax(value))
            ax.annotate(f"best {value[best]:.4f}", (x[best], value[best]), textcoords="offset points",
                        xytext=(0, 8), ha="center")
        ax.grid(alpha=0.3)
    for ax, name in ((axes[1, 0], "val_ncc"), (axes[1, 1], "val_ndv")):
        x, _, y = series(name)
        ax.plot(x, y, "o-", color="C1")
        ax.set(title=f"validation {name[4:]}" + (" (%)" if name == "val_ndv" else ""), xlabel="step")
        ax.grid(alpha=0.3)
    axes[1, 2].axis("off")
    last = rows[-1] if rows else {}
    axes[1, 2].text(0, 0.9, f"step {last.get('step', '-')}\nwall time {float(last.get('time_s', 0)) / 3600:.2f} h",
                    va="top", family="monospace")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


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
