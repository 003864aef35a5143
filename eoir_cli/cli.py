"""The ``eoir`` command: a thin Typer skin over the Python API (one library call per command)."""

from __future__ import annotations

from typing import Annotated

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
