"""Work counted for TFLOP/s: hand-computed cases, and agreement with the reference selection."""

import pytest
import torch

from moba_cli.bench import flops as F
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.naive import select_blocks
from moba_cli.ops.moba.pairs import attended_pairs, causal_pairs


def test_dense_causal_pairs():
    assert causal_pairs(1) == 1
    assert causal_pairs(4) == 10  # 1 + 2 + 3 + 4


def test_moba_pairs_by_hand():
    # S=8, chunk=2, topk=2: block 0 attends itself causally (1 + 2 = 3); blocks 1..3 add one past block
    # of 2 keys to each of their 2 queries: 2*2 + 3 = 7 each.
    assert attended_pairs(8, 2, 2) == 3 + 7 + 7 + 7
    # topk=1: own block only, 4 blocks x 3.
    assert attended_pairs(8, 2, 1) == 12
    # A short last block: S=5, chunk=2, topk=2: 3 + (2*2 + 3) + (1*2 + 1) = 13.
    assert attended_pairs(5, 2, 2) == 13


@pytest.mark.parametrize(("seq", "chunk"), [(5, 2), (64, 8), (100, 7), (4096, 4096)])
def test_topk_covering_every_block_is_dense(seq, chunk):
    nblocks = -(-seq // chunk)
    assert attended_pairs(seq, chunk, nblocks) == causal_pairs(seq)
    assert attended_pairs(seq, chunk, nblocks + 5) == causal_pairs(seq)


@pytest.mark.parametrize(
    ("seq", "chunk", "topk", "hq", "hkv"), [(96, 8, 3, 4, 2), (70, 16, 2, 2, 2), (64, 8, 20, 2, 1)]
)
def test_moba_pairs_match_the_reference_selection(seq, chunk, topk, hq, hkv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, hq, 16, generator=g)
    k = torch.randn(seq, hkv, 16, generator=g)
    layout = make_layout(torch.tensor([0, seq], dtype=torch.int32), chunk)
    idx = select_blocks(q, k, layout, topk)  # [T, Hq, slots], slot 0 = own block, -1 = none
    pos = torch.arange(seq)[:, None]
    own_keys = pos % chunk + 1  # the own block up to the query
    past = (idx[:, :, 1:] >= 0).sum(-1) * chunk  # every chosen past block is complete
    assert int((own_keys + past).sum()) == hq * attended_pairs(seq, chunk, topk)


def test_decode_pairs():
    # Cache of 10 tokens, the query is token 9 in block 2 (chunk 4): one past block (4) + tokens 8, 9.
    assert F.decode_pairs(10, 4, 2) == 6
    assert F.decode_pairs(10, 4, 12) == 10
    assert F.decode_pairs(10) == 10
    assert F.decode_pairs(8, 4, 1) == 4


def test_call_pairs_scale_with_batch_and_heads():
    assert F.call_pairs("dense", "fwd", 2, 4, 3, 2, 1) == 2 * 3 * 10
    assert F.call_pairs("moba", "fwd+bwd", 2, 8, 3, 2, 2) == 2 * 3 * 24
    assert F.call_pairs("moba", "decode", 2, 10, 3, 4, 2) == 2 * 3 * 6
    assert F.call_pairs("dense", "decode", 1, 10, 1, 4, 2) == 10


def test_flops_convention():
    assert F.attention_flops(10, 64, "fwd") == 4 * 10 * 64
    assert F.attention_flops(10, 64, "fwd+bwd") == 3.5 * 4 * 10 * 64  # bwd = 2.5 x fwd
    assert F.attention_flops(10, 64, "decode") == 4 * 10 * 64
    assert F.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert F.tflops(1e12, None) is None
