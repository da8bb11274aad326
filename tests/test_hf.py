"""MoBA inside transformers models: prefill, padding, hybrid layers, decode with cached block means.

Tiny randomly initialised checkpoints are built locally (nothing is downloaded); MoBA runs on the float32
reference backend so results are exact up to float rounding.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import TINY_TYPES, save_random_checkpoint, tiny_config  # noqa: E402

from moba_cli.errors import MobaError  # noqa: E402
from moba_cli.integrations import (  # noqa: E402
    attention_mode,
    load_model,
    moba_stats,
    parse_full_layers,
    reset_moba_stats,
)
from moba_cli.integrations.attention import moba_attention_forward  # noqa: E402
from moba_cli.integrations.convert import convert_checkpoint  # noqa: E402
from moba_cli.integrations.support import check_attention_interface  # noqa: E402

CHUNK = 8
VOCAB = 128


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Source checkpoints per model type, built once for the module."""
    root = tmp_path_factory.mktemp("hf-src")
    cache: dict[str, object] = {}

    def get(model_type: str = "llama"):
        if model_type not in cache:
            cache[model_type] = save_random_checkpoint(root / model_type, tiny_config(model_type), seed=1)
        return cache[model_type]

    return get


def _convert(src, tmp_path, name: str, *, topk: int, full_layers="none", chunk: int = CHUNK):
    dst = tmp_path / name
    convert_checkpoint(src, dst, chunk_size=chunk, topk=topk, full_layers=full_layers)
    return dst


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def _logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits.float()


# --------------------------------------------------------------------------------------------- registration


def test_import_registers_lazily_without_importing_transformers():
    code = (
        "import sys, moba_cli\n"
        "assert 'transformers' not in sys.modules, 'import moba_cli imported transformers'\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "assert 'moba' in AttentionInterface._global_mapping\n"
        "assert 'moba' in AttentionMaskInterface._global_mapping\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_from_pretrained_after_import_uses_moba(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x ignores attn_implementation in config.json (pass it, or use load_model)")
    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    plain = AutoModelForCausalLM.from_pretrained(dst)
    assert plain.config._attn_implementation == "moba"
    assert plain.config.moba["topk"] == 2
    ours = load_model(dst)
    full = load_model(dst, attn="full")
    assert ours.config._attn_implementation == "moba"
    assert full.config._attn_implementation == "sdpa"
    ids = _ids(1, 40)
    plain.config.moba["backend"] = "naive"
    ours.config.moba["backend"] = "naive"
    a, b, c = _logits(plain, ids), _logits(ours, ids), _logits(full, ids)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3  # top-2 of 5 blocks is really sparse
    assert all(r["prefill_moba"] == 1 for r in moba_stats(plain))
    with attention_mode(ours, "full"):  # same weights, dense attention, then back
        torch.testing.assert_close(_logits(ours, ids), c)
    torch.testing.assert_close(_logits(ours, ids), b)


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_topk_covering_all_blocks_equals_full_attention(ckpts, tmp_path, model_type):
    try:
        check_attention_interface(model_type)
    except MobaError as e:  # e.g. qwen2_moe on transformers 4.x: convert refuses it, clearly
        pytest.skip(str(e))
    dst = _convert(ckpts(model_type), tmp_path, "moba", topk=64, full_layers="last:1")
    moba = load_model(dst, backend="naive")
    full = load_model(dst, attn="full")
    ids = _ids(2, 53)
    torch.testing.assert_close(_logits(moba, ids), _logits(full, ids), atol=1e-4, rtol=1e-4)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    out_moba = moba.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    out_full = full.generate(ids, output_logits=True, return_dict_in_generate=True, **kw)
    assert torch.equal(out_moba.sequences, out_full.sequences)
    # Decode steps with top-k covering all blocks are dense decoding.
    for a, b in zip(out_moba.logits, out_full.logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-4)
    stats = moba_stats(moba)
    assert [r["kind"] for r in stats] == ["moba", "moba", "moba", "full"]
    assert all(r["decode_moba"] == 7 for r in stats[:3]) and stats[3]["decode_full"] == 7


def test_sparse_moba_differs_from_full(ckpts, tmp_path):
    """Guards the tests below: with top-k 2 of 7 blocks the model really is not dense."""
    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    moba, full = load_model(dst, backend="naive"), load_model(dst, attn="full")
    ids = _ids(1, 56)
    diff = (_logits(moba, ids) - _logits(full, ids)).abs()
    assert diff[:, : 2 * CHUNK].max() < 1e-4  # the first two blocks see everything
    assert diff[:, -1].max() > 1e-2


# --------------------------------------------------------------------------------------------- padding


