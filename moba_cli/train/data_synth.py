"""Synthetic long-context retrieval documents, from this project's own templates.

Each document hides one fact somewhere in a long text and asks for it at the end, so a model can only
answer by attending far back:

- ``passkey``: a secret number inside filler prose;
- ``kv``: a table of random key/value records, asked for one key's value;
- ``vartrack``: a chain of variable assignments (``LET ABCD = EFGH``) spread through filler, next to
  distractor chains, asked for the value the chain's last variable holds;
- ``needle``: the prompt form of ``moba eval needle`` (its preamble, noise haystack, needle and question
  templates, keyed 7-digit magic numbers), with up to two needles of other keys as distractors, so a small
  model trained on it is measured on the form it learnt;
- ``needle_multi`` and ``kv_multi``: the same forms with many facts and many answered questions per
  document (one fact per ~256 tokens; every fact asked, in random order, each question followed by its
  answer). The single-question tasks reward retrieval on ~4 tokens per document, too few for a small
  model to form induction heads in a few hundred million tokens (seen: docs/evals.md); here a third or
  more of the tokens do.

A document is a (prompt, answer) pair; pretraining data joins them, SFT data keeps the loss on the answer.
Lengths are fitted to a target in tokens with a counting function (the real tokenizer once it exists, a
characters-per-token estimate before), so every document is generated from its seed alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

CountMany = Callable[[list[str]], list[int]]
"""Token counts of several pieces of text (in context a piece costs about what it costs alone)."""

_SUBJECTS = ["the gardener", "a quiet engineer", "the old ferry", "my neighbour", "the committee", "a red kite",
             "the night train", "our librarian", "the market", "a stray cat", "the river", "the weather office"]
_VERBS = ["painted", "counted", "followed", "repaired", "ignored", "described", "carried", "measured", "visited",
          "sorted", "borrowed", "watched"]
_OBJECTS = ["the fence", "seven lanterns", "a crate of pears", "the harbour wall", "the long corridor",
            "two maps", "the clock tower", "a bag of nails", "the hill path", "every window", "the spare key",
            "a box of letters"]
_TAILS = ["before noon", "after the rain", "without a word", "for the third time", "at the edge of town",
          "with great care", "as usual", "in a hurry", "near the bridge", "on a Tuesday", "by lamplight",
          "once again"]
_LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_HEX = np.array(list("0123456789abcdef"))

_BATCH = 128  # filler pieces generated (and counted) at a time


def chars_estimate(pieces: list[str]) -> list[int]:
    """A stand-in for token counts before a tokenizer exists: about 4 characters a token."""
    return [max(1, len(p) // 4) for p in pieces]


def make_document(task: str, rng: np.random.Generator, target_tokens: int, count: CountMany) -> tuple[str, str]:
    """A (prompt, answer) pair of about ``target_tokens`` tokens (bos and eos included)."""
    make = _MAKERS.get(task)
    if make is not None:
        return make(rng, target_tokens, count)
    raise ValueError(f"unknown synthetic task {task!r}")


def _sentence(rng: np.random.Generator) -> str:
    parts = [_SUBJECTS, _VERBS, _OBJECTS, _TAILS]
    words = [p[int(rng.integers(len(p)))] for p in parts]
    return " " + words[0][0].upper() + words[0][1:] + " " + " ".join(words[1:]) + "."


def _fill(rng: np.random.Generator, budget: int, count: CountMany, make: Callable[[], str]) -> list[str]:
    """Pieces from ``make`` until their token counts reach ``budget``."""
    out: list[str] = []
    used = 0
    while used < budget:
        batch = [make() for _ in range(_BATCH)]
        for piece, n in zip(batch, count(batch), strict=True):
            if used + n > budget:
                return out
            out.append(piece)
            used += n
    return out


def _number(rng: np.random.Generator) -> str:
    digits = int(rng.integers(5, 8))
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _code(rng: np.random.Generator, n: int, alphabet: np.ndarray) -> str:
    return "".join(rng.choice(alphabet, n))


def _budget(target: int, fixed: list[str], count: CountMany) -> int:
    return max(0, target - 2 - sum(count(fixed)))  # 2: bos and eos


def _insert(pieces: list[str], rng: np.random.Generator, item: str) -> None:
    pieces.insert(int(rng.integers(len(pieces) + 1)), item)


def _passkey(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    key = _number(rng)
    head = "A secret number is hidden somewhere in the notes below. Find it and keep it in mind.\n"
    fact = f"\n(The secret number is {key}. Remember {key}.)\n"
    tail = "\n\nQuestion: what is the secret number?\nAnswer:"
    answer = f" {key}"
    filler = _fill(rng, _budget(target, [head, fact, tail, answer], count), count, lambda: _sentence(rng))
    _insert(filler, rng, fact)
    return head + "".join(filler) + tail, answer


def _kv(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    head = "Each record below maps a key to a value. Keys are unique.\n"
    tail = "\n\nQuestion: what is the value of record KEY?\nAnswer:"
    budget = _budget(target, [head, tail.replace("KEY", "0" * 8), " " + "0" * 8], count)
    record = lambda: f"\nrecord {_code(rng, 8, _HEX)} -> {_code(rng, 8, _HEX)}"
    records = _fill(rng, budget, count, record) or [record()]
    pick = records[int(rng.integers(len(records)))]
    key, value = pick.split()[1], pick.split()[3]
    return head + "".join(records) + tail.replace("KEY", key), f" {value}"


def _vartrack(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    """Chains ``LET A = 12345``, ``LET B = A``, ... in order, one chain asked for, others distractors."""
    hops = int(rng.integers(3, 6))
    n_chains = 3
    order: list[str] = []  # a list, not a set: set order changes with PYTHONHASHSEED
    while len(order) < hops * n_chains:
        name = _code(rng, 4, _LETTERS)
        if name not in order:
            order.append(name)
    chains = [order[i * hops: (i + 1) * hops] for i in range(n_chains)]
    values = [_number(rng) for _ in range(n_chains)]
    lines = []
    for chain, value in zip(chains, values, strict=True):
        steps = [f"\nLET {chain[0]} = {value}."] + [f"\nLET {b} = {a}." for a, b in zip(chain, chain[1:], strict=False)]
        lines.append(steps)
    head = "Follow the assignments in the notes below; each LET gives a variable a value.\n"
    ask = int(rng.integers(n_chains))
    tail = f"\n\nQuestion: what value does {chains[ask][-1]} hold?\nAnswer:"
    answer = f" {values[ask]}"
    fixed = [head, tail, answer] + [s for steps in lines for s in steps]
    filler = _fill(rng, _budget(target, fixed, count), count, lambda: _sentence(rng))
    # slot every assignment at a sorted random position so each chain reads in order
    n_steps = sum(len(s) for s in lines)
    slots = np.sort(rng.integers(0, len(filler) + 1, size=n_steps))
    sequence = [steps[k] for k in range(hops) for steps in lines]  # chains interleaved, each in order
    out: list[str] = []
    j = 0
    for i, piece in enumerate(filler + [""]):
        while j < n_steps and slots[j] == i:
            out.append(sequence[j])
            j += 1
        out.append(piece)
    return head + "".join(out) + tail, answer


def _needle_facts(rng: np.random.Generator, more: Callable[[int], bool]) -> tuple[Any, list[str], list[str],
                                                                                   list[str]]:
    """The eval's templates, keys drawn while ``more(len(keys))``, their 7-digit values and needle lines."""
    # the eval's own templates and key words: one copy of the prompt form (imported here, as evals loads torch)
    from moba_cli.evals.needle import Templates, needle_key

    t = Templates()
    keyer = random.Random(int(rng.integers(2**63)))
    keys: list[str] = []
    while more(len(keys)):
        key = needle_key(keyer)
        if key not in keys:
            keys.append(key)
    values = [str(int(rng.integers(1_000_000, 10_000_000))) for _ in keys]
    return t, keys, values, [f"\n{t.fill_needle(k, v)}\n" for k, v in zip(keys, values, strict=True)]


