"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class EoirError(Exception):
    """Bad input or an environment that cannot do what was asked (message = one clear line)."""


class GpuUnavailableError(EoirError):
    """A GPU-only path (CUDA, TensorRT) was asked for on a machine without one."""