def _pad(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to one length; returns ids, attention_mask and position_ids that keep positions right."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(ckpts, tmp_path, side):
    dst = _convert(ckpts("qwen2"), tmp_path, "moba", topk=2, full_layers="last:1")
    model = load_model(dst, backend="naive")
    lengths = [61, 37, 9]
    seqs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    ids, mask, pos = _pad(seqs, side)
    batched = _logits(model, ids, attention_mask=mask, position_ids=pos)
    for i, s in enumerate(seqs):
        alone = _logits(model, s[None])
        rows = mask[i].bool()
        torch.testing.assert_close(batched[i][rows], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_from_position_ids(ckpts, tmp_path):
    """Sequences packed in one row (positions restart) attend only within themselves, blocks restart."""
    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    model = load_model(dst, backend="naive")
    a, b = _ids(1, 30, seed=3)[0], _ids(1, 27, seed=4)[0]
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(30), torch.arange(27)])[None]
    packed = _logits(model, ids, position_ids=pos)
    torch.testing.assert_close(packed[0, :30], _logits(model, a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 30:], _logits(model, b[None])[0], atol=1e-5, rtol=1e-5)


def test_packed_sequences_from_collator_cu_seqlens(ckpts, tmp_path):
    """cu_seq_lens_q/k as a flattening data collator passes them split the row even where the positions
    run on (RoPE is relative, so the second sequence still matches itself alone)."""
    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    model = load_model(dst, backend="naive")
    a, b = _ids(1, 19, seed=5)[0], _ids(1, 35, seed=6)[0]
    ids = torch.cat([a, b])[None]
    cu = torch.tensor([0, 19, 54], dtype=torch.int32)
    packed = _logits(model, ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=35, max_length_k=35)
    torch.testing.assert_close(packed[0, :19], _logits(model, a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 19:], _logits(model, b[None])[0], atol=1e-4, rtol=1e-4)
    assert (packed - _logits(model, ids)).abs().max() > 1e-3  # without the lengths: one sequence


# --------------------------------------------------------------------------------------------- hybrid


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("last:3", [1, 2, 3]), ("0,2", [0, 2]), ("none", []), ("all", [0, 1, 2, 3]), ("first:1", [0]), ("-1", [3])],
)
def test_hybrid_layers_land_on_the_right_layers(ckpts, tmp_path, spec, expected):
    dst = _convert(ckpts(), tmp_path, "moba", topk=1, full_layers=spec)
    model = load_model(dst, backend="naive")
    assert model.config.moba["full_layers"] == expected
    _logits(model, _ids(1, 24))
    stats = moba_stats(model)
    assert [r["layer"] for r in stats if r["prefill_full"] == 1] == expected
    assert [r["layer"] for r in stats if r["prefill_moba"] == 1] == [i for i in range(4) if i not in expected]


def test_full_layers_really_are_dense(ckpts, tmp_path):
    """top-k 1 (own block only) everywhere but full layers: 'all' equals the dense model, fewer does not."""
    src = ckpts()
    full = load_model(_convert(src, tmp_path, "ref", topk=1), attn="full")
    ids = _ids(1, 40)
    ref = _logits(full, ids)
    all_full = load_model(_convert(src, tmp_path, "all", topk=1, full_layers="all"), backend="naive")
    torch.testing.assert_close(_logits(all_full, ids), ref, atol=1e-5, rtol=1e-5)
    last3 = load_model(_convert(src, tmp_path, "last3", topk=1, full_layers="last:3"), backend="naive")
    assert (_logits(last3, ids) - ref).abs().max() > 1e-3


def test_parse_full_layers():
    assert parse_full_layers("last:3", 32) == [29, 30, 31]
    assert parse_full_layers("0,5,31", 32) == [0, 5, 31]
    assert parse_full_layers("4-6,1", 8) == [1, 4, 5, 6]
    assert parse_full_layers("none", 8) == [] and parse_full_layers("last:0", 8) == []
    assert parse_full_layers("-2,-1", 8) == [6, 7]
    assert parse_full_layers([3, 1, 3], 8) == [1, 3]
    for bad in ("last:9", "8", "x", "last:x", "3-1", "1,,2"):
        with pytest.raises(MobaError):
            parse_full_layers(bad, 8)


# --------------------------------------------------------------------------------------------- decode


def _cache_kw(cache) -> dict:
    # transformers 5.24 names it `cache`; earlier releases `past_key_values`.
    import inspect

    from transformers import LlamaForCausalLM

    name = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    return {name: cache}


