"""``eoir export``: placeholder until its issue lands."""

from __future__ import annotations

from eoir_cli.commands.common import cli_command, fail


@cli_command
def export_command() -> None:
    """Not available yet."""
    raise fail("eoir export is not available in this build yet")
