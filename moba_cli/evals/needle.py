"""Needle in a haystack: the grid, prompts with the needle at an exact token depth, and two scores.

A prompt is built from token ids, never from re-tokenized text, so its length and the needle's place are
exact for any tokenizer::

    [special prefix] preamble  haystack[:p]  needle  haystack[p:h]  question
                     |<------------------------ length tokens ------------------------->|

with ``h`` haystack tokens filling the length and ``p = round(depth / 100 * h)``: depth 0 puts the needle
right after the preamble, depth 100 right before the question.

Scores of one sample (both are kept in each cell):

* ``exact``: the value appears in the greedy answer (MoBA prefill, then MoBA decode steps).
* ``rank``/``logprob``: the log-probability of the value's tokens after the prompt, against distractor
  values of the same form; rank 1 means the true value scored highest. Small base models that never
  answer verbatim still show whether the needle's value is preferred.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch

from moba_cli.errors import MobaError

DEFAULT_NEEDLE = "One of the special magic numbers for {key} is: {value}."
DEFAULT_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
_ADJ = (
    "amber brave calm dusty eager fuzzy gentle hollow icy jolly kind lively misty noble odd proud quiet rapid "
    "silent tidy vast warm young zesty bitter clever faint grand humble loyal"
).split()
_NOUN = (
    "anchor basket candle desert engine falcon garden harbor island jacket kettle ladder meadow needle orchard "
    "pepper quarry river saddle tunnel valley walnut yacht zebra beacon canyon dolphin ember forest glacier"
).split()


@dataclass(frozen=True)
class Templates:
    """The needle (with ``{key}`` and ``{value}``) and the question (with ``{key}``), user-settable."""

    needle: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    preamble: str = PREAMBLE

    def check(self) -> None:
        for name, text, need in (("--needle", self.needle, ("{key}", "{value}")), ("--question", self.question,
                                                                                       ("{key}",))):
            missing = [p for p in need if p not in text]
            if missing:
                raise MobaError(f"{name} template {text!r} lacks the placeholder {' and '.join(missing)}")
        if "{value}" in self.question:
            raise MobaError("--question must not contain {value}: it would give the answer away")

    def fill_needle(self, key: str, value: str) -> str:
        return self.needle.replace("{key}", key).replace("{value}", value)

    def fill_question(self, key: str) -> str:
        return self.question.replace("{key}", key)


def parse_depths(spec: str) -> list[float]:
    """``"11"`` -> 0, 10, ..., 100 (percent); ``"0,25,50"`` -> those depths. A count is 1..101."""
    text = str(spec).strip()
    if "," in text:
        try:
            depths = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise MobaError(f"--depths {spec!r}: write a count (e.g. 11) or percentages like 0,25,50,75,100") from None
        if not depths or any(not 0 <= d <= 100 for d in depths):
            raise MobaError(f"--depths {spec!r}: every depth must be between 0 and 100 percent")
        return sorted(set(depths))
    try:
        n = int(text)
    except ValueError:
        raise MobaError(f"--depths {spec!r}: write a count (e.g. 11) or percentages like 0,25,50,75,100") from None
    if not 1 <= n <= 101:
        raise MobaError(f"--depths {n}: the number of depths must be between 1 and 101")
    if n == 1:
        return [50.0]
    return [round(100 * i / (n - 1), 4) for i in range(n)]


@dataclass
class Sample:
    """One prompt: ``ids`` (exactly ``length`` tokens) and the candidates (index 0 is the true value)."""

    key: str
    value: str
    ids: list[int]
    needle_start: int
    needle_len: int
    candidates: list[list[int]]  # token ids of " value" for the true value, then distractors


def needle_key(rng: random.Random) -> str:
    """A needle's key, ``adjective-noun`` (the eval's and the training documents' one vocabulary)."""
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def sample_kv(seed: int, length: int, depth: float, index: int, distractors: int) -> tuple[str, str, list[str]]:
    """The key, the 7-digit value and distinct distractor values of one sample (same for every attention)."""
    rng = random.Random(f"needle-{seed}-{length}-{depth}-{index}")
    key = needle_key(rng)
    values = rng.sample(range(1_000_000, 10_000_000), distractors + 1)
    return key, str(values[0]), [str(v) for v in values[1:]]


@dataclass
class PromptParts:
    """Token ids of everything around the haystack (depend on the key only)."""

    prefix: list[int]
    needle: list[int]
    question: list[int]


def encode_parts(tokenizer: Any, templates: Templates, key: str, value: str, special: list[int]) -> PromptParts:
    enc = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return PromptParts(
        prefix=special + enc(templates.preamble + "\n"),
        needle=enc("\n" + templates.fill_needle(key, value) + "\n"),
        question=enc("\n" + templates.fill_question(key)),
    )


