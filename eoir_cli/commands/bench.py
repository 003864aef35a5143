"""``eoir bench``: placeholder until its issue lands."""

from __future__ import annotations

from eoir_cli.commands.common import cli_command, fail


@cli_command
def bench_command() -> None:
    """Not available yet."""
    raise fail("eoir bench is not available in this build yet")
