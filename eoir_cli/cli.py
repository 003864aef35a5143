"""The ``eoir`` command: a thin Typer skin over the Python API (one library call per command)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Annotated, NoReturn

import typer

from eoir_cli import __version__
from eoir_cli.commands import apply, bench, demo, export, info, register, test, train
from eoir_cli.commands.common import DEBUG_ENV, set_debug

app = typer.Typer(
    name="eoir",
    help="3D medical image registration with EOIR: train, test, export, register, apply, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"eoir {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help=f"Show the traceback of an unexpected error (a bug) "
                                                        f"and debug logs; same as {DEBUG_ENV}=1.")] = False,
) -> None:
    """3D medical image registration with EOIR: train, test, export, register, bench."""
    set_debug(debug)


app.command("train")(train.train_command)
app.command("test")(test.test_command)
app.command("export")(export.export_command)
app.command("register")(register.register_command)
app.command("apply")(apply.apply_command)
app.command("bench")(bench.bench_command)
app.command("demo")(demo.demo_command)
app.command("info")(info.info_command)


# Commands whose process does one registration-sized job and ends: the process keeps the memory it
# frees (threads.retain_freed_memory) and skips the interpreter's teardown (quick_exit). Not train,
# test or bench: they start processes, and a child would miss its atexit clean-up.
ONE_SHOT = frozenset({"register", "apply", "demo"})


def main() -> None:
    """The ``eoir`` entry point; the :data:`ONE_SHOT` commands run with this process's settings for them."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if command not in ONE_SHOT:
        app()
        return
    from eoir_cli.threads import retain_freed_memory

    retain_freed_memory()
    try:
        app()
    except SystemExit as done:
        quick_exit(done.code)
    quick_exit(0)


def quick_exit(code: int | str | None) -> NoReturn:
    """End the process without the interpreter's teardown, once everything it owes is done.

    Tearing down a process that has loaded torch and held a few GB of volumes takes 0.5-0.8 s on
    2 cores (measured on ``eoir register`` at 160×224×192: wall minus the stages' total went from
    1.8-2.0 to 1.3 s), longer than some registration stages. Everything a normal exit would still do
    for us is done first: threads that are not daemons (writers) are joined, logging and the standard
    streams are flushed. Only for commands that start no processes (:data:`ONE_SHOT`): a child
    process would miss its atexit clean-up.

    Args:
        code: ``SystemExit.code``: None or an int status, or a message (printed, status 1).
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(0 if code is None else int(code))


if __name__ == "__main__":
    main()
