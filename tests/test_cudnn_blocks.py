"""The long-block forward (ops/moba/cudnn_blocks.py) against the float32 reference.

On CPU the cuDNN calls are replaced by float32 attention (``cudnn_reference``) and ``cudnn_min_chunk`` is lowered, so
these tests check the path itself under the Triton interpreter: the own-block views, the gather of each
key block's choosers, the merge by log-sum-exp, and the backward that the sparse kernels run on its output.
The GPU suite (tests/test_gpu_suite.py) runs it through cuDNN.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_matches_naive, make_inputs, poisoned

from moba_cli import moba_attention
from moba_cli.errors import MobaError
from moba_cli.ops.moba import KernelOptions, cudnn_blocks, dense_prefix, plan_call
from moba_cli.ops.moba.gate import select_blocks
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.schedule import PastLists

# The path on CPU: float32 stand-in for cuDNN, any chunk size; small row tiles, so a block's choosers span
# several calls and the last one is padded; the dense prefix would apply to some of these shapes too: it
# must give way.
OPTS = poisoned(cudnn_blocks=True, cudnn_min_chunk=0, cudnn_reference=True, cudnn_pad_rows=8, cudnn_tile_rows=16,
                dense_prefix=True, dense_prefix_min_rows=0)


@pytest.fixture
def calls(monkeypatch) -> dict:
    """Counts the long-block forwards, the dense-prefix forwards and the dense calls made."""
    seen = {"blocks": 0, "prefix": 0, "attend": []}
    fwd, pre, att = cudnn_blocks.forward, dense_prefix.forward, cudnn_blocks._attend

    def spy_fwd(*a, **kw):
        seen["blocks"] += 1
        return fwd(*a, **kw)

    def spy_pre(*a, **kw):
        seen["prefix"] += 1
        return pre(*a, **kw)

    def spy_att(q4, k4, v4, causal, scale, reference):
        seen["attend"].append((tuple(q4.shape), tuple(k4.shape), causal))
        return att(q4, k4, v4, causal, scale, reference)

    monkeypatch.setattr(cudnn_blocks, "forward", spy_fwd)
    monkeypatch.setattr(dense_prefix, "forward", spy_pre)
    monkeypatch.setattr(cudnn_blocks, "_attend", spy_att)
    return seen


@pytest.mark.parametrize(
    ("lens", "hq", "hkv", "chunk", "topk", "padded"),
    [
        ([64], 4, 4, 16, 2, True),  # MHA, whole blocks: one batched own-block call
        ([64, 64], 4, 2, 16, 3, True),  # GQA, padded batch of equal lengths
        ([50, 37, 16], 2, 1, 8, 3, False),  # MQA, packed, partial last blocks
        ([77], 2, 2, 16, 4, False),  # odd length
        ([40, 40], 2, 2, 20, 1, True),  # topk 1: own blocks only
    ],
)
def test_path_matches_reference(lens, hq, hkv, chunk, topk, padded, device, calls):
    q, k, v, cu = make_inputs(lens, hq, hkv, 32, device, seed=sum(lens))
    layout = make_layout(cu, chunk)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    if padded:
        b, s = len(lens), lens[0]
        shaped = [x.view(b, s, *x.shape[1:]) for x in (qt, kt, vt)]
        out = moba_attention(*shaped, chunk_size=chunk, topk=topk, backend="triton", options=OPTS).view(q.shape)
    else:
        out = moba_attention(qt, kt, vt, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton", options=OPTS)
    assert calls["blocks"] == 1 and calls["prefix"] == 0
    causal = [c for c in calls["attend"] if c[2]]
    whole = all(n % chunk == 0 for n in lens)
    assert len(causal) == (1 if whole else sum(1 + (n % chunk > 0) - (n < chunk) for n in lens))
    if topk == 1:
        assert len(calls["attend"]) == len(causal)
    assert_matches_naive(out, (qt, kt, vt), (q, k, v), layout, topk)


def test_past_lists_match_the_gate(device):
    q, k, _, cu = make_inputs([70, 45], 3, 1, 16, device, seed=5)
    layout = make_layout(cu, 8)
    sel = select_blocks(q, k, layout, 4, OPTS)
    lists = PastLists(sel, layout.num_blocks)
    t, h, _ = sel.shape
    for j in range(layout.num_blocks):
        per_head = []
        for hh in range(h):
            want = [tok for tok in range(t) if j in sel[tok, hh, 1:].tolist()]
            g = j * h + hh
            off, cnt = int(lists.group_off[g]), int(lists.group_cnt[g])
            assert lists.pair_t[off:off + cnt].tolist() == want, (j, hh)
            per_head.append(len(want))
        assert lists.rows[j] == max(per_head)


def test_own_segments():
    assert cudnn_blocks._own_segments((0, 64, 128), 16) == [(0, 8, 16)]
    assert cudnn_blocks._own_segments((0, 50, 87), 16) == [(0, 3, 16), (48, 1, 2), (50, 2, 16), (82, 1, 5)]
    assert cudnn_blocks._own_segments((0, 10), 16) == [(0, 1, 10)]
    assert cudnn_blocks._block_ranges((0, 50, 87), 16) == [(0, 16), (16, 32), (32, 48), (48, 50), (50, 66),
                                                         (66, 82), (82, 87)]


def test_plan_rules(monkeypatch):
    q, k, _, cu = make_inputs([64], 2, 2, 32, "cpu")
    plan = cudnn_blocks.Plan((0, 64), 16)
    cu_host = cu.tolist()
    assert cudnn_blocks.plan(q, k, cu_host, 16, OPTS) == plan
    call = plan_call(q, k, chunk_size=16, topk=2, cu_seqlens=cu, backend="triton", options=OPTS)
    assert (call.path, call.blocks, call.prefix) == ("long_blocks", plan, None)  # the dense prefix gives way
    assert cudnn_blocks.plan(q, k, cu_host, 16, OPTS.replace(cudnn_min_chunk=32)) is None  # blocks too short
    assert cudnn_blocks.plan(q, k, cu_host, 16, OPTS.replace(cudnn_reference=False)) is None  # CPU: no cuDNN
    monkeypatch.setenv("MOBA_CUDNN_BLOCKS", "0")
    assert cudnn_blocks.plan(q, k, cu_host, 16, KernelOptions.from_env().replace(cudnn_min_chunk=0)) is None
    monkeypatch.setenv("MOBA_CUDNN_BLOCKS", "1")
    env = KernelOptions.from_env().replace(cudnn_min_chunk=0, cudnn_reference=True)
    assert cudnn_blocks.plan(q, k, cu_host, 16, env) == plan


def test_knob_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("MOBA_CUDNN_BLOCKS", "on")
    with pytest.raises(MobaError, match="MOBA_CUDNN_BLOCKS must be 0 or 1"):
        KernelOptions.from_env()


def test_cudnn_failure_is_one_clear_error():
    # The cuDNN op refuses CPU tensors; whatever it raises comes out as one MobaError naming the way out.
    q = torch.randn(1, 2, 16, 32)
    with pytest.raises(MobaError, match="MOBA_CUDNN_BLOCKS=0"):
        cudnn_blocks._attend(q, q, q, True, 0.1, False)


def test_bench_record_names_the_long_block_forward():
    from moba_cli.bench.presets import Case
    from moba_cli.bench.providers import _dense_parts

    q, k, _, _ = make_inputs([128], 2, 2, 32, "cpu")
    shaped = [x.view(1, 128, 2, 32) for x in (q, k)]
    note = _dense_parts(Case("fwd", 1, 128, 2, 2, 32, 16, 2, "float32", "cuda"), *shaped, options=OPTS)
    assert "one per key block" in note


def test_call_shapes_recur():
    pad = KernelOptions().cudnn_pad_rows
    assert (pad, KernelOptions().cudnn_tile_rows) == (4096, 131072)
    assert cudnn_blocks.bucket_rows(0, pad) == 0
    assert cudnn_blocks.bucket_rows(1, pad) == 4096
    assert cudnn_blocks.bucket_rows(4096, pad) == 4096
    shapes = set()
    for n in range(1, 3_000_000, 997):
        b = cudnn_blocks.bucket_rows(n, pad)
        assert n <= b < n + 4096 and b % 4096 == 0, n
        shapes.update(min(131072, b - r0) for r0 in range(0, b, 131072))
    assert len(shapes) == 32  # every call is one of 32 row counts, whatever the gate chose


@pytest.mark.parametrize(
    ("lens", "chunk", "splits", "halves"),
    [
        ([64], 32, 1, [16]),  # one level: the halves causal, one non-causal call
        ([128], 32, 2, [16, 8]),  # two levels
        ([64, 64], 32, 4, [16, 8]),  # stops at own_split_min_piece
        ([70, 45], 16, 2, [8]),  # packed, partial blocks (14 and 13 tokens) are not split
        ([96], 32, None, [16, 8]),  # the default levels, down to own_split_min_piece
    ],
)
def test_own_blocks_split(lens, chunk, splits, halves, device, calls):
    opts = OPTS.replace(own_split_min_piece=8)
    if splits is not None:
        opts = opts.replace(own_splits=splits)
    q, k, v, cu = make_inputs(lens, 4, 2, 32, device, seed=len(lens) + chunk)
    layout = make_layout(cu, chunk)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = moba_attention(qt, kt, vt, chunk_size=chunk, topk=2, cu_seqlens=cu, backend="triton", options=opts)
    own = [c for c in calls["attend"] if c[0][0] > 1 or c[2]]
    noncausal_own = sorted({c[0][2] for c in own if not c[2]}, reverse=True)
    assert noncausal_own == halves
    assert min(c[0][2] for c in own if c[2]) <= halves[-1]
    assert_matches_naive(out, (qt, kt, vt), (q, k, v), layout, 2)


def test_own_splits_knob(monkeypatch):
    monkeypatch.setenv("MOBA_OWN_SPLITS", "2")
    assert KernelOptions.from_env().own_splits == 2
    monkeypatch.setenv("MOBA_OWN_SPLITS", "9")
    with pytest.raises(MobaError, match="MOBA_OWN_SPLITS must be an integer from 0 to 4"):
        KernelOptions.from_env()
