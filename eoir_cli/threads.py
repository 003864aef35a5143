"""How eoir uses the CPU: the number of threads and how idle threads wait.

PyTorch's CPU kernels run on an OpenMP pool (libgomp in the pip wheels). By default idle pool
threads spin before they sleep; when another CPU-bound process shares the cores, a spinning or
descheduled pool thread makes every parallel region wait for a time slice, and a stage made of
thousands of small kernels (the affine fit, the refinement steps) slows 10x, not 2x. eoir sets
``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once) before torch is imported, unless the
user chose a policy, and uses one thread per core it may run on. The measurement behind these
defaults is in the README ("Speed on a busy CPU").

The one-shot CLI commands (``eoir_cli.cli.ONE_SHOT``) also keep freed memory for reuse
(:func:`retain_freed_memory`): a registration creates and drops dozens of 27-82 MB arrays, and
glibc hands each back to the kernel and faults every page of the next one in again.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

THREADS_ENV = "EOIR_THREADS"
WAIT_POLICY = "PASSIVE"


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """``$EOIR_THREADS``, else ``$OMP_NUM_THREADS`` (positive integers), else one thread per available core."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        text = os.environ.get(name, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value > 0:
            return value
        log.warning("%s=%r ignored: expected a positive integer", name, text)
    return available_cores()


def configure_threads(threads: int | None = None) -> int:
    """Set the waiting policy (before torch loads) and the thread count; returns the count.

    Args:
        threads: threads for PyTorch's kernels and eoir's own pools (None: :func:`default_threads`).

    Raises:
        ValueError: ``threads`` < 1.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    n = threads or default_threads()
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
    else:  # OpenMP reads its environment once, when torch loads it
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n


MMAP_THRESHOLD = 2**30  # bytes: below this, glibc serves allocations from its heap (default: from 128 KiB)
TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before glibc returns memory to the kernel
ARENA_MAX = 1  # one malloc arena for every thread: a thread's own arena maps each large block afresh


def retain_freed_memory() -> bool:
    """Make glibc reuse freed large blocks instead of unmapping them (a CLI process setting).

    Measured on ``eoir register`` at 160×224×192 (2 cores): ~0.65 s of ~8.5 s saved, the page
    faults of each new full-size array. One arena for all threads (glibc's other arenas hold at most
    64 MB and map anything larger afresh): a batch with two workers went from 27.1 to 23.5 s for 6
    pairs, kernel time 11.6 -> 3.9 s. The process keeps its peak memory until it exits, which is
    what a one-registration (or one-batch) process wants; a library caller decides for itself.
    Returns False where there is no glibc ``mallopt`` (macOS, musl), and changes nothing there.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return all(bool(mallopt(option, ctypes.c_int(value))) for option, value in (
        (m_mmap_threshold, MMAP_THRESHOLD), (m_trim_threshold, TRIM_THRESHOLD), (m_arena_max, ARENA_MAX)))


def num_threads() -> int:
    """Threads eoir's own pools use (file compression): PyTorch's count once torch is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    return default_threads()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with at most ``n`` PyTorch threads (for stages made of many small kernels, where a
    second thread gains little and makes every kernel wait for it when the CPU is shared)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