def _forward_cached(model, ids, cache, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=True, **_cache_kw(cache), **kw).logits.float()


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decode_equals_prefill_with_real_sparsity(ckpts, tmp_path, model_type):
    """Token by token through block boundaries: the incremental decode path (cached block means) gives
    the logits that a MoBA prefill of the whole sequence gives at its last position."""
    from transformers import DynamicCache

    dst = _convert(ckpts(model_type), tmp_path, "moba", topk=3, full_layers="last:1")
    model = load_model(dst, backend="naive")
    ids = _ids(1, 60, seed=7)
    prompt = 29
    cache = DynamicCache(config=model.config)
    _forward_cached(model, ids[:, :prompt], cache)
    reset_moba_stats(model)
    for t in range(prompt, ids.shape[1]):
        step = _forward_cached(model, ids[:, t : t + 1], cache)[0, -1]
        ref = _logits(model, ids[:, : t + 1])[0, -1]
        torch.testing.assert_close(step, ref, atol=2e-5, rtol=2e-5)
    stats = moba_stats(model)
    completed = len(range((prompt + 1) // CHUNK + 1, ids.shape[1] // CHUNK + 1))  # blocks finished while decoding
    for r in stats[:3]:
        assert r["decode_moba"] == ids.shape[1] - prompt
        assert r["means_computed"] == 1  # once, at the first decode step
        assert r["means_updated"] == completed  # then once per completed block, never from all keys
    assert stats[3]["decode_full"] == ids.shape[1] - prompt and stats[3]["means_computed"] == 0
    # The first decode step's position holds a full distinct sparse pattern: make sure it is not dense.
    full = load_model(dst, attn="full")
    assert (_logits(full, ids)[0, -1] - _logits(model, ids)[0, -1]).abs().max() > 1e-3


def test_multi_token_continuation_equals_prefill(ckpts, tmp_path):
    """A second chunk of several tokens on top of a cache (chunked prefill, a second turn)."""
    from transformers import DynamicCache

    dst = _convert(ckpts("mistral"), tmp_path, "moba", topk=2, full_layers="1")
    model = load_model(dst, backend="naive")
    ids = _ids(1, 58, seed=9)
    cache = DynamicCache(config=model.config)
    _forward_cached(model, ids[:, :21], cache)
    second = _forward_cached(model, ids[:, 21:], cache)
    ref = _logits(model, ids)
    torch.testing.assert_close(second[0], ref[0, 21:], atol=2e-5, rtol=2e-5)


def test_left_padded_batch_generation_equals_single(ckpts, tmp_path):
    dst = _convert(ckpts("llama"), tmp_path, "moba", topk=2, full_layers="last:1")
    model = load_model(dst, backend="naive")
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (30, 45, 45)]
    ids, mask, _ = _pad(seqs, "left")
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, s in enumerate(seqs):
        alone = model.generate(s[None], **kw)
        assert torch.equal(batched.sequences[i, ids.shape[1]:], alone.sequences[0, len(s):])
        for a, b in zip(batched.logits, alone.logits, strict=True):
            torch.testing.assert_close(a[i].float(), b[0].float(), atol=2e-5, rtol=2e-5)


def test_interleaved_caches_stay_correct(ckpts, tmp_path):
    """Two caches decoded alternately: each step still matches a prefill (means rebuilt when needed)."""
    from transformers import DynamicCache

    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    model = load_model(dst, backend="naive")
    seqs = [_ids(1, 44, seed=20), _ids(1, 44, seed=21)]
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    for s, c in zip(seqs, caches, strict=True):
        _forward_cached(model, s[:, :30], c)
    for t in range(30, 44):
        for s, c in zip(seqs, caches, strict=True):
            step = _forward_cached(model, s[:, t : t + 1], c)[0, -1]
            torch.testing.assert_close(step, _logits(model, s[:, : t + 1])[0, -1], atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------- errors


class _FakeAttention(torch.nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx


def test_attention_function_rejects_what_it_cannot_serve():
    cfg = tiny_config("llama")
    cfg.moba = {"version": 1, "chunk_size": 4, "topk": 2, "full_layers": [], "backend": "naive"}
    mod = _FakeAttention(cfg)
    q = torch.randn(1, 2, 8, 32)
    k = torch.randn(1, 1, 8, 32)
    with pytest.raises(MobaError, match="sliding"):
        moba_attention_forward(mod, q, k, k, None, sliding_window=4)
    with pytest.raises(MobaError, match="dropout"):
        moba_attention_forward(mod, q, k, k, None, dropout=0.1)
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with pytest.raises(MobaError, match="contiguous"):
        moba_attention_forward(mod, q, k, k, holes)
    out, weights = moba_attention_forward(mod, q, k, k, None, scaling=0.3)
    assert out.shape == (1, 8, 2, 32) and weights is None
    cfg.moba = None
    with pytest.raises(MobaError, match="no 'moba' settings"):
        moba_attention_forward(mod, q, k, k, None)


def test_scaling_is_honoured():
    """The model's softmax scale reaches the kernel: a different scale changes the output."""
    cfg = tiny_config("llama")
    cfg.moba = {"version": 1, "chunk_size": 4, "topk": 8, "full_layers": [], "backend": "naive"}
    mod = _FakeAttention(cfg)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 12, 32, generator=g), torch.randn(1, 1, 12, 32, generator=g), torch.randn(
        1, 1, 12, 32, generator=g
    )
    out, _ = moba_attention_forward(mod, q, k, v, None, scaling=0.05)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.05, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_load_model_errors(ckpts, tmp_path):
    with pytest.raises(MobaError, match="no config.json"):
        load_model(tmp_path / "missing")
    with pytest.raises(MobaError, match="no MoBA settings"):
        load_model(ckpts())
    model = load_model(ckpts(), chunk_size=CHUNK, topk=64, backend="naive")  # plain checkpoint + settings
    assert model.config._attn_implementation == "moba"
    with pytest.raises(MobaError, match="only apply"):
        load_model(ckpts(), attn="full", topk=3)


@pytest.mark.slow
def test_triton_backend_inside_the_model(tmp_path):
    """The kernels (Triton interpreter on CPU) read the model's strided [B, S, H, D] views and cache views:
    padded prefill and left-padded generation equal the float32 reference backend."""
    src = save_random_checkpoint(tmp_path / "src", tiny_config("llama", layers=2), seed=2)
    dst = _convert(src, tmp_path, "moba", topk=2, full_layers="last:1")
    tri, ref = load_model(dst, backend="triton"), load_model(dst, backend="naive")
    seqs = [_ids(1, n, seed=30 + n)[0] for n in (33, 26)]
    ids, mask, _ = _pad(seqs, "left")
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0, "output_logits": True,
          "return_dict_in_generate": True}
    a, b = tri.generate(ids, attention_mask=mask, **kw), ref.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    first = moba_stats(tri)[0]
    assert first["decode_moba"] == 2 and first["means_computed"] == 2  # once per row group (two paddings)


@pytest.mark.parametrize("loader", ["load_model", "from_pretrained"])
def test_static_cache_is_refused(ckpts, tmp_path, loader):
    """A preallocated cache hands attention padded key buffers: refused with a clear error, never wrong.
    from_pretrained models get the cache pre-hook only on their first call: the position check covers it."""
    from transformers import AutoModelForCausalLM

    dst = _convert(ckpts(), tmp_path, "moba", topk=2)
    if loader == "load_model":
        model = load_model(dst, backend="naive")
    else:
        model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="moba")
        model.config.moba["backend"] = "naive"
    with pytest.raises(MobaError, match="dynamic"):
        model.generate(_ids(1, 20), max_new_tokens=2, do_sample=False, cache_implementation="static",
                       pad_token_id=0)


