"""The copy probe of `moba train`'s evaluation: layout, and that it tells copying by content from copying by
position (hand-built models with exact answers)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moba_cli.train.losses import copy_losses, copy_probe


@pytest.mark.parametrize(("vocab", "seq", "rows"), [(50, 64, 8), (300, 97, 5), (8192, 1000, 3), (20, 9, 4)])
def test_probe_layout(vocab, seq, rows):
    special = {0, 1, 2}
    ids, part = copy_probe(vocab, seq, rows, special, bos=0, seed=3)
    assert ids.shape == part.shape == (rows, seq)
    assert (ids[:, 0] == 0).all() and not torch.isin(ids[:, 1:], torch.tensor(sorted(special))).any()
    assert int(ids.max()) < vocab
    n = max(2, min(256, (seq - 1) // 4))
    starts = set()
    for r in range(rows):
        first, second = (part[r] == 1).nonzero().flatten(), (part[r] == 2).nonzero().flatten()
        assert len(first) == len(second) == n
        assert (first.diff() == 1).all() and (second.diff() == 1).all() and first[-1] < second[0]
        assert torch.equal(ids[r, first], ids[r, second])
        starts.add((int(first[0]), int(second[0])))
    if rows >= 5 and seq >= 64:
        assert len(starts) >= 3  # distances differ by row
    again = copy_probe(vocab, seq, rows, special, bos=0, seed=3)
    assert torch.equal(again[0], ids) and torch.equal(again[1], part)
    assert not torch.equal(copy_probe(vocab, seq, rows, special, bos=0, seed=4)[0], ids)


class _Oracle(torch.nn.Module):
    """Logits from a rule: ``content`` predicts the token after the latest earlier occurrence of the current
    token (a perfect induction head); ``shift=d`` predicts the token ``d - 1`` positions back (copying from a
    fixed distance); no rule applies: uniform."""

    def __init__(self, vocab: int, content: bool = False, shift: int = 0) -> None:
        super().__init__()
        self.vocab, self.content, self.shift = vocab, content, shift
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, position_ids=None, use_cache=False):
        b, s = input_ids.shape
        logits = torch.zeros(b, s, self.vocab)
        for r in range(b):
            row = input_ids[r].tolist()
            for t in range(s):
                guess = None
                if self.content:
                    prev = [j for j in range(t) if row[j] == row[t]]
                    guess = row[prev[-1] + 1] if prev else None
                elif self.shift and t - self.shift + 1 >= 0:
                    guess = row[t - self.shift + 1]
                if guess is not None:
                    logits[r, t, guess] = 30.0
        return SimpleNamespace(logits=logits)


def test_probe_scores_content_copying_not_position():
    vocab = 500
    probe = copy_probe(vocab, 96, 4, {0}, bos=0, seed=0)
    uniform = math.log(vocab)
    none = copy_losses(_Oracle(vocab), probe, torch.device("cpu"))
    assert none["val_copy_loss_first"] == pytest.approx(uniform, rel=1e-5)
    assert none["val_copy_loss_second"] == pytest.approx(uniform, rel=1e-5)
    copier = copy_losses(_Oracle(vocab, content=True), probe, torch.device("cpu"))
    assert copier["val_copy_loss_second"] < 0.1 * uniform  # (a random id seen earlier by chance misleads it)
    assert copier["val_copy_loss_first"] > 0.8 * uniform
    # copying from the first row's distance: right on that row only, so the second copy stays expensive
    ids, part = probe
    d = int((part[0] == 2).nonzero()[0]) - int((part[0] == 1).nonzero()[0])
    shifted = copy_losses(_Oracle(vocab, shift=d), probe, torch.device("cpu"))
    assert shifted["val_copy_loss_second"] > 0.5 * uniform
    model = _Oracle(vocab)
    model.train()
    copy_losses(model, probe, torch.device("cpu"))
    assert model.training  # left as found
