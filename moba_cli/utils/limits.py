"""Upper bounds on user-given numbers, checked before any work so a huge value is one clear error.

Without them a huge ``--chunk`` ends as an OverflowError deep in torch, a huge ``--seed`` as a ValueError
from the generator, and a huge length as an allocation failure.
"""

from __future__ import annotations

from moba_cli.errors import MobaError

# Kernels index tokens with int32 offsets; beyond this a size can only overflow or exhaust memory.
MAX_TOKENS = 2**31 - 1
# numpy's and torch's generators both take seeds in [0, 2**32) (the bound of the commands' --seed option).
SEED_MAX = 2**32 - 1


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed every generator accepts; else one MobaError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise MobaError(f"{flag} must be an integer in [0, {SEED_MAX}], got {seed!r}")


def check_at_most(value: int, name: str, limit: int = MAX_TOKENS) -> None:
    """``value <= limit``, else one MobaError naming the option (or product of options) in ``name``."""
    if value > limit:
        raise MobaError(f"{name} must be at most {limit}, got {value}")
