"""`moba compare` (being written)."""

from moba_cli.commands._common import fail

HELP = "Not available yet."


def compare() -> None:
    raise fail("moba compare is not available in this build yet")
