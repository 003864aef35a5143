"""The one device resolver: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a torch device string."""

from __future__ import annotations

from eoir_cli.errors import EoirError, GpuUnavailableError


def resolve_device(device: str = "auto", local_rank: int | None = None) -> str:
    """Resolve a device request.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: under torchrun, a bare ``"cuda"`` becomes ``"cuda:<local_rank>"`` (one GPU per process).

    Returns:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        GpuUnavailableError: CUDA asked for on a machine without a CUDA GPU.
        EoirError: anything else than the forms above.
    """
    import torch

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise EoirError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GpuUnavailableError(f"device {device}: no CUDA GPU is available on this machine (use cpu)")
        if device == "cuda" and local_rank is not None:
            device = f"cuda:{local_rank}"
    return device
