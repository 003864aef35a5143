"""Batches: many pairs registered with one opened model, resumable, one summary row per pair.

Pair lists are read by :func:`eoir_cli.data.datasets.read_pair_list` (CSV, JSON list or a
Learn2Reg ``*_dataset.json``), the same reader ``--dataset pairs`` uses.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eoir_cli.data.datasets import PairRecord, read_pair_list
from eoir_cli.errors import EoirError
from eoir_cli.outputs import DONE_MARKER, copy_atomic

__all__ = ["PairOutcome", "read_pair_list", "register_pairs"]


log = logging.getLogger(__name__)

MAX_WORKERS = 4  # pairs in flight at once on a CPU by default (each ~1.6 GB at 160×224×192)


@dataclass
class PairOutcome:
    """Summary row of one batch pair."""

    name: str
    status: str  # "done", "skipped" (already finished) or "failed"
    seconds: float | None = None
    dice_before: float | None = None
    dice_after: float | None = None
    ndv_percent: float | None = None
    error: str | None = None


def _outcome_from_metrics(name: str, status: str, metrics: dict[str, Any]) -> PairOutcome:
    seg = metrics.get("segmentation") or {}
    return PairOutcome(name, status, (metrics.get("timings_s") or {}).get("total"), seg.get("dice_before_mean"),
                       seg.get("dice_after_mean"), (metrics.get("field") or {}).get("ndv_percent"))


def register_pairs(
    pairs: Sequence[PairRecord],
    out_dir: str | os.PathLike[str],
    model: Any = "default",
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    progress: Callable[[int, int, PairOutcome], None] | None = None,
    workers: int | None = None,
    **options: Any,
) -> list[PairOutcome]:
    """Register many pairs with one loaded model, into ``out_dir/<pair label>/``.

    Pairs whose folder already holds ``metrics.json`` are skipped (the batch is resumable; with
    ``overwrite=True`` they are registered again); a pair that fails is reported and the batch goes
    on (an unexpected exception's traceback is logged at DEBUG level: ``eoir --debug`` shows it).
    ``summary.csv`` is written to ``out_dir``.
    With ``lumir=True`` each ``disp_<fixed>_<moving>.nii.gz`` is also placed in ``out_dir`` itself
    (the flat layout a LUMIR submission expects, as a hard link: the field is written once).
    With one worker the next pair is read and the previous one written on two I/O threads while a
    pair is computed. With several (CPU), that many pairs are registered at once, each on one
    PyTorch thread: most stages are chains of small kernels that a second thread speeds up by
    ~15 %, so two pairs side by side on 2 cores finish in ~2/3 of the time of two in a row.

    Args:
        pairs: from :func:`read_pair_list`.
        workers: pairs registered at once (None: one per PyTorch thread up to :data:`MAX_WORKERS`
            on a CPU, 1 on a GPU).
        options: forwarded to :func:`eoir_cli.pipeline.register` (``affine``, ``refine``, ``lumir``, ...).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from eoir_cli.backends import open_backend
    from eoir_cli.fileio import check_output_dir
    from eoir_cli.io import load_volume
    from eoir_cli.outputs import clean_stale_staging
    from eoir_cli.pipeline import register

    out = check_output_dir(out_dir, "output folder")  # before any model is opened or pair registered
    overwrite = bool(options.get("overwrite"))
    # Open the model once, and only when some pair is left to do; a model that cannot be opened
    # fails the whole batch (one line), not every pair in turn.
    todo = [overwrite or not (out / p.label / DONE_MARKER).is_file() for p in pairs]
    net = open_backend(model, backend, device, precision) if any(todo) else None
    if workers is not None and workers < 1:
        raise EoirError(f"workers: expected >= 1, got {workers}")
    if workers is None:
        import torch

        gpu = net is not None and str(getattr(net, "device", "cpu")).startswith("cuda")
        workers = 1 if gpu else max(1, min(torch.get_num_threads(), MAX_WORKERS))
    outcomes: list[PairOutcome] = []
    errors = (EoirError, ValueError, OSError, RuntimeError)

    def failed(label: str, err: BaseException) -> PairOutcome:
        if not isinstance(err, (EoirError, OSError)):  # a bug, most likely: `eoir --debug` shows where
            log.debug("pair %s: unexpected %s", label, type(err).__name__, exc_info=True)
        text = str(err).strip()
        return PairOutcome(label, "failed", error=text.splitlines()[0] if text else type(err).__name__)

    def report(n: int, outcome: PairOutcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(n + 1, len(pairs), outcome)

    def load(pair: PairRecord) -> tuple[Any, ...]:
        return (load_volume(pair.fixed.image, "image", "fixed"), load_volume(pair.moving.image, "image", "moving"),
                load_volume(pair.moving.seg, "label", "moving-seg") if pair.moving.seg else None,
                load_volume(pair.fixed.seg, "label", "fixed-seg") if pair.fixed.seg else None)

    def write(result: Any, pair: PairRecord) -> PairOutcome:
        return finished(result.write(), result, pair)

    def finished(paths: dict[str, Path], result: Any, pair: PairRecord) -> PairOutcome:
        if options.get("lumir"):
            lumir_name = f"disp_{pair.fixed.id}_{pair.moving.id}.nii.gz"
            copy_atomic(paths[lumir_name], out / lumir_name)  # a hard link: the field is stored once
        return _outcome_from_metrics(pair.label, "done", result.metrics)

    def skipped(pair: PairRecord) -> PairOutcome:
        try:
            metrics = json.loads((out / pair.label / DONE_MARKER).read_text())
        except (json.JSONDecodeError, OSError):
            return PairOutcome(pair.label, "skipped")
        return _outcome_from_metrics(pair.label, "skipped", metrics)

    def side_by_side() -> None:
        """``workers`` pairs in flight, each on one PyTorch thread (the last ones share the threads
        the finished ones had: PyTorch's thread count is one per process). Ctrl-C (or an interrupt inside a
        pair) stops every pair in flight at its next stage boundary: their staging folders are
        removed, finished pairs are kept, and KeyboardInterrupt is raised."""
        import threading
        from concurrent.futures import FIRST_COMPLETED, wait

        import torch

        from eoir_cli.threads import torch_threads

        threads = torch.get_num_threads()
        stop = threading.Event()

        def stop_here(stage: str, seconds: float) -> None:  # register calls it after every stage
            if stop.is_set():
                raise KeyboardInterrupt

        def one(pair: PairRecord) -> PairOutcome:
            fixed, moving, mseg, fseg = load(pair)
            result = register(fixed, moving, out / pair.label, model=net, moving_seg=mseg, fixed_seg=fseg,
                              progress=stop_here, **options)
            return finished(result.paths, result, pair)

        for n, pair in enumerate(pairs):
            if not todo[n]:
                report(len(outcomes), skipped(pair))
        with torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="eoir-pair") as pool:
            running: dict[Future[PairOutcome], PairRecord] = {}
            for n, pair in enumerate(pairs):
                if todo[n]:
                    clean_stale_staging(out / pair.label)
                    running[pool.submit(one, pair)] = pair
            try:
                while running:
                    for future in wait(running, return_when=FIRST_COMPLETED)[0]:
                        pair = running.pop(future)
                        try:
                            outcome = future.result()
                        except errors as err:
                            outcome = failed(pair.label, err)
                        report(len(outcomes), outcome)
                    if 0 < len(running) < workers:  # the last pairs: give them the threads the others had
                        torch.set_num_threads(max(1, threads // len(running)))
            except BaseException:  # Ctrl-C here, or KeyboardInterrupt from a pair: stop the others
                stop.set()
                for future in running:
                    future.cancel()
                raise

    if workers > 1 and sum(todo) > 1:
        side_by_side()
        order = {p.label: n for n, p in enumerate(pairs)}
        outcomes.sort(key=lambda o: order[o.name])  # reported as they finished, returned in the list's order
        write_summary(out / "summary.csv", outcomes)
        return outcomes

    # Reading the next pair and writing the previous one run on two I/O threads while this thread
    # computes (gzip (de)compression releases the GIL); one write is in flight at a time.
    loads: dict[int, Future[tuple[Any, ...]]] = {}
    pending: tuple[int, PairRecord, Future[PairOutcome]] | None = None

    def finish_pending() -> None:
        nonlocal pending
        if pending is not None:
            n_done, pair_done, future = pending
            pending = None
            try:
                report(n_done, future.result())
            except errors as err:
                report(n_done, failed(pair_done.label, err))

    def prefetch(after: int) -> None:
        nxt = next((m for m in range(after + 1, len(pairs)) if todo[m]), None)
        if nxt is not None and nxt not in loads:
            loads[nxt] = loader.submit(load, pairs[nxt])

    with ThreadPoolExecutor(1, thread_name_prefix="eoir-load") as loader, \
            ThreadPoolExecutor(1, thread_name_prefix="eoir-write") as writer:
        for n, pair in enumerate(pairs):
            pair_dir = out / pair.label
            clean_stale_staging(pair_dir)
            if not todo[n]:
                finish_pending()
                report(n, skipped(pair))
                continue
            try:
                fixed, moving, mseg, fseg = (loads.pop(n) if n in loads else loader.submit(load, pair)).result()
                prefetch(n)
                result = register(fixed, moving, pair_dir, model=net, moving_seg=mseg, fixed_seg=fseg,
                                  write_later=True, **options)
            except errors as err:
                finish_pending()
                report(n, failed(pair.label, err))
                continue
            finish_pending()
            pending = (n, pair, writer.submit(write, result, pair))
        finish_pending()
    write_summary(out / "summary.csv", outcomes)
    return outcomes


def write_summary(path: Path, outcomes: Sequence[PairOutcome]) -> None:
    """``summary.csv``: one row per pair (name, status, seconds, Dice before/after, NDV %, error)."""
    from eoir_cli.fileio import write_text_atomic

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "status", "seconds", "dice_before", "dice_after", "ndv_percent", "error"])
    for o in outcomes:
        writer.writerow([o.name, o.status, o.seconds, o.dice_before, o.dice_after, o.ndv_percent, o.error or ""])
    write_text_atomic(path, buf.getvalue())
