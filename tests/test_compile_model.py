"""torch.compile of a converted transformers model: no graph break, and the compiled forward and training
step match eager, for the usual one-sequence rows and for rows packing several sequences.

Packed sequences are found from ``position_ids`` (positions restart mid-row). The rule is a fixed-shape
tensor function (ops/moba/packing.sequence_starts); a traced graph hands its per-token starts to the custom
ops, which read the sequence offsets themselves, so neither MoBA layers nor full layers break the graph.
"""

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import save_random_checkpoint, tiny_config  # noqa: E402

import moba_cli  # noqa: E402

LENGTH = 37
SPLIT = 20  # row 0 packs sequences of 20 and 17 tokens; row 1 holds one sequence of 37


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("compile") / "llama", tiny_config("llama", layers=2), seed=3)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(0))


def _packed_positions() -> torch.Tensor:
    row0 = torch.cat([torch.arange(SPLIT), torch.arange(LENGTH - SPLIT)])
    return torch.stack([row0, torch.arange(LENGTH)])


def _load(model_dir, full_layers):
    return moba_cli.load_model(model_dir, chunk_size=8, topk=2, backend="naive", dtype=torch.float32,
                               full_layers=full_layers)


@pytest.mark.parametrize(
    ("packed", "full_layers"),
    [(False, None), (True, None), (True, [1])],
    ids=["one-sequence-rows", "packed", "packed-with-a-full-layer"],
)
def test_compiled_model_has_no_graph_break_and_matches_eager(model_dir, packed, full_layers):
    torch.manual_seed(0)
    model = _load(model_dir, full_layers)
    ids = _ids()
    kw = {"position_ids": _packed_positions()} if packed else {}

    def step(m):
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, use_cache=False, **kw).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    eager_logits, eager_grads = step(model)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda x: model(input_ids=x, use_cache=False, **kw).logits)(ids)
    assert explain.graph_break_count == 0, [
        (r.reason, [f.name for f in r.user_stack]) for r in explain.break_reasons
    ]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    logits, grads = step(compiled)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(eager_grads)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    stats = moba_cli.integrations.moba_stats(model)
    assert sum(s["prefill_moba"] for s in stats) >= 1  # eager calls counted
    if full_layers:
        assert sum(s["prefill_full"] for s in stats) >= 1


@pytest.mark.parametrize("full_layers", [None, [1]], ids=["moba", "with-a-full-layer"])
def test_packed_rows_equal_each_sequence_alone(model_dir, full_layers):
    """Eager: blocks restart and attention stops at the position restart, as if each sequence ran alone."""
    model = _load(model_dir, full_layers)
    ids = _ids()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=_packed_positions(), use_cache=False).logits
        first = model(input_ids=ids[:1, :SPLIT], use_cache=False).logits
        second = model(input_ids=ids[:1, SPLIT:], use_cache=False).logits
        whole = model(input_ids=ids[1:], use_cache=False).logits
        crossing = model(input_ids=ids[:1], use_cache=False).logits  # the control: no restart
    torch.testing.assert_close(packed[0, :SPLIT], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, SPLIT:], second[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], whole[0], rtol=1e-5, atol=1e-5)
    assert (crossing[0, SPLIT:] - second[0]).abs().max() > 1e-2


def test_a_traced_call_leaves_the_modules_bookkeeping_alone(model_dir, monkeypatch):
    """Under tracing the attention neither counts calls nor pops the cache pre-hook's note from the
    module's ``__dict__``: torch 2.11's dynamo breaks the graph at ``__dict__.pop`` (8 breaks in a 2-layer
    model, seen on the GPU), though newer versions trace it."""
    model = _load(model_dir, None)
    attn = model.model.layers[0].self_attn
    note = {"continues": False, "static": None}
    attn.__dict__["_moba_cache_info"] = note
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        model(input_ids=_ids(), use_cache=False)
    assert attn.__dict__.get("_moba_cache_info") is note
    assert sum(s["prefill_moba"] for s in moba_cli.integrations.moba_stats(model)) == 0
    monkeypatch.undo()
    with torch.no_grad():
        model(input_ids=_ids(), use_cache=False)
    assert "_moba_cache_info" not in attn.__dict__  # eager: read and dropped
    assert sum(s["prefill_moba"] for s in moba_cli.integrations.moba_stats(model)) == 2
