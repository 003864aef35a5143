"""``eoir train``: placeholder until its issue lands."""

from __future__ import annotations

from eoir_cli.commands.common import cli_command, fail


@cli_command
def train_command() -> None:
    """Not available yet."""
    raise fail("eoir train is not available in this build yet")
