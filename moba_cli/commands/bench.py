"""`moba bench` (being written)."""

from moba_cli.commands._common import fail

HELP = "Not available yet."


def bench() -> None:
    raise fail("moba bench is not available in this build yet")
