"""One exception type for every user-facing error.

The CLI catches :class:`MobaError`, prints its message on one line and exits with code 1, so bad input
never shows a traceback.
"""


class MobaError(ValueError):
    """A bad input or an unsupported configuration, with a message meant for the user."""
