"""MoBA decode: reference == last row of prefill MoBA, Triton == reference, block means, bad inputs.

Triton runs under its CPU interpreter when there is no GPU (tests/conftest.py), so sizes stay tiny.
Caches are stored ``[B, Hkv, L, D]`` like transformers' and passed as ``.transpose(1, 2)`` views; keys and
values past each sequence's length are NaN, so reading them anywhere would show in the output.
"""

from __future__ import annotations

import math

import pytest
import torch

from moba_cli.errors import MobaError
from moba_cli.ops.moba import moba_attention
from moba_cli.ops.moba.decode import (
    cache_block_means,
    moba_decode,
    select_decode_blocks,
    update_block_means,
)
from moba_cli.ops.moba.layout import make_layout
from moba_cli.ops.moba.naive import select_blocks


def make_case(lens, cache_len, hq, hkv, d, dtype=torch.float32, device="cpu", seed=0):
    """Full sequences q ``[B, L, Hq, D]`` and a cache (HF-layout views ``[B, L, Hkv, D]``), NaN past lens."""
    gen = torch.Generator().manual_seed(seed)
    bsz = len(lens)
    q = torch.randn(bsz, cache_len, hq, d, generator=gen)
    k = torch.randn(bsz, hkv, cache_len, d, generator=gen)
    v = torch.randn(bsz, hkv, cache_len, d, generator=gen)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    q, k, v = (t.to(dtype=dtype, device=device) for t in (q, k, v))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k.transpose(1, 2), v.transpose(1, 2), seqlens


