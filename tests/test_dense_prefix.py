"""The dense-prefix split (ops/moba/dense_prefix.py) against the float32 reference.

The cuDNN call is replaced by float32 causal attention (``KernelOptions.cudnn_reference``: there is no cuDNN
on CPU, and these inputs are float32), so these tests check the split itself: which queries leave the
sparse schedule, the prefix rows of the output, and the dK/dV sums over both parts. The GPU suite
(tests/test_gpu_suite.py) runs it through cuDNN.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_matches_naive, make_inputs, poisoned

from moba_cli import moba_attention
from moba_cli.errors import MobaError
from moba_cli.ops.moba import KernelOptions, dense_prefix, plan_call
from moba_cli.ops.moba.gate import select_blocks
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.schedule import Schedule

# The split on CPU: the float32 stand-in for cuDNN, no minimum prefix length, poisoned buffers.
OPTS = poisoned(dense_prefix=True, dense_prefix_min_rows=0, cudnn_reference=True)


@pytest.fixture
def calls(monkeypatch) -> list:
    """Records the plan of every dense-prefix forward, so a test knows the split ran."""
    seen: list = []
    real = dense_prefix.forward

    def spy(q, k, v, out, pre, *rest):
        seen.append(pre)
        return real(q, k, v, out, pre, *rest)

    monkeypatch.setattr(dense_prefix, "forward", spy)
    return seen


@pytest.mark.parametrize(
    ("batch", "seq", "hq", "hkv", "chunk", "topk", "padded"),
    [
        (1, 77, 4, 4, 16, 2, True),  # MHA, odd length (partial last block)
        (2, 64, 4, 2, 16, 3, True),  # GQA, padded batch
        (3, 45, 2, 1, 8, 3, False),  # MQA, packed sequences of one length
        (2, 40, 2, 2, 20, 1, True),  # topk 1: the prefix is the first block
    ],
)
def test_split_matches_reference(batch, seq, hq, hkv, chunk, topk, padded, device, calls):
    q, k, v, cu = make_inputs([seq] * batch, hq, hkv, 32, device, seed=seq)
    layout = make_layout(cu, chunk)
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    if padded:
        shaped = [x.view(batch, seq, *x.shape[1:]) for x in (qt, kt, vt)]
        out = moba_attention(*shaped, chunk_size=chunk, topk=topk, backend="triton", options=OPTS).view(q.shape)
    else:
        out = moba_attention(qt, kt, vt, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton", options=OPTS)
    assert calls == [dense_prefix.Prefix(batch=batch, seqlen=seq, rows=topk * chunk)]
    assert_matches_naive(out, (qt, kt, vt), (q, k, v), layout, topk)


def test_schedule_leaves_prefix_queries_out(device):
    q, k, _, cu = make_inputs([50, 50], 2, 1, 16, device, seed=3)
    layout = make_layout(cu, 8)
    sel = select_blocks(q, k, layout, 3, OPTS)
    skip = (layout.token_block - layout.token_first_block) < 3
    sched = Schedule(sel, layout.num_blocks, 16, skip)
    listed = sched.pair_t[: int(sched.group_cnt.sum())].long()
    assert not skip[listed].any()
    # every other token keeps all its pairs
    assert len(listed) == int((sel >= 0)[~skip].sum())


@pytest.mark.parametrize(
    ("lens", "chunk", "topk", "expect"),
    [
        ([64, 64], 16, 2, dense_prefix.Prefix(2, 64, 32)),
        ([64, 63], 16, 2, None),  # lengths differ: no single strided view
        ([64], 16, 4, None),  # the prefix is the whole sequence (the full-coverage shortcut's case)
        ([64], 16, 5, None),
    ],
)
def test_plan_rules(lens, chunk, topk, expect):
    q, k, _, cu = make_inputs(lens, 2, 2, 32, "cpu")
    assert dense_prefix.plan(q, k, cu.tolist(), chunk, topk, OPTS) == expect
    path = plan_call(q, k, chunk_size=chunk, topk=topk, cu_seqlens=cu, backend="triton", options=OPTS).path
    assert path == ("dense_prefix" if expect else "sparse")


def test_plan_off_switches(monkeypatch):
    q, k, _, cu = make_inputs([64], 2, 2, 32, "cpu")
    cu_host = cu.tolist()
    assert dense_prefix.plan(q, k, cu_host, 16, 2, OPTS.replace(dense_prefix_min_rows=33)) is None  # too short
    assert dense_prefix.plan(q, k, cu_host, 16, 2, OPTS.replace(cudnn_reference=False)) is None  # CPU: no cuDNN
    assert dense_prefix.plan(q, k, cu_host, 16, 2, OPTS.replace(dense_prefix=False)) is None
    monkeypatch.setenv("MOBA_DENSE_PREFIX", "0")
    assert KernelOptions.from_env().dense_prefix is False
    monkeypatch.setenv("MOBA_DENSE_PREFIX", "1")
    env = KernelOptions.from_env().replace(dense_prefix_min_rows=0, cudnn_reference=True)
    assert dense_prefix.plan(q, k, cu_host, 16, 2, env) == dense_prefix.Prefix(1, 64, 32)


def test_knob_rejects_bad_value(monkeypatch):
    monkeypatch.setenv("MOBA_DENSE_PREFIX", "yes")
    with pytest.raises(MobaError, match="MOBA_DENSE_PREFIX must be 0 or 1"):
        KernelOptions.from_env()


def test_cudnn_rule_needs_cuda():
    from moba_cli.ops.moba.dense import cudnn_ok

    q = torch.empty(8, 4, 128, dtype=torch.bfloat16)
    assert not cudnn_ok(q, q)  # CPU tensors


def test_cudnn_failure_is_one_clear_error():
    # The cuDNN ops refuse CPU tensors; whatever they raise comes out as one MobaError naming the way out.
    q, k, v, _ = make_inputs([64], 2, 2, 32, "cpu")
    pre = dense_prefix.Prefix(1, 64, 32)
    with pytest.raises(MobaError, match="MOBA_DENSE_PREFIX=0"):
        dense_prefix.forward(q, k, v, torch.empty_like(q), pre, 0.1, True, reference=False)


def test_bench_record_says_which_part_is_dense():
    # moba bench writes into each moba-triton record which part of the call a dense kernel ran (read from
    # the call's plan).
    from moba_cli.bench.presets import Case
    from moba_cli.bench.providers import _dense_parts

    q, k, _, _ = make_inputs([128], 2, 2, 32, "cpu")
    shaped = [x.view(1, 128, 2, 32) for x in (q, k)]
    case = Case("fwd", 1, 128, 2, 2, 32, 16, 2, "float32", "cuda")
    assert "first 32 tokens" in _dense_parts(case, *shaped, options=OPTS)
    assert _dense_parts(Case("fwd", 1, 128, 2, 2, 32, 16, 2, "float32", "cpu"), *shaped) is None
