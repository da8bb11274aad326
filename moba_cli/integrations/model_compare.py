"""Compare a converted checkpoint with MoBA against the same weights with full attention.

One model is loaded; :func:`moba_cli.integrations.loading.attention_mode` switches it between MoBA and
transformers' dense SDPA attention, so both runs share every weight. Reported: per-layer hidden-state
differences, final-logit differences (max abs, relative L2, top-1 agreement, KL(full || MoBA)) and the
perplexity of each on the text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moba_cli.errors import MobaError
from moba_cli.integrations.settings import first_line

_WORDS = (
    "the a of and to in is was for on with as by at from that this it an be are were which or has had "
    "block attention model token query key value memory context long short gate mixture sparse dense "
    "river mountain city library window garden signal number letter record story question answer"
).split()
_LOGIT_TILE = 1024


@dataclass
class TokenizedText:
    ids: torch.Tensor  # [1, S] int64
    tokenizer: str  # "tokenizer" or "bytes"
    source: str  # file name or "generated"
    notes: list[str] = field(default_factory=list)


def generated_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic filler prose with recurring 'facts' (so long-range lookups exist): ``n_chars`` characters."""
    rng = random.Random(seed)
    facts = [f"the code of {rng.choice(_WORDS)} {i} is {rng.randint(1000, 9999)}." for i in range(16)]
    parts: list[str] = []
    size = 0
    while size < n_chars:
        if rng.random() < 0.15:
            s = rng.choice(facts)
        else:
            s = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 16))) + "."
        parts.append(s)
        size += len(s) + 1
    return " ".join(parts)[:n_chars]


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return any((path / n).is_file() for n in names)


def tokenize(path: Path, text_file: Path | None, seq: int, vocab_size: int) -> TokenizedText:
    """Token ids for the comparison: the checkpoint's tokenizer when it has one, else UTF-8 bytes."""
    notes: list[str] = []
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise MobaError(f"--text file {text_file} does not exist") from None
        except OSError as e:
            raise MobaError(f"cannot read --text file {text_file}: {e.strerror or e}") from None
        if not text.strip():
            raise MobaError(f"--text file {text_file} is empty")
        source = str(text_file)
    else:
        text = generated_text(8 * seq)
        source = "generated"
    ids: list[int]
    if _has_tokenizer(path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure falls back to bytes, said aloud
            notes.append(f"the tokenizer in {path} could not be loaded ({first_line(e)}); using bytes")
        else:
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
            return _finish(ids, seq, "tokenizer", source, notes)
    else:
        notes.append(f"{path} has no tokenizer: token ids are the text's UTF-8 bytes")
    ids = list(text.encode("utf-8"))
    if vocab_size < 256:
        notes.append(f"the vocabulary has {vocab_size} entries: byte ids are taken modulo {vocab_size}")
        ids = [i % vocab_size for i in ids]
    return _finish(ids, seq, "bytes", source, notes)


def _finish(ids: list[int], seq: int, kind: str, source: str, notes: list[str]) -> TokenizedText:
    if len(ids) < 2:
        raise MobaError("the text gives fewer than 2 tokens; nothing to compare")
    if len(ids) > seq:
        ids = ids[:seq]
    elif len(ids) < seq:
        notes.append(f"the text has {len(ids)} tokens, fewer than --seq {seq}: comparing {len(ids)}")
    return TokenizedText(torch.tensor([ids], dtype=torch.long), kind, source, notes)


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """a (MoBA) against b (full): max abs, relative L2 and mean per-token cosine similarity."""
    a, b = a.float().flatten(0, -2), b.float().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "max_abs": float((a - b).abs().max()),
        "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
    }