def _noise_around(rng: np.random.Generator, target: int, count: CountMany, fixed: list[str],
                  needles: list[str]) -> str:
    """The eval's noise haystack filling what ``fixed`` and ``needles`` leave of ``target``, needles inside."""
    from moba_cli.evals.haystack import NOISE

    noise = [p + "." for p in NOISE.split(".") if p.strip()]
    filler = _fill(rng, _budget(target, [*fixed, *needles], count), count,
                   lambda: noise[int(rng.integers(len(noise)))])
    for n in needles:
        _insert(filler, rng, n)
    return "".join(filler)


def _needle(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    """``moba eval needle``'s prompt: preamble, noise, the needle (and 0-2 needles of other keys), question."""
    t, keys, values, needles = _needle_facts(rng, lambda n: n < 1 + int(rng.integers(3)))
    head = t.preamble + "\n"
    tail = "\n" + t.fill_question(keys[0])
    answer = f" {values[0]}"
    return head + _noise_around(rng, target, count, [head, tail, answer], needles) + tail, answer


def _facts(target: int) -> int:
    """Facts (and questions) in a many-question document of ``target`` tokens: one per ~256 tokens."""
    return int(min(64, max(2, target // 256)))


def _needle_multi(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    """``moba eval needle``'s form with :func:`_facts` needles in the noise, then every one asked in random
    order, each question followed by its answer; the last question is the document's (prompt, answer)."""
    t, keys, values, needles = _needle_facts(rng, lambda n: n < _facts(target))
    order = [int(i) for i in rng.permutation(len(keys))]
    qa = [f"\n{t.fill_question(keys[i])} {values[i]}." for i in order[:-1]]
    head = t.preamble + "\n"
    tail = "\n" + t.fill_question(keys[order[-1]])
    answer = f" {values[order[-1]]}"
    body = _noise_around(rng, target, count, [head, "\n", tail, answer, *qa], needles)
    return head + body + "\n" + "".join(qa) + tail, answer


def _kv_multi(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    """A table of key/value records (two thirds of the tokens), then lookups of records picked at random,
    each with its value; the last lookup's value is the answer."""
    head = "Each record below maps a key to a value. Keys are unique. Lookups follow the records.\n"
    mid = "\n\nLookups:"
    budget = _budget(target, [head, mid, "\nlookup 0a1b2c3d ->", " 4e5f6a7b"], count)
    table: dict[str, str] = {}

    def record() -> str:
        key = _code(rng, 8, _HEX)
        while key in table:
            key = _code(rng, 8, _HEX)
        table[key] = _code(rng, 8, _HEX)
        return f"\nrecord {key} -> {table[key]}"

    records = _fill(rng, 2 * budget // 3, count, record) or [record()]
    pairs = [(r.split()[1], r.split()[3]) for r in records]
    used = sum(count(records))

    def lookup() -> str:
        key, value = pairs[int(rng.integers(len(pairs)))]
        return f"\nlookup {key} -> {value}"

    lookups = _fill(rng, budget - used, count, lookup) or [lookup()]
    key, value = lookups.pop().split()[1::2]
    return head + "".join(records) + mid + "".join(lookups) + f"\nlookup {key} ->", f" {value}"


def _repeat(rng: np.random.Generator, target: int, count: CountMany) -> tuple[str, str]:
    """A passage of filler sentences and random codes, filler, then the same passage again; the copy's last
    piece is the answer. Every token of the copy is predicted by finding its place in the first copy: the
    copying (induction) that retrieval rests on. The passage's length (1/8 to 1/2 of the document) and the
    filler before and between the copies are drawn per document, so the copy's distance varies and only
    matching content finds it: with a fixed distance a tiny model learnt a positional shortcut instead
    (second copy worse than the first at other lengths, docs/evals.md)."""
    head = "A passage is marked below; later it is written out again.\n"
    start, stop = "\n\nPassage:\n", "\nEnd of passage.\n"
    mid = "\n\nThe same passage again:\n"
    budget = _budget(target, [head, start, stop, mid], count)
    piece = lambda: f" {_code(rng, 8, _HEX)}" if rng.random() < 0.5 else _sentence(rng)  # noqa: E731
    pieces = _fill(rng, int(rng.integers(budget // 8, budget // 2 + 1)), count, piece)
    if len(pieces) < 2:  # a tiny target: two codes, the shortest pieces
        pieces = [f" {_code(rng, 8, _HEX)}" for _ in range(2)]
    rest = max(0, budget - 2 * sum(count(pieces)))
    before = int(rng.integers(rest + 1))
    filler = lambda: _sentence(rng)  # noqa: E731
    pre, gap = _fill(rng, before, count, filler), _fill(rng, rest - before, count, filler)
    first = head + "".join(pre) + start + "".join(pieces) + stop + "".join(gap) + mid
    return first + "".join(pieces[:-1]), pieces[-1]


_MAKERS: dict[str, Callable[[np.random.Generator, int, CountMany], tuple[str, str]]] = {
    "passkey": _passkey, "kv": _kv, "vartrack": _vartrack, "needle": _needle, "needle_multi": _needle_multi,
    "kv_multi": _kv_multi, "repeat": _repeat,
}