def test_row_spans_from_masks():
    from moba_cli.integrations.masks import row_spans

    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sp = row_spans(left, 2, 5)
    assert (sp.starts, sp.ends) == ([2, 0], [5, 5])
    left[1, 0] = 0  # the same tensor edited in place must not reuse the cached spans
    assert row_spans(left, 2, 5).starts == [2, 1]
    right = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    assert (row_spans(right, 1, 5).starts, row_spans(right, 1, 5).ends) == ([0], [3])
    assert row_spans(torch.ones(2, 5, dtype=torch.bool), 2, 5) is None
    additive = torch.zeros(1, 1, 5, 5)
    additive[..., :2] = torch.finfo(torch.float32).min  # a 4-D additive mask: two left pads
    assert row_spans(additive, 1, 5).starts == [2]
    with pytest.raises(MobaError, match="keys are"):
        row_spans(torch.ones(1, 4, dtype=torch.bool), 1, 5)


# --------------------------------------------------------------------------------------------- layout


def test_integrations_modules_have_no_cycles_no_private_imports_and_stay_small():
    """The transformers glue by concern: no import cycle among its modules, no other module's ``_name``
    imported, nothing from the command layer, no file over 500 lines; the stable names all resolve."""
    import ast
    from pathlib import Path

    import moba_cli.integrations as integ

    folder = Path(integ.__file__).parent
    graph: dict[str, set[str]] = {}
    for f in sorted(folder.glob("*.py")):
        text = f.read_text()
        assert len(text.splitlines()) <= 500, f.name
        deps = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moba_cli"):
                assert not node.module.startswith("moba_cli.commands"), f.name
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, (f.name, node.module, private)
                if node.module.startswith("moba_cli.integrations."):
                    deps.add(node.module.rsplit(".", 1)[1])
        graph[f.stem] = deps

    def visit(mod: str, path: list[str]) -> None:
        for dep in graph.get(mod, ()):
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for mod in graph:
        visit(mod, [mod])
    for name in integ.__all__:
        assert getattr(integ, name) is not None, name
