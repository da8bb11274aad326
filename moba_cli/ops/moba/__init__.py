"""The MoBA attention op: the float32 reference (``naive``) and the Triton kernels, with one entry point per
job. ``docs/architecture.md`` lists the files; :mod:`.plan` says how a prefill call is served and
:mod:`.options` holds every kernel switch."""

from .api import full_attention, moba_attention, run_plan
from .decode import cache_block_means, moba_decode, update_block_means
from .layout import BlockLayout, make_layout
from .options import KernelOptions
from .pairs import attended_pairs
from .plan import CallPlan, plan_call

__all__ = [
    "BlockLayout",
    "CallPlan",
    "KernelOptions",
    "attended_pairs",
    "cache_block_means",
    "full_attention",
    "make_layout",
    "moba_attention",
    "moba_decode",
    "plan_call",
    "run_plan",
    "update_block_means",
]
