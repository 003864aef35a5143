"""User-facing errors: the CLI prints their message as one line and exits non-zero.

Anything else that escapes a command is treated as a bug (its traceback is shown with ``eoir --debug``).
"""


class EoirError(Exception):
    """Bad input or an environment that cannot do what was asked (message = one clear line)."""


class InputError(EoirError, ValueError):
    """A value given by the user (an option, a shape, a config field) that cannot be used.

    Also a ``ValueError``, so Python callers may catch either.
    """


class GpuUnavailableError(EoirError):
    """A GPU-only path (CUDA, TensorRT) was asked for on a machine without one."""
