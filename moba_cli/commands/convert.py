"""`moba convert` (being written)."""

from moba_cli.commands._common import fail

HELP = "Not available yet."


def convert() -> None:
    raise fail("moba convert is not available in this build yet")
