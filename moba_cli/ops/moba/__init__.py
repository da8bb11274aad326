"""The MoBA attention op: float32 reference (``naive``) and Triton kernels (``triton_moba``)."""

from .api import full_attention, moba_attention
from .layout import BlockLayout, make_layout

__all__ = ["BlockLayout", "full_attention", "make_layout", "moba_attention"]