def last_query(q_full: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
    """The decode query of each sequence: its token at position ``len - 1`` -> ``[B, Hq, D]``."""
    idx = (seqlens.long() - 1).to(q_full.device)
    return q_full[torch.arange(q_full.shape[0], device=q_full.device), idx]


def prefill_last_row(q_full, k, v, n, chunk, topk, b):
    """Last row of prefill MoBA (naive) on sequence ``b``'s first ``n`` tokens, and its block choice."""
    qs, ks, vs = (t[b : b + 1, :n].float().contiguous() for t in (q_full, k, v))
    out = moba_attention(qs, ks, vs, chunk_size=chunk, topk=topk, backend="naive")[0, -1]
    layout = make_layout(torch.tensor([0, n], dtype=torch.int32, device=qs.device), chunk)
    ids = select_blocks(qs[0], ks[0], layout, topk)[-1]  # [Hq, slots]; one sequence: ids are local
    return out, ids


def run_triton(q, k, v, seqlens, means, chunk, topk, **knobs):
    """The Triton path with its block choice, writing into a NaN-poisoned output."""
    from moba_cli.ops.moba.triton_decode import moba_decode_triton

    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    res, plan = moba_decode_triton(q, k, v, seqlens, means, chunk, topk, scale, out=out, return_plan=True, **knobs)
    assert res is out
    return out, plan


HEADS = [(4, 4), (4, 2), (4, 1)]


@pytest.mark.parametrize("hq,hkv", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("chunk", [4, 5])
def test_naive_decode_is_last_row_of_prefill(hq, hkv, chunk):
    # Lengths: inside the first block, exactly one and two blocks, odd, the full cache.
    cache_len = 4 * chunk - 1
    lens = [2, chunk, 2 * chunk, 2 * chunk + 3, cache_len]
    q_full, k, v, seqlens = make_case(lens, cache_len, hq, hkv, d=16, seed=chunk + hq * 10 + hkv)
    q = last_query(q_full, seqlens)
    means = cache_block_means(k, seqlens, chunk)
    for topk in (1, 2, 3, 50):
        out = moba_decode(q, k, v, seqlens, means, chunk_size=chunk, topk=topk, backend="naive")
        ids = select_decode_blocks(q, means, seqlens, chunk, topk, cache_len)
        assert not torch.isnan(out).any()
        for b, n in enumerate(lens):
            ref, ref_ids = prefill_last_row(q_full, k, v, n, chunk, topk, b)
            torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=1e-5)
            slots = ref_ids.shape[-1]
            assert torch.equal(ids[b, :, :slots], ref_ids)
            assert (ids[b, :, slots:] == -1).all()


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_triton_decode_is_last_row_of_prefill(hq, hkv, device):
    chunk, cache_len = 4, 15
    lens = [3, 8, 11, 15]
    q_full, k, v, seqlens = make_case(lens, cache_len, hq, hkv, d=32, device=device, seed=hq + hkv)
    q = last_query(q_full, seqlens)
    means = cache_block_means(k, seqlens, chunk)
    for topk in (1, 2, 3, 50):
        out, plan = run_triton(q, k, v, seqlens, means, chunk, topk)
        ref_ids = select_decode_blocks(q, means, seqlens, chunk, topk, cache_len)
        assert torch.equal(plan["block_ids"], ref_ids)
        for b, n in enumerate(lens):
            ref, _ = prefill_last_row(q_full, k, v, n, chunk, topk, b)
            torch.testing.assert_close(out[b], ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_topk_covering_all_blocks_is_dense_decode(backend, device):
    hq, hkv, d, chunk, cache_len = 6, 2, 32, 8, 45
    lens = [45, 17, 8, 1]
    q_full, k, v, seqlens = make_case(lens, cache_len, hq, hkv, d, device=device, seed=3)
    q = last_query(q_full, seqlens)
    means = cache_block_means(k, seqlens, chunk)
    strided_lens = torch.stack([seqlens, seqlens * 0], 1)[:, 0]  # any int32 [B] view will do
    out = moba_decode(q, k, v, strided_lens, means, chunk_size=chunk, topk=6, backend=backend)
    for b, n in enumerate(lens):
        dense = torch.nn.functional.scaled_dot_product_attention(
            q[b, :, None].float(), k[b, :n].transpose(0, 1).float(), v[b, :n].transpose(0, 1).float(),
            enable_gqa=True,
        )[:, 0]
        torch.testing.assert_close(out[b], dense, atol=2e-5, rtol=2e-5)
    if backend == "triton":
        # The flash-decoding baseline (same kernels, every block) is dense decode too.
        from moba_cli.ops.moba.triton_decode import dense_decode_triton

        base = dense_decode_triton(q, k, v, strided_lens, 1.0 / math.sqrt(d))
        torch.testing.assert_close(base, out, atol=2e-5, rtol=2e-5)


# (hq, hkv, d, dtype, chunk, topk, lens, cache_len): splits of a block, several KV tiles per split,
# union of different blocks per group, half precision. bfloat16 only on a GPU: the Triton 3.6
# interpreter's tl.dot reads bfloat16 operands as raw integers.
TRITON_CASES = [
    pytest.param((4, 4, 32, torch.float32, 32, 3, [150, 65, 32], 160), id="mha-f32"),
    pytest.param((8, 2, 64, torch.float32, 24, 4, [100, 49, 1], 100), id="gqa-f32-d64"),
    pytest.param((8, 1, 32, torch.float16, 32, 3, [128, 97], 128), id="mqa-f16"),
    pytest.param((4, 2, 128, torch.float32, 32, 2, [95, 64], 96), id="gqa-f32-d128"),
    pytest.param((8, 1, 128, torch.bfloat16, 64, 3, [300, 129], 320), id="mqa-bf16-d128", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, device):
    hq, hkv, d, dtype, chunk, topk, lens, cache_len = case
    q_full, k, v, seqlens = make_case(lens, cache_len, hq, hkv, d, dtype=dtype, device=device, seed=d + hq)
    # A strided query, as sliced from a [B, Hq, 1, D] projection output.
    q = last_query(q_full, seqlens).transpose(0, 1).contiguous().transpose(0, 1)
    means = cache_block_means(k, seqlens, chunk)
    ref = moba_decode(q, k, v, seqlens, means, chunk_size=chunk, topk=topk, backend="naive")
    ref_ids = select_decode_blocks(q, means, seqlens, chunk, topk, cache_len)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # Default tiles (one per block here); small tiles, one split per block, so several tiles per
    # program; small tiles and as many programs as possible, so every block is split.
    knob_sets = ({}, {"block_n": 16, "target_programs": 1}, {"block_n": 16, "target_programs": 10**6})
    for knobs, splits in zip(knob_sets, (1, 1, -(-chunk // 16)), strict=True):
        out, plan = run_triton(q, k, v, seqlens, means, chunk, topk, **knobs)
        assert plan["n_split"] == splits
        assert torch.equal(plan["block_ids"], ref_ids)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # The union lists exactly the blocks some head of the group chose, each once.
    g = hq // hkv
    for b in range(len(lens)):
        for h in range(hkv):
            chosen = {int(x) for x in ref_ids[b, h * g : (h + 1) * g].flatten() if x >= 0}
            listed = plan["union"][b, h, : plan["count"][b, h]].tolist()
            assert sorted(listed) == sorted(chosen) and len(listed) == len(chosen)
    assert out.dtype == dtype and out.shape == q.shape


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_equal_scores_choose_earlier_blocks(backend, device):
    hq, hkv, d, chunk, cache_len = 4, 2, 32, 4, 26
    q_full, k, v, seqlens = make_case([26, 26], cache_len, hq, hkv, d, device=device, seed=5)
    # Sequence 0: every complete block holds the same keys, so every score ties.
    k[0, :24] = k[0, :4].repeat(6, 1, 1)
    q = last_query(q_full, seqlens)
    q[1] = 0.0  # sequence 1: a zero query scores every block 0
    means = cache_block_means(k, seqlens, chunk)
    ids = select_decode_blocks(q, means, seqlens, chunk, 4, cache_len)
    assert (ids[:, :, 0] == 6).all()
    assert (ids[:, :, 1:] == torch.tensor([0, 1, 2], dtype=torch.int32, device=ids.device)).all()
    if backend == "triton":
        out, plan = run_triton(q, k, v, seqlens, means, chunk, 4)
        assert torch.equal(plan["block_ids"], ids)
    else:
        out = moba_decode(q, k, v, seqlens, means, chunk_size=chunk, topk=4, backend="naive")
    ref = moba_decode(q, k, v, seqlens, means, chunk_size=chunk, topk=4, backend="naive")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_broadcast_cache_rows(device):
    """Several queries of one sequence against one cache row broadcast with stride 0 (chunked prefill)."""
    hq, hkv, d, chunk, n, t = 4, 2, 32, 8, 37, 5
    q_full, k, v, seqlens = make_case([n], n, hq, hkv, d, device=device, seed=9)
    lens = torch.arange(n - t + 1, n + 1, dtype=torch.int32, device=device)
    means = cache_block_means(k, seqlens, chunk)
    kb, vb, mb = (x.expand(t, *x.shape[1:]) for x in (k, v, means))
    q = q_full[0, n - t :]  # [t, Hq, D]: query i sits at position lens[i] - 1
    ref = moba_decode(q, kb, vb, lens, mb, chunk_size=chunk, topk=3, backend="naive")
    out, plan = run_triton(q, kb, vb, lens, mb, chunk, 3)
    assert torch.equal(plan["block_ids"], select_decode_blocks(q, mb, lens, chunk, 3, n))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full, _ = prefill_last_row(q_full, k, v, n, chunk, 3, 0)
    torch.testing.assert_close(out[-1], full, atol=2e-5, rtol=2e-5)


def direct_means(k: torch.Tensor, lens: list[int], chunk: int, nb: int) -> torch.Tensor:
    bsz, _, hkv, d = k.shape
    out = torch.zeros(bsz, nb, hkv, d)
    for b, n in enumerate(lens):
        for j in range(n // chunk):
            out[b, j] = k[b, j * chunk : (j + 1) * chunk].float().mean(0)
    return out


def test_cache_block_means_on_hf_view():
    chunk, cache_len = 5, 23
    lens = [23, 10, 9, 0]
    _, k, _, seqlens = make_case(lens, cache_len, 2, 2, 8, dtype=torch.bfloat16, seed=7)
    assert not k.is_contiguous()  # the [B, Hkv, L, D] storage, seen as [B, L, Hkv, D]
    before = k.clone()
    means = cache_block_means(k, seqlens, chunk)
    assert means.shape == (4, 5, 2, 8) and means.dtype == torch.float32
    torch.testing.assert_close(means, direct_means(k, lens, chunk, 5), atol=1e-6, rtol=1e-6)
    assert torch.equal(k.isnan(), before.isnan()) and torch.equal(k.nan_to_num(), before.nan_to_num())


def test_update_block_means_one_token_at_a_time():
    chunk, cache_len, hkv, d = 4, 22, 2, 8
    start = [0, 3, 9]
    total = [22, 13, 9]  # the last sequence stops growing
    gen = torch.Generator().manual_seed(11)
    keys = torch.randn(3, hkv, cache_len, d, generator=gen)
    store = torch.full_like(keys, float("nan"))  # a static cache, filled as tokens arrive
    for b, n in enumerate(start):
        store[b, :, :n] = keys[b, :, :n]
    k = store.transpose(1, 2)
    lens = list(start)
    means = cache_block_means(k, torch.tensor(lens, dtype=torch.int32), chunk)
    sentinel = 123.0
    done = [n // chunk for n in lens]
    for b in range(3):
        means[b, done[b] :] = sentinel  # entries of incomplete blocks: must stay untouched until complete
    while lens != total:
        old = torch.tensor(lens, dtype=torch.int32)
        for b in range(3):
            if lens[b] < total[b]:
                store[b, :, lens[b]] = keys[b, :, lens[b]]
                lens[b] += 1
        means = update_block_means(means, k, old, torch.tensor(lens, dtype=torch.int32), chunk)
        for b in range(3):
            now = lens[b] // chunk
            assert (means[b, now:] == sentinel).all()
            # A complete block's keys are never read again: poison them.
            store[b, :, done[b] * chunk : now * chunk] = float("nan")
            done[b] = now
    expected = direct_means(keys.transpose(1, 2), total, chunk, 6)
    for b, n in enumerate(total):
        full = n // chunk
        torch.testing.assert_close(means[b, :full], expected[b, :full], atol=1e-6, rtol=1e-6)


def test_update_block_means_grows_with_a_dynamic_cache():
    chunk, hkv, d = 4, 2, 8
    gen = torch.Generator().manual_seed(13)
    keys = torch.randn(1, hkv, 14, d, generator=gen)
    k = keys[:, :, :5]
    means = cache_block_means(k.transpose(1, 2), torch.tensor([5], dtype=torch.int32), chunk)
    for n in range(6, 15):  # the cache tensor itself grows one token at a time
        k = torch.cat([k, keys[:, :, n - 1 : n]], dim=2)
        grown = update_block_means(means, k.transpose(1, 2), n - 1, n, chunk)
        assert grown.shape[1] == -(-n // chunk)
        assert (grown is means) == (means.shape[1] >= -(-n // chunk))
        means = grown
    expected = direct_means(keys.transpose(1, 2), [14], chunk, 4)
    torch.testing.assert_close(means, expected, atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise_moba_error():
    q_full, k, v, seqlens = make_case([7, 5], 8, 4, 2, 32, seed=1)
    q = last_query(q_full, seqlens)
    means = cache_block_means(k, seqlens, 4)
    i64 = seqlens.long()

    def call(**over):
        args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, block_means=means)
        kw = dict(chunk_size=4, topk=2, backend="naive")
        for key, val in over.items():
            (args if key in args else kw)[key] = val
        return moba_decode(*args.values(), **kw)

    bad = {
        "q rank": dict(q=q[:, None]),
        "q batch": dict(q=q[:1]),
        "k/v shapes": dict(v_cache=v[:, :7]),
        "dtype mix": dict(q=q.half()),
        "int dtype": dict(q=q.int(), k_cache=k.int(), v_cache=v.int()),
        "heads": dict(q=q[:, :3]),
        "head dim": dict(q=q[..., :16]),
        "seqlens dtype": dict(cache_seqlens=i64),
        "seqlens length": dict(cache_seqlens=seqlens[:1]),
        "seqlens zero": dict(cache_seqlens=torch.tensor([0, 5], dtype=torch.int32)),
        "seqlens > L": dict(cache_seqlens=torch.tensor([9, 5], dtype=torch.int32)),
        "means dtype": dict(block_means=means.half()),
        "means heads": dict(block_means=means[:, :, :1]),
        "means blocks": dict(block_means=means[:, :0]),  # needs (L - 1) // chunk = 1
        "means not tensor": dict(block_means=None),
        "chunk": dict(chunk_size=0),
        "topk": dict(topk=0),
        "backend": dict(backend="cuda"),
        "scale": dict(softmax_scale=-1.0),
        "triton head dim": dict(q=q_full[:, 0, :, :24].contiguous(), k_cache=k[..., :24], v_cache=v[..., :24],
                                block_means=means[..., :24], backend="triton"),
    }
    silent = []
    for name, over in bad.items():
        try:
            call(**over)
        except MobaError:
            continue
        silent.append(name)
    assert silent == []
    with pytest.raises(MobaError):
        cache_block_means(k[0], seqlens, 4)
    with pytest.raises(MobaError):
        cache_block_means(k, seqlens, 4.0)
    with pytest.raises(MobaError):
        update_block_means(means, k, 7, 6, 4)  # shrinking
    with pytest.raises(MobaError):
        update_block_means(means, k, 0, 9, 4)  # past the cache
    with pytest.raises(MobaError):
        update_block_means(means.double(), k, 0, 4, 4)


def test_unchecked_lengths_never_sync_with_the_host(device, monkeypatch):
    # check_lengths=False (the transformers integration's decode step) must give the same output without
    # reading any device value back to the host; the default still checks the range.
    q_full, k, v, seqlens = make_case([7, 5], 8, 4, 2, 32, device=device, seed=3)
    q = last_query(q_full, seqlens)
    means = cache_block_means(k, seqlens, 4)
    checked = moba_decode(q, k, v, seqlens, means, chunk_size=4, topk=2, backend="triton")

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in an unchecked decode step")

    with monkeypatch.context() as m:
        for name in ("tolist", "item", "cpu", "__bool__", "__int__"):
            m.setattr(torch.Tensor, name, no_sync)
        unchecked = moba_decode(q, k, v, seqlens, means, chunk_size=4, topk=2, backend="triton", check_lengths=False)
    torch.testing.assert_close(unchecked, checked, atol=0, rtol=0)
    with pytest.raises(MobaError, match="cache_seqlens"):
        bad = torch.tensor([9, 5], dtype=torch.int32, device=device)
        moba_decode(q, k, v, bad, means, chunk_size=4, topk=2, backend="triton")