def _logit_stats(model: Any, h_moba: torch.Tensor, h_full: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """Logit differences and next-token losses, a tile of tokens at a time (vocab x seq never materialised)."""
    head = model.get_output_embeddings()
    targets = ids[0, 1:]
    n = h_moba.shape[1]
    acc = {"max_abs": 0.0, "sq_diff": 0.0, "sq_full": 0.0, "top1": 0, "kl": 0.0, "nll_moba": 0.0, "nll_full": 0.0}
    for t0 in range(0, n, _LOGIT_TILE):
        t1 = min(n, t0 + _LOGIT_TILE)
        lm = head(h_moba[0, t0:t1]).float()
        lf = head(h_full[0, t0:t1]).float()
        acc["max_abs"] = max(acc["max_abs"], float((lm - lf).abs().max()))
        acc["sq_diff"] += float(((lm - lf) ** 2).sum())
        acc["sq_full"] += float((lf**2).sum())
        acc["top1"] += int((lm.argmax(-1) == lf.argmax(-1)).sum())
        pm, pf = torch.log_softmax(lm, -1), torch.log_softmax(lf, -1)
        acc["kl"] += float((pf.exp() * (pf - pm)).sum())
        tgt_end = min(t1, n - 1)
        if tgt_end > t0:
            tg = targets[t0:tgt_end]
            acc["nll_moba"] += float(-pm[: tgt_end - t0].gather(1, tg[:, None]).sum())
            acc["nll_full"] += float(-pf[: tgt_end - t0].gather(1, tg[:, None]).sum())
    n_pred = n - 1
    kl = acc["kl"] / n
    stats = {
        "max_abs": acc["max_abs"],
        "rel_l2": math.sqrt(acc["sq_diff"] / max(acc["sq_full"], 1e-30)),
        "top1_agreement": acc["top1"] / n,
        "kl_full_moba_mean": max(kl, 0.0),
        "ppl_moba": math.exp(acc["nll_moba"] / n_pred),
        "ppl_full": math.exp(acc["nll_full"] / n_pred),
    }
    if kl < 0:  # KL is never negative; near-identical distributions can round below 0 in float32
        stats["kl_note"] = f"KL(full||MoBA) came out as {kl:.3g}, below 0 only by float32 rounding: reported as 0"
    return stats


def compare_model(
    path: str | Path,
    text: str | Path | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seq: int,
    backend: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], list[str]]:
    """Run the checkpoint at ``path`` with MoBA and with full attention on one text.

    Returns ``(config, records, summary, notes)`` for :func:`moba_cli.results.make_result`: one record per
    hidden state (embeddings, then each layer's output), the logit and perplexity numbers in ``summary``.
    """
    from moba_cli.integrations.loading import attention_mode, load_model, moba_stats, reset_moba_stats
    from moba_cli.integrations.settings import MobaSettings
    from moba_cli.integrations.sparsity import expected_sparsity

    path = Path(path)
    if text is not None and Path(text).is_dir():
        raise MobaError(f"--text {text} is a folder; give a text file")
    if text is not None and not Path(text).is_file():
        raise MobaError(f"--text file {text} does not exist")
    model = load_model(path, backend=backend, dtype=dtype)
    model.to(device).eval()
    settings = MobaSettings.from_config(model.config)
    tok = tokenize(path, Path(text) if text is not None else None, seq, model.config.vocab_size)
    ids = tok.ids.to(device)
    n = ids.shape[1]
    base = model.get_decoder()
    reset_moba_stats(model)
    with torch.no_grad():
        out_m = base(input_ids=ids, output_hidden_states=True)
        with attention_mode(model, "full"):
            out_f = base(input_ids=ids, output_hidden_states=True)
        hs_m, hs_f = out_m.hidden_states, out_f.hidden_states
        if hs_m is None or len(hs_m) != model.config.num_hidden_layers + 1:
            raise MobaError("this model does not report one hidden state per layer; cannot compare per layer")
        final_normed = torch.equal(hs_m[-1], out_m.last_hidden_state)
        records = []
        full_layers = set(settings.full_layers)
        for i, (a, b) in enumerate(zip(hs_m, hs_f, strict=True)):
            if i == 0:
                name, kind = "embeddings", "-"
            else:
                name, kind = f"layer {i - 1}", "full" if i - 1 in full_layers else "moba"
                if i == len(hs_m) - 1 and final_normed:
                    name += " (+final norm)"
            records.append({"index": i, "name": name, "attention": kind, **_diff(a, b)})
        logits = _logit_stats(model, out_m.last_hidden_state, out_f.last_hidden_state, ids)
    used = moba_stats(model)
    moba_calls = sum(r["prefill_moba"] for r in used)
    if moba_calls != model.config.num_hidden_layers - len(full_layers):
        raise MobaError(f"MoBA served {moba_calls} layers instead of the expected number; is attention patched?")
    config = {
        "model": str(path), "text": tok.source, "tokenizer": tok.tokenizer, "seq": seq, "tokens": n,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "chunk_size": settings.chunk_size, "topk": settings.topk, "full_layers": list(settings.full_layers),
        "backend": settings.backend, "full_attention": "sdpa",
    }
    summary = {
        "tokens": n,
        "blocks": -(-n // settings.chunk_size),
        "sparsity_moba_layer": expected_sparsity(n, settings.chunk_size, settings.topk),
        "logits": logits,
        "ppl_moba": logits["ppl_moba"],
        "ppl_full": logits["ppl_full"],
        "ppl_ratio": logits["ppl_moba"] / logits["ppl_full"],
        "last_layer_rel_l2": records[-1]["rel_l2"],
        "tokenizer": tok.tokenizer,
    }
    return config, records, summary, tok.notes + ([logits["kl_note"]] if "kl_note" in logits else [])
