"""The ``eoir`` command: a thin Typer skin over the Python API (one library call per command)."""

from __future__ import annotations

import typer

from eoir_cli.commands import apply, bench, demo, export, info, register, test, train

app = typer.Typer(
    name="eoir",
    help="3D medical image registration with EOIR: train, test, export, register, apply, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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
