"""torch.compile of a converted transformers model: the compiled forward and training step match eager.

The attention op itself is captured (a torch.library custom op, tests/test_custom_op.py has no break at
all); in a transformers model the only graph breaks left are the packed-sequence check on position_ids
(integrations/masks.packed_cu_seqlens, a data-dependent test once per layer), which this test pins down."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import save_random_checkpoint, tiny_config  # noqa: E402

import moba_cli  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("compile") / "llama", tiny_config("llama", layers=2), seed=3)


def test_compiled_model_matches_eager_without_attention_breaks(model_dir):
    torch.manual_seed(0)
    model = moba_cli.load_model(model_dir, chunk_size=8, topk=2, backend="naive", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))

    def step(m):
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    eager_logits, eager_grads = step(model)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda x: model(input_ids=x, use_cache=False).logits)(ids)
    for reason in explain.break_reasons:
        where = [frame.name for frame in reason.user_stack]
        assert "packed_cu_seqlens" in where, (reason.reason, where)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    logits, grads = step(compiled)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(eager_grads)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert sum(s["prefill_moba"] for s in moba_cli.integrations.moba_stats(model)) >= 2  # eager calls counted