def build_prompt(parts: PromptParts, haystack: list[int], length: int, depth: float) -> tuple[list[int], int]:
    """Prompt ids of exactly ``length`` tokens with the needle at ``depth`` percent of the haystack.

    Returns ``(ids, needle_start)``; ``haystack`` must hold at least the haystack tokens needed.
    """
    fixed = len(parts.prefix) + len(parts.needle) + len(parts.question)
    h = length - fixed
    if h < 0:
        raise MobaError(f"length {length} is shorter than the preamble, needle and question ({fixed} tokens)")
    if len(haystack) < h:
        raise MobaError(f"internal: the haystack has {len(haystack)} tokens, {h} are needed")
    p = round(depth / 100 * h)
    ids = parts.prefix + haystack[:p] + parts.needle + haystack[p:h] + parts.question
    return ids, len(parts.prefix) + p


def max_fixed_tokens(tokenizer: Any, templates: Templates, special: list[int]) -> int:
    """An upper bound on the non-haystack tokens, so one haystack serves every sample."""
    parts = encode_parts(tokenizer, templates, "zesty-glacier", "8888888", special)
    return len(parts.prefix) + len(parts.needle) + len(parts.question) + 32


def make_samples(
    tokenizer: Any,
    templates: Templates,
    haystack: list[int],
    special: list[int],
    length: int,
    depth: float,
    n: int,
    seed: int,
    distractors: int,
) -> list[Sample]:
    """The ``n`` samples of one cell; each has its own key, value and distractors."""
    out = []
    for i in range(n):
        key, value, others = sample_kv(seed, length, depth, i, distractors)
        parts = encode_parts(tokenizer, templates, key, value, special)
        ids, start = build_prompt(parts, haystack, length, depth)
        cands = [list(tokenizer(" " + v, add_special_tokens=False)["input_ids"]) for v in [value, *others]]
        if any(not c for c in cands):
            raise MobaError("the tokenizer gives no tokens for a value; the needle test cannot score it")
        out.append(Sample(key, value, ids, start, len(parts.needle), cands))
    return out


# --------------------------------------------------------------------------------------------- scoring


def cache_arg(model: Any) -> str:
    """The forward keyword of the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def truncate_cache(cache: Any, length: int) -> None:
    """Drop every cached token after the first ``length`` (the prompt), in place."""
    layers = getattr(cache, "layers", None)  # transformers 5.x
    if isinstance(layers, list | tuple):
        for layer in layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        return
    kc, vc = getattr(cache, "key_cache", None), getattr(cache, "value_cache", None)  # transformers 4.x
    if isinstance(kc, list) and isinstance(vc, list):
        for i in range(len(kc)):
            kc[i] = kc[i][..., :length, :]
            vc[i] = vc[i][..., :length, :]
        if hasattr(cache, "_seen_tokens"):
            cache._seen_tokens = length
        return
    raise MobaError(f"cannot rewind a {type(cache).__name__} KV cache; the needle scores need a dynamic cache")


def exact_match(answer: str, value: str) -> bool:
    """RULER's string match: the value appears in the answer."""
    return value in answer


@torch.no_grad()
def score_batch(model: Any, tokenizer: Any, samples: list[Sample], gen_tokens: int) -> list[dict[str, Any]]:
    """Greedy answer and candidate log-probabilities of samples of one length, batched, one prefill.

    The prompt is prefilled once; the greedy steps and each candidate's tokens then run against its KV
    cache, which is rewound to the prompt after each.
    """
    dev = model.get_output_embeddings().weight.device
    ids = torch.tensor([s.ids for s in samples], dtype=torch.long, device=dev)  # [B, L]
    b, n = ids.shape
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    name = cache_arg(model)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)  # [B, V]
    del out
    tok = first.argmax(-1)
    gen = [tok]
    for _ in range(gen_tokens - 1):
        step = model(input_ids=tok[:, None], use_cache=True, **{name: cache})
        tok = step.logits[:, -1].argmax(-1)
        gen.append(tok)
    truncate_cache(cache, n)
    answers = tokenizer.batch_decode(torch.stack(gen, 1).tolist(), skip_special_tokens=True)
    n_cand = len(samples[0].candidates)
    scores = torch.zeros(b, n_cand, dtype=torch.float64)
    for j in range(n_cand):
        cand = [s.candidates[j] for s in samples]
        for r in range(b):
            scores[r, j] = float(first[r, cand[r][0]])
        longest = max(len(c) for c in cand)
        if longest > 1:
            # Right-pad with token 0: causal attention keeps the padding from changing real positions.
            feed = torch.tensor([c[:-1] + [0] * (longest - len(c)) for c in cand], dtype=torch.long, device=dev)
            logp = torch.log_softmax(model(input_ids=feed, use_cache=True, **{name: cache}).logits.float(), -1)
            for r in range(b):
                for t in range(1, len(cand[r])):
                    scores[r, j] += float(logp[r, t - 1, cand[r][t]])
            truncate_cache(cache, n)
    del cache
    rows = []
    for r, s in enumerate(samples):
        true = scores[r, 0]
        rank = 1 + int((scores[r, 1:] >= true).sum())
        rows.append({
            "key": s.key,
            "value": s.value,
            "needle_pos": s.needle_start,
            "answer": answers[r][:200],
            "exact": exact_match(answers[r], s.value),
            "rank": rank,
            "logprob": float(true),
            "margin": float(true - scores[r, 1:].max()),  # > 0: the true value beat every distractor
        })
    return rows
