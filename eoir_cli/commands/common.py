"""Shared plumbing for commands: one error handler, one console, common option types."""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer
from rich.console import Console

from eoir_cli.errors import EoirError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Errors that are the user's input or environment, not a bug: shown as one line, exit code 1.
USER_ERRORS: tuple[type[BaseException], ...] = (
    EoirError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
    OSError, ImportError, pickle.UnpicklingError, MemoryError,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def cli_command(fn: F) -> F:
    """Turn user errors raised by a command into one clear line and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except USER_ERRORS as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise fail(text) from None
        except RuntimeError as err:  # torch reports e.g. out-of-memory this way
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise fail(f"{type(err).__name__}: {text}") from None

    return wrapper  # type: ignore[return-value]


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
