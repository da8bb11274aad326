"""Every switch of the MoBA kernels, as one frozen dataclass.

A call resolves its options once (:func:`resolve`): the ``options`` argument of
:func:`moba_cli.ops.moba.moba_attention` if given, else :meth:`KernelOptions.from_env`, the one place that
reads the kernel-development environment variables (``MOBA_*``). The options then travel down with the
call's plan; no kernel module keeps a switch of its own. A malformed ``MOBA_*`` value is a
:class:`~moba_cli.errors.MobaError` naming the variable, never a silent default.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from moba_cli.errors import MobaError

GATE_KINDS = ("grouped", "sort")


@dataclass(frozen=True)
class KernelOptions:
    """How the Triton backend serves a call. Defaults are the measured best (docs/perf-notes.md)."""

    dense_when_full: bool = True
    """Top-k covering every block runs as dense causal SDPA (cuDNN first) on CUDA; False forces the sparse kernels."""
    dense_prefix: bool = True
    """The first ``topk`` blocks of equal-length sequences run through cuDNN's dense kernel (``MOBA_DENSE_PREFIX``)."""
    dense_prefix_min_rows: int = 16384
    """Shorter dense prefixes stay in the sparse kernels (the split costs two launches and row copies)."""
    cudnn_blocks: bool = True
    """With long blocks the forward is dense cuDNN calls, one per key block (``MOBA_CUDNN_BLOCKS``)."""
    cudnn_min_chunk: int = 32768
    """Shortest ``chunk_size`` that takes the per-block cuDNN forward (below it the Triton schedule is as fast)."""
    own_splits: int = 4
    """Times the long-block forward halves its own blocks, 0..4 (``MOBA_OWN_SPLITS``)."""
    own_split_min_piece: int = 65536
    """Halves shorter than this are not split further (no gain measured)."""
    cudnn_pad_rows: int = 4096
    """Long-block calls round their rows up to a multiple of this, so cuDNN plans few shapes."""
    cudnn_tile_rows: int = 131072
    """Most rows of one long-block call (a multiple of ``cudnn_pad_rows``)."""
    cudnn_reference: bool = False
    """Float32 torch attention stands in for cuDNN in the dense-prefix and long-block paths (CPU tests)."""
    bwd_fused: bool = True
    """dQ by atomic adds in the dK/dV kernel (fast, not bit-reproducible); False: a deterministic dQ pass."""
    bwd_gluon: bool = True
    """On Hopper (bf16/fp16, head dim 128) the backward runs the Gluon kernel where Triton has its API."""
    fwd_desc: bool | None = None
    """TMA descriptors for the forward's K/V tiles; None: decided by the device and the tile shape."""
    fwd_prefetch: bool = True
    """The forward prefetches each merging tile's float32 partial results into L2 (not under the interpreter)."""
    prefix_stream: bool = True
    """The dense prefix's cuDNN forward runs on a side stream beside the sparse launches (CUDA only)."""
    fwd_lean: bool = True
    """Inference forward (no gradient) with the least memory (``MOBA_FWD_LEAN=0`` turns it off): int16 block
    lists, one slot's schedule at a time (a counting sort up to 1024 blocks), pieces of heads and rows where
    needed. About 1.15x cuDNN's forward peak instead of 1.3-1.75x, within 1.3% of the other forward's
    speed at the paper preset and for GQA (H100; 1.8% slower at the flashmoba preset, H200), so it is the
    default (docs/perf-notes.md, forward memory)."""
    fwd_piece_budget: float = 0.12
    """With ``fwd_lean``: the gate's and schedules' buffers of a piece stay under this fraction of the output's
    bytes where they can; 0 runs every query at once (still slot by slot)."""
    fwd_piece_min_rows: int = 65536
    """Fewest rows of such a piece (fewer leave forward tiles part empty, as a block's choosers split up)."""
    poison_outputs: bool = False
    """Fill every kernel-written buffer with NaN (floats) / -7 (ints) first, so an unwritten element shows."""
    gate_kind: str | None = None
    """Force the gate kernel, ``"grouped"`` or ``"sort"``; None: by the measured rule (``MOBA_GATE_KIND``)."""
    fwd_cfg: tuple[int, ...] | None = None
    """Forward launch config ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (``MOBA_FWD_CFG``)."""
    bwd_cfg: tuple[int, ...] | None = None
    """Backward launch config ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` (``MOBA_BWD_CFG``)."""
    gate_cfg: tuple[int, ...] | None = None
    """Gate launch config ``(BLOCK_M, BLOCK_N, num_warps[, num_stages[, per_sm]])`` (``MOBA_GATE_CFG``)."""

    def __post_init__(self) -> None:
        if self.gate_kind not in (None, *GATE_KINDS):
            raise MobaError(f"gate_kind must be 'grouped', 'sort' or None, got {self.gate_kind!r}")
        if not (self.fwd_piece_budget >= 0 and self.fwd_piece_min_rows >= 1):
            raise MobaError("fwd_piece_budget must be >= 0 and fwd_piece_min_rows >= 1, got "
                            f"{self.fwd_piece_budget!r} and {self.fwd_piece_min_rows!r}")
        if not 0 <= self.own_splits <= 4:
            raise MobaError(f"own_splits must be an integer from 0 to 4, got {self.own_splits!r}")
        for name, sizes in (("fwd_cfg", (4,)), ("bwd_cfg", (4,)), ("gate_cfg", (3, 4, 5))):
            cfg = getattr(self, name)
            if cfg is not None and (len(cfg) not in sizes or min(cfg) < 1):
                raise MobaError(f"{name} must be {' or '.join(map(str, sizes))} positive integers, got {cfg!r}")

    @classmethod
    def from_env(cls) -> KernelOptions:
        """The defaults with the ``MOBA_*`` kernel variables applied; a malformed value is a MobaError."""
        return _from_env(tuple(os.environ.get(name) or None for name in ENV_NAMES))

    def replace(self, **changes) -> KernelOptions:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """The options as a short string (custom-op argument); :func:`from_key` reads it back."""
        return repr(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


@functools.cache
def from_key(key: str) -> KernelOptions:
    """Inverse of :meth:`KernelOptions.key`."""
    import ast

    vals = ast.literal_eval(key)
    return KernelOptions(**dict(zip((f.name for f in dataclasses.fields(KernelOptions)), vals, strict=True)))


def _flag(name: str, val: str | None) -> bool | None:
    if val not in (None, "0", "1"):
        raise MobaError(f"{name} must be 0 or 1, got {val!r}")
    return None if val is None else val == "1"


def _config(name: str, val: str | None, sizes: tuple[int, ...]) -> tuple[int, ...] | None:
    if val is None:
        return None
    try:
        cfg = tuple(int(x) for x in val.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) not in sizes or min(cfg) < 1:
        raise MobaError(f"{name} must be {' or '.join(map(str, sizes))} positive integers separated by commas, "
                        f"got {val!r}")
    return cfg


# The variables from_env reads; each maps to the field of the same name without the prefix.
ENV_NAMES = ("MOBA_DENSE_PREFIX", "MOBA_CUDNN_BLOCKS", "MOBA_OWN_SPLITS", "MOBA_BWD_FUSED", "MOBA_BWD_GLUON",
             "MOBA_FWD_DESC", "MOBA_FWD_LEAN", "MOBA_GATE_KIND", "MOBA_FWD_CFG", "MOBA_BWD_CFG", "MOBA_GATE_CFG")


@functools.lru_cache(maxsize=8)
def _from_env(values: tuple[str | None, ...]) -> KernelOptions:
    env = dict(zip(ENV_NAMES, values, strict=True))
    changes: dict = {}
    for name in ("MOBA_DENSE_PREFIX", "MOBA_CUDNN_BLOCKS", "MOBA_BWD_FUSED", "MOBA_BWD_GLUON", "MOBA_FWD_DESC",
                 "MOBA_FWD_LEAN"):
        flag = _flag(name, env[name])
        if flag is not None:
            changes[name[5:].lower()] = flag
    splits = env["MOBA_OWN_SPLITS"]
    if splits is not None:
        if not splits.isdigit() or not 0 <= int(splits) <= 4:
            raise MobaError(f"MOBA_OWN_SPLITS must be an integer from 0 to 4, got {splits!r}")
        changes["own_splits"] = int(splits)
    kind = env["MOBA_GATE_KIND"]
    if kind not in (None, *GATE_KINDS):
        raise MobaError(f"MOBA_GATE_KIND must be 'grouped' or 'sort', got {kind!r}")
    changes["gate_kind"] = kind
    for name, sizes in (("MOBA_FWD_CFG", (4,)), ("MOBA_BWD_CFG", (4,)), ("MOBA_GATE_CFG", (3, 4, 5))):
        changes[name[5:].lower()] = _config(name, env[name], sizes)
    return KernelOptions(**changes)


def resolve(options: KernelOptions | None) -> KernelOptions:
    """The options of one call: ``options`` if given, else the environment's."""
    if options is None:
        return KernelOptions.from_env()
    if not isinstance(options, KernelOptions):
        raise MobaError(f"options must be a KernelOptions, got {type(options).__name__}")
    return options
