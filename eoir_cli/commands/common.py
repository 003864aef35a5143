"""Shared plumbing for commands: one error handler, one console, common option types."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer
from rich.console import Console

from eoir_cli.errors import EoirError


def _flags_show_no_value() -> None:
    """Typer >= 0.20 prints every option's type in help, ``<bool>`` for flags, which take no value."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_eoir_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return "" if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)

    display_type_rich._eoir_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_value()
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "EOIR_DEBUG"  # set to 1 (or pass `eoir --debug`) to see the traceback of an unexpected error

# Errors that are the user's input or environment, not a bug: shown as one line, exit code 1.
# A plain ValueError or RuntimeError is *not* here: library code raises EoirError (or InputError,
# which is also a ValueError) for bad input, so anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    EoirError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    OSError, ImportError, pickle.UnpicklingError, MemoryError,
)


_debug_flag = [False]  # set by `eoir --debug` for this invocation


def set_debug(on: bool) -> None:
    """Record ``eoir --debug`` (called by the top-level callback on every invocation)."""
    _debug_flag[0] = on


def debug_enabled() -> bool:
    """True when ``eoir --debug`` or ``EOIR_DEBUG=1`` asked for tracebacks."""
    return _debug_flag[0] or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _bug(err: BaseException) -> typer.Exit:
    return fail(f"unexpected {type(err).__name__}: {_first_line(err)} (a bug: rerun with `eoir --debug ...` or "
                f"{DEBUG_ENV}=1 for the traceback, and report it)", code=2)


def _is_own_import_error(err: BaseException) -> bool:
    """An ImportError inside eoir itself is a bug; a missing optional library is the environment."""
    name = getattr(err, "name", None) or ""
    return isinstance(err, ImportError) and name.split(".")[0] in ("eoir_cli", "export")


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # torch may not be imported
    return oom is not None and isinstance(err, oom)


def cli_command(fn: F | None = None, *, interrupted: str = "nothing was written") -> Any:
    """Run a command with the CLI's error policy.

    Expected errors (bad input, missing files, no GPU, out of memory) become one ``error: ...`` line
    and exit code 1. Ctrl-C becomes one ``interrupted: <interrupted>`` line (what was kept) and exit
    code 130. Any other exception is a bug: one line pointing at ``--debug`` and exit code 2, or the
    full traceback with ``eoir --debug`` / ``EOIR_DEBUG=1``.

    Use as ``@cli_command`` or ``@cli_command(interrupted="finished pairs are kept")``.
    """

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            logging.basicConfig(level=logging.DEBUG if debug_enabled() else logging.WARNING,
                                format="%(levelname)s %(name)s: %(message)s")
            try:
                return f(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt:
                if debug_enabled():
                    raise
                err_console.print(f"[bold yellow]interrupted:[/] {interrupted}", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
            except USER_ERRORS as err:
                if debug_enabled():
                    raise
                raise (_bug(err) if _is_own_import_error(err) else fail(_first_line(err))) from None
            except Exception as err:
                if debug_enabled():
                    raise
                if _is_out_of_memory(err):
                    raise fail(f"out of memory: {_first_line(err)}") from None
                raise _bug(err) from None

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
