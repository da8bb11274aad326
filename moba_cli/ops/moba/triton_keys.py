"""Gate keys shared by the prefill and decode Triton kernels.

A key is an int64 whose order is the gate's order: the float32 score's bits above (made monotone), and
``2^31 - 1 - block`` below, so among equal scores the earlier block ranks higher (the tie rule).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pack_keys(s, blk):
    """Sortable int64 keys from float32 scores ``s`` and int32 block ids ``blk`` (broadcastable shapes)."""
    # -0.0 and +0.0 are equal scores; give them the same bits so the tie rule decides between them.
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    # Flip the magnitude bits of negative floats so that signed int order equals float order.
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (0x7FFFFFFF - blk).to(tl.int64)
