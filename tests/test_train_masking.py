"""Document masking: a packed row (position_ids restarting per document) equals each document run alone."""

from __future__ import annotations

import pytest
import torch

from moba_cli.train.config import recipe_from_dict
from moba_cli.train.losses import token_loss
from moba_cli.train.model import build_model

DOCS = [23, 9, 32]  # odd lengths, one longer than two MoBA blocks


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).float().pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def _model(kind: str, full_layers: str = "none", full_impl: str = "sdpa"):
    r = recipe_from_dict({"model": {"size": "tiny", "layers": 3}, "data": {"seq_len": 64},
                          "attention": {"kind": kind, "chunk": 8, "topk": 2, "full_layers": full_layers,
                                        "full_impl": full_impl},
                          "train": {"seed": 3}})
    model = build_model(r, vocab_size=97, device_type="cpu")
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=1.0)  # sharp attention: masking errors show
    return model.eval()


@pytest.mark.parametrize("kind, full_layers, full_impl",
                         [("moba", "none", "sdpa"), ("full", "none", "sdpa"), ("moba", "last:1", "sdpa"),
                          ("full", "none", "moba_dense")])
def test_packed_row_equals_per_document_forward(kind, full_layers, full_impl):
    torch.manual_seed(0)
    model = _model(kind, full_layers, full_impl)
    ids = torch.randint(0, 97, (1, sum(DOCS)))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(input_ids=part, use_cache=False).logits for part in ids.split(DOCS, dim=1)], 1)
        # The control: the same row without restarting positions attends across documents.
        crossing = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(packed).all()
    assert _rel_rms(packed, alone) < 1e-5
    start = DOCS[0]
    assert _rel_rms(crossing[:, start:], alone[:, start:]) > 1e-2


def test_loss_mask_and_gradients_stay_in_document():
    """The gradient of a later document's loss reaches none of the earlier documents' inputs."""
    torch.manual_seed(1)
    model = _model("moba")
    ids = torch.randint(0, 97, (2, sum(DOCS)))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None].expand(2, -1)
    labels = ids.clone()
    labels[:, : DOCS[0] + DOCS[1] + 1] = -100  # loss only on predictions inside the last document
    emb = model.model.embed_tokens
    hidden = emb(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=hidden, position_ids=pos, use_cache=False).logits
    tgt = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), tgt.clamp_min(0), reduction="none")
    (loss * (tgt != -100)).sum().backward()
    grad = hidden.grad.abs().sum(-1)  # [B, S]
    assert grad[:, : DOCS[0] + DOCS[1]].max() == 0
    assert grad[:, DOCS[0] + DOCS[1] : -1].min() > 0  # the last token predicts nothing
    losses, mask = token_loss(model, ids, labels, pos)
    assert mask.sum() == 2 * (DOCS[2] - 1) and losses[~mask].abs().max() == 0


def test_moba_dense_full_attention_matches_sdpa_and_counts_full_calls():
    """``full_impl: moba_dense`` (full_attention per packed sequence, no mask tensor) gives the logits and
    gradients of transformers' SDPA with its block-diagonal mask, on the same weights; every layer is full."""
    from moba_cli.integrations import moba_stats

    torch.manual_seed(2)
    ids = torch.randint(0, 97, (2, sum(DOCS)))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None].expand(2, -1)
    runs = []
    for impl in ("sdpa", "moba_dense"):
        model = _model("full", full_impl=impl)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        runs.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone(), model))
    (a, ga, _), (b, gb, dense) = runs
    assert _rel_rms(b, a) < 1e-5 and _rel_rms(gb, ga) < 1e-4
    stats = moba_stats(dense)
    assert sum(s["prefill_full"] for s in stats) == 3 and sum(s["prefill_moba"] for s in stats) == 0
