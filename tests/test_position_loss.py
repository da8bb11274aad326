"""Loss by position: matches a plain cross-entropy over the full logits, in bounded row chunks."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import random_model, tiny_config  # noqa: E402

from moba_cli.evals.position_loss import bucket_means, token_losses  # noqa: E402


def test_token_losses_match_full_logits():
    torch.manual_seed(0)
    model = random_model(tiny_config("llama"))
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    got = token_losses(model, ids, chunk_rows=5)
    logits = model(ids).logits[:, :-1].float()
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert got.shape == (2, 36)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bucket_means_edges():
    losses = torch.arange(10, dtype=torch.float32)[None].repeat(3, 1)
    assert bucket_means(losses, 1) == [4.5]
    assert bucket_means(losses, 3) == [1.0, 4.0, 7.5]  # [0,3), [3,6), [6,10)
    with pytest.raises(ValueError):
        bucket_means(losses, 11)
