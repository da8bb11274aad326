"""Every bad input to the public API raises MobaError with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

from moba_cli import MobaError, full_attention, moba_attention


def t(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


def good(**over):
    """A valid padded call, with some arguments replaced."""
    args = {"q": t(1, 8, 4, 16), "k": t(1, 8, 2, 16), "v": t(1, 8, 2, 16), "chunk_size": 4, "topk": 2,
            "backend": "naive"}
    args.update(over)
    return args


def packed(**over):
    args = {"q": t(10, 2, 16), "k": t(10, 2, 16), "v": t(10, 2, 16), "chunk_size": 4, "topk": 2,
            "cu_seqlens": torch.tensor([0, 3, 10], dtype=torch.int32), "backend": "naive"}
    args.update(over)
    return args


def call(args: dict) -> torch.Tensor:
    a = dict(args)
    return moba_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def test_valid_calls_pass():
    assert call(good()).shape == (1, 8, 4, 16)
    assert call(packed()).shape == (10, 2, 16)


CASES = {
    "dtype mismatch": (good(k=t(1, 8, 2, 16, dtype=torch.float16)), "share one dtype"),
    "float64": (good(q=t(1, 8, 4, 16, dtype=torch.float64), k=t(1, 8, 2, 16, dtype=torch.float64),
                     v=t(1, 8, 2, 16, dtype=torch.float64)), "not supported"),
    "int inputs": (good(q=torch.ones(1, 8, 4, 16, dtype=torch.int32), k=torch.ones(1, 8, 2, 16, dtype=torch.int32),
                        v=torch.ones(1, 8, 2, 16, dtype=torch.int32)), "not supported"),
    "not a tensor": (good(q=[[1.0]]), "must be a torch.Tensor"),
    "rank 3 without cu_seqlens": (good(q=t(8, 4, 16), k=t(8, 2, 16), v=t(8, 2, 16)), "rank 4"),
    "rank 5": (good(q=t(1, 1, 8, 4, 16)), "rank 4"),
    "rank 4 with cu_seqlens": (packed(q=t(1, 10, 2, 16), k=t(1, 10, 2, 16), v=t(1, 10, 2, 16)), "rank 3"),
    "k v shapes differ": (good(v=t(1, 8, 1, 16)), "k and v must have the same shape"),
    "q k lengths differ": (good(k=t(1, 9, 2, 16), v=t(1, 9, 2, 16)), "token dimensions"),
    "head dims differ": (good(k=t(1, 8, 2, 8), v=t(1, 8, 2, 8)), "same head dim"),
    "Hq not multiple of Hkv": (good(q=t(1, 8, 6, 16), k=t(1, 8, 4, 16), v=t(1, 8, 4, 16)), "multiple of"),
    "chunk 0": (good(chunk_size=0), "chunk_size must be a positive integer"),
    "chunk negative": (good(chunk_size=-4), "chunk_size must be a positive integer"),
    "chunk float": (good(chunk_size=4.0), "chunk_size must be a positive integer"),
    "chunk bool": (good(chunk_size=True), "chunk_size must be a positive integer"),
    "chunk str": (good(chunk_size="4"), "chunk_size must be a positive integer"),
    "topk 0": (good(topk=0), "topk must be an integer >= 1"),
    "topk float": (good(topk=2.0), "topk must be an integer >= 1"),
    "softmax_scale 0": (good(softmax_scale=0.0), "softmax_scale must be a finite positive number"),
    "softmax_scale inf": (good(softmax_scale=float("inf")), "softmax_scale must be a finite positive number"),
    "softmax_scale nan": (good(softmax_scale=float("nan")), "softmax_scale must be a finite positive number"),
    "softmax_scale str": (good(softmax_scale="0.5"), "softmax_scale must be a finite positive number"),
    "softmax_scale bool": (good(softmax_scale=True), "softmax_scale must be a finite positive number"),
    "chunk over int32": (good(chunk_size=2**31), "chunk_size must be at most 2147483647"),
    "chunk 2^63": (good(chunk_size=2**63), "chunk_size must be at most 2147483647"),
    "topk over int32": (good(topk=2**40), "topk must be at most 2147483647"),
    "cu_seqlens not from 0": (packed(cu_seqlens=torch.tensor([1, 3, 10], dtype=torch.int32)), "start at 0"),
    "cu_seqlens decreasing": (packed(cu_seqlens=torch.tensor([0, 7, 3, 10], dtype=torch.int32)), "non-decreasing"),
    "cu_seqlens wrong end": (packed(cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)), "ends at 9"),
    "cu_seqlens int64": (packed(cu_seqlens=torch.tensor([0, 3, 10])), "must be int32"),
    "cu_seqlens float": (packed(cu_seqlens=torch.tensor([0.0, 3.0, 10.0])), "must be int32"),
    "cu_seqlens 2-D": (packed(cu_seqlens=torch.tensor([[0, 3, 10]], dtype=torch.int32)), "1-D"),
    "cu_seqlens one entry": (packed(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "1-D"),
    "cu_seqlens list": (packed(cu_seqlens=[0, 3, 10]), "1-D"),
    "cu_seqlens on meta": (packed(cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32, device="meta")), "must be on"),
    "max_seqlen too small": (packed(max_seqlen=5), "max_seqlen=5"),
    "unknown backend": (good(backend="flash"), "unknown backend 'flash'"),
    "position_ids with cu_seqlens": (packed(position_ids=torch.arange(10)[None]), "not both"),
    "position_ids float": (good(position_ids=torch.arange(8.0)[None]), "integer tensor"),
    "position_ids 1-D": (good(position_ids=torch.arange(8)), "must be [1, 8] for q"),
    "position_ids too short": (good(position_ids=torch.arange(7)[None]), "got (1, 7)"),
    "position_ids batch": (good(position_ids=torch.arange(8).expand(3, 8)), "got (3, 8)"),
    "position_ids list": (good(position_ids=list(range(8))), "must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_moba_error(case):
    args, needle = CASES[case]
    with pytest.raises(MobaError) as info:
        call(args)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_moba_error_is_a_value_error():
    # Library users who catch ValueError keep working.
    assert issubclass(MobaError, ValueError)


def test_device_mismatch_on_meta():
    # A second real device is not needed: 'meta' tensors are a different device to the check.
    with pytest.raises(MobaError, match="one device"):
        call(good(k=t(1, 8, 2, 16, device="meta"), v=t(1, 8, 2, 16, device="meta")))
    with pytest.raises(MobaError, match="one device"):
        full_attention(t(1, 8, 4, 16), t(1, 8, 2, 16, device="meta"), t(1, 8, 2, 16, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a real second device")
def test_device_mismatch_cpu_cuda():
    with pytest.raises(MobaError, match="one device"):
        call(good(k=t(1, 8, 2, 16, device="cuda"), v=t(1, 8, 2, 16, device="cuda")))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MobaError, match="needs CUDA tensors"):
        call(good(backend="triton"))
    # 'auto' on CPU outside the interpreter quietly means the reference.
    args = good()
    torch.testing.assert_close(call({**args, "backend": "auto"}), call(args), rtol=0, atol=0)


def test_triton_head_dim_checked_before_anything_runs(monkeypatch):
    # Under the interpreter the CPU is allowed, so only the head dim is wrong here.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for d in (48, 96, 256):
        with pytest.raises(MobaError, match=f"head dim {d}"):
            call(good(q=t(1, 8, 4, d), k=t(1, 8, 2, d), v=t(1, 8, 2, d), backend="triton"))


@pytest.mark.parametrize("case", ["dtype mismatch", "rank 5", "Hq not multiple of Hkv", "cu_seqlens wrong end",
                                  "float64", "position_ids with cu_seqlens", "position_ids batch"])
def test_full_attention_shares_the_checks(case):
    args, needle = CASES[case]
    a = dict(args)
    with pytest.raises(MobaError) as info:
        full_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)
    assert needle in str(info.value)


def test_full_attention_unknown_backend():
    with pytest.raises(MobaError, match="unknown backend"):
        full_attention(t(1, 8, 4, 16), t(1, 8, 2, 16), t(1, 8, 2, 16), backend="flash")


def test_empty_sequences_in_cu_seqlens_are_valid():
    # Zero-length sequences are legal (non-decreasing offsets); they must not break the op.
    args = packed(cu_seqlens=torch.tensor([0, 0, 3, 3, 10], dtype=torch.int32))
    out = call(args)
    ref = full_attention(args["q"], args["k"], args["v"], cu_seqlens=args["cu_seqlens"], backend="naive")
    assert out.shape == (10, 2, 16)
    # topk 2 with chunk 4: the 7-token sequence has 2 blocks, so this is full attention.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_interpreter_refuses_bfloat16(monkeypatch):
    # Triton 3.6's interpreter misreads bfloat16 matrix-product operands: explicit triton is an error,
    # auto takes the float32 reference instead of returning garbage.
    from moba_cli.ops.moba.validate import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(4, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(MobaError, match="bfloat16"):
        resolve_backend("triton", q)
    assert resolve_backend("auto", q) == "naive"
    assert resolve_backend("auto", q.float()) == "triton"
    assert resolve_backend("triton", q.half()) == "triton"


def test_numpy_integers_are_integers():
    np = pytest.importorskip("numpy")
    base = good()
    want = call(base)
    for kind in (np.int32, np.int64, np.uint16):
        assert torch.equal(call({**base, "chunk_size": kind(4), "topk": kind(2)}), want)
    assert torch.equal(call({**base, "softmax_scale": np.float32(0.25)}), call({**base, "softmax_scale": 0.25}))
    with pytest.raises(MobaError, match="chunk_size must be a positive integer"):
        call({**base, "chunk_size": np.float64(4.0)})


@pytest.mark.parametrize("fn", [moba_attention, full_attention])
def test_autocast_casts_inputs_like_sdpa(fn):
    # Under autocast, q/k in float32 and v in bfloat16 are one bf16 call (SDPA does the same); the
    # gradients reach the float32 leaves in their own dtype. Outside autocast mixed dtypes stay an error.
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 37, h, 16, generator=g).requires_grad_() for h in (4, 2))
    v = torch.randn(2, 37, 2, 16, generator=g).bfloat16().requires_grad_()
    kw = {"chunk_size": 8, "topk": 2, "backend": "naive"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(q, k, v, **kw)
    assert out.dtype == torch.bfloat16
    want = fn(q.detach().bfloat16(), k.detach().bfloat16(), v.detach(), **kw)
    assert torch.equal(out, want)
    out.float().pow(2).sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert all(x.grad.abs().sum() > 0 for x in (q, k, v))
    with pytest.raises(MobaError, match="share one dtype"):
        fn(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False), pytest.raises(MobaError, match="share one"):
        fn(q, k, v, **kw)
