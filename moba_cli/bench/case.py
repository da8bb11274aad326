"""The shape one measurement runs at (a leaf module: presets build cases, providers and the runner read them)."""

from __future__ import annotations

from dataclasses import dataclass

from moba_cli.utils.sizes import format_size


@dataclass(frozen=True)
class Case:
    """One measured shape: a provider runs it once per pass."""

    pass_: str
    batch: int
    seq: int  # tokens per sequence; for ``decode`` the KV-cache length
    heads: int
    kv_heads: int
    head_dim: int
    chunk: int
    topk: int
    dtype: str
    device: str

    @property
    def label(self) -> str:
        heads = f"{self.heads}/{self.kv_heads}"
        return f"{self.pass_} seq={format_size(self.seq)} B={self.batch} H={heads} D={self.head_dim}"

    def with_seq(self, seq: int, chunk_divisor: int | None = None) -> Case:
        chunk = max(1, seq // chunk_divisor) if chunk_divisor else self.chunk
        return Case(self.pass_, self.batch, seq, self.heads, self.kv_heads, self.head_dim, chunk, self.topk,
                    self.dtype, self.device)
