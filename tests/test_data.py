"""PackedLoader and TokenDataset on small datasets written directly in the on-disk format (no tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moba_cli.errors import MobaError
from moba_cli.train.data import IGNORE_INDEX, SCHEMA, Batch, PackedLoader, TokenDataset

BOS, EOS = 0, 1


def write_raw(root: Path, lengths: list[int], seed: int = 0, mask: bool = False, vocab: int = 500,
              dtype: str = "uint16") -> Path:
    """A dataset folder with one document per length (bos + random ids + eos), same docs in train and val."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    docs = [np.concatenate([[BOS], rng.integers(3, vocab, n - 2), [EOS]]) for n in lengths]
    tokens = np.concatenate(docs).astype(np.dtype(dtype).newbyteorder("<"))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    splits = {}
    for split in ("train", "val"):
        tokens.tofile(root / f"{split}.tokens")
        np.save(root / f"{split}.docs.npy", starts)
        if mask:
            # "answer": the second half of each document
            m = np.concatenate([(np.arange(n) >= n // 2).astype(np.uint8) for n in lengths])
            m.tofile(root / f"{split}.mask")
        splits[split] = {"tokens": int(len(tokens)), "docs": len(lengths)}
    manifest = {"schema": SCHEMA, "dtype": dtype, "vocab_size": vocab, "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


LENGTHS = [2, 5, 40, 3, 97, 11, 2, 64, 23, 150, 7, 31, 2, 58, 19, 44, 3, 71, 9, 33] * 3


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> TokenDataset:
    return TokenDataset(write_raw(tmp_path_factory.mktemp("raw"), LENGTHS))


def batches(loader: PackedLoader, n: int) -> list[Batch]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a: Batch, b: Batch) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            and torch.equal(a.position_ids, b.position_ids) and a.doc_lens == b.doc_lens)


def test_dataset_reads_the_files(ds):
    assert len(ds) == sum(LENGTHS) and ds.n_docs == len(LENGTHS)
    assert ds.tokens.dtype == np.dtype("<u2") and ds.loss_mask is None and ds.vocab_size == 500
    for i in (0, 4, 9):
        doc = ds.doc(i)
        assert len(doc) == LENGTHS[i] and doc[0] == BOS and doc[-1] == EOS


def test_uint32_ids(tmp_path):
    big = TokenDataset(write_raw(tmp_path / "big", [40, 70, 9], vocab=100_000, dtype="uint32"))
    assert big.tokens.dtype == np.dtype("<u4") and big.tokens.max() >= 1 << 16
    batch = next(iter(PackedLoader(big, seq_len=50, batch_size=2, seed=0)))
    assert batch.input_ids.max() >= 1 << 16 and batch.input_ids.dtype == torch.int64


@pytest.mark.parametrize("pack", ["documents", "whole"])
def test_rows_follow_document_boundaries(ds, pack):
    """doc_lens, position_ids and labels against a brute-force walk over the corpus."""
    s = 37  # odd, shorter than some documents and longer than others
    loader = PackedLoader(ds, seq_len=s, batch_size=3, seed=5, shuffle=False, epochs=1, pack=pack)
    doc_of = np.searchsorted(ds.doc_starts, np.arange(len(ds)), side="right") - 1
    rows = 0
    for batch in loader:
        assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.int64
        for r in range(batch.input_ids.shape[0]):
            lo = int(loader.window_starts[rows])
            rows += 1
            ids = batch.input_ids[r].numpy()
            np.testing.assert_array_equal(ids, ds.tokens[lo: lo + s])
            owner = doc_of[lo: lo + s]
            # pieces: runs of tokens of the same document
            change = np.flatnonzero(np.diff(owner)) + 1
            expect = np.diff(np.concatenate([[0], change, [s]])).tolist()
            assert batch.doc_lens[r] == expect and sum(expect) == s
            pos = batch.position_ids[r].numpy()
            starts = np.concatenate([[0], change])
            assert (pos[starts] == 0).all() and (np.delete(np.diff(pos), change - 1) == 1).all()
            lab = batch.labels[r].numpy()
            assert (lab[starts] == IGNORE_INDEX).all()
            keep = np.ones(s, bool)
            keep[starts] = False
            np.testing.assert_array_equal(lab[keep], ids[keep])
            # a piece starting at a true document start begins with bos
            true_start = np.isin(lo + starts, ds.doc_starts)
            assert (ids[starts[true_start]] == BOS).all()
    assert rows == loader.n_windows // 3 * 3
    if pack == "documents":
        assert loader.n_windows == len(ds) // s


def test_whole_packing_keeps_short_documents_whole(ds):
    s = 64
    loader = PackedLoader(ds, seq_len=s, batch_size=1, seed=0, shuffle=False, epochs=1, pack="whole")
    starts = loader.window_starts
    assert (np.diff(starts) > 0).all() and (np.diff(starts) <= s).all() and starts[-1] + s <= len(ds)
    d = ds.doc_starts
    for w in starts:  # a row starts at a document start or S tokens on inside a long document
        owner = np.searchsorted(d, w, side="right") - 1
        assert (w - d[owner]) % s == 0
    covered = 0
    for i in range(ds.n_docs):
        lo, hi = d[i], d[i + 1]
        if hi - lo > s or hi > starts[-1] + s:
            continue
        k = np.searchsorted(starts, lo, side="right") - 1  # the row that holds document i whole
        assert starts[k] <= lo and hi <= starts[k] + s
        covered += 1
    assert covered > 0.9 * sum(n <= s for n in LENGTHS)
    # resuming works the same with this packing
    full = batches(PackedLoader(ds, seq_len=s, batch_size=2, seed=9, pack="whole"), 6)
    part = PackedLoader(ds, seq_len=s, batch_size=2, seed=9, pack="whole")
    batches(part, 2)
    again = PackedLoader(ds, seq_len=s, batch_size=2, seed=9, pack="whole")
    again.load_state_dict(part.state_dict())
    assert all(same(x, y) for x, y in zip(full[2:], batches(again, 4), strict=True))


def test_cu_seqlens_match_position_restarts(ds):
    batch = batches(PackedLoader(ds, seq_len=29, batch_size=4, seed=1), 1)[0]
    flat = batch.position_ids.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    expect = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    assert torch.equal(batch.cu_seqlens(), expect)


def test_order_is_seeded_and_covers_every_window(ds):
    a = PackedLoader(ds, seq_len=16, batch_size=1, seed=3, epochs=1)
    b = PackedLoader(ds, seq_len=16, batch_size=1, seed=3, epochs=1)
    c = PackedLoader(ds, seq_len=16, batch_size=1, seed=4, epochs=1)
    la, lb, lc = list(a), list(b), list(c)
    assert all(same(x, y) for x, y in zip(la, lb, strict=True))
    assert not all(same(x, y) for x, y in zip(la, lc, strict=True))
    seen = sorted(tuple(x.input_ids[0].tolist()) for x in la)
    windows = sorted(tuple(ds.tokens[w * 16: w * 16 + 16].tolist()) for w in range(len(ds) // 16))
    assert seen == windows  # every window exactly once per epoch
    assert not np.array_equal(a.window_order(0), a.window_order(1))  # a new shuffle each epoch


@pytest.mark.parametrize("k", [1, 4, 11])  # 11 resumes in the second epoch (9 steps each)
def test_resume_gives_the_same_next_batches(ds, k):
    loader = PackedLoader(ds, seq_len=41, batch_size=5, seed=11)
    assert loader.steps_per_epoch == 9
    straight = batches(PackedLoader(ds, seq_len=41, batch_size=5, seed=11), k + 5)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive a JSON checkpoint
    resumed = PackedLoader(ds, seq_len=41, batch_size=5, seed=11)
    resumed.load_state_dict(state)
    again = batches(resumed, 5)
    assert all(same(x, y) for x, y in zip(straight[k:], again, strict=True))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_global_batch(ds, world):
    one = batches(PackedLoader(ds, seq_len=23, batch_size=2 * world, seed=7), 8)
    per_rank = [batches(PackedLoader(ds, seq_len=23, batch_size=2, seed=7, rank=r, world_size=world), 8)
                for r in range(world)]
    for step in range(8):
        ids = torch.cat([per_rank[r][step].input_ids for r in range(world)])
        assert torch.equal(ids, one[step].input_ids)
        assert sum((per_rank[r][step].doc_lens for r in range(world)), []) == one[step].doc_lens


def test_resume_on_another_world_size_with_the_same_global_batch(ds):
    single = PackedLoader(ds, seq_len=23, batch_size=4, seed=2)
    straight = batches(PackedLoader(ds, seq_len=23, batch_size=4, seed=2), 6)
    it = iter(single)
    for _ in range(3):
        next(it)
    halves = []
    for r in range(2):
        part = PackedLoader(ds, seq_len=23, batch_size=2, seed=2, rank=r, world_size=2)
        part.load_state_dict(single.state_dict())
        halves.append(batches(part, 3))
    for step in range(3):
        ids = torch.cat([halves[0][step].input_ids, halves[1][step].input_ids])
        assert torch.equal(ids, straight[3 + step].input_ids)


def test_loss_mask_hides_the_prompt(tmp_path):
    ds = TokenDataset(write_raw(tmp_path / "sft", LENGTHS, mask=True))
    assert ds.loss_mask is not None
    loader = PackedLoader(ds, seq_len=50, batch_size=2, seed=0, shuffle=False, epochs=1)
    row = 0
    for batch in loader:
        for r in range(batch.labels.shape[0]):
            lo = row * 50
            row += 1
            m = ds.loss_mask[lo: lo + 50]
            lab = batch.labels[r].numpy()
            assert (lab[m == 0] == IGNORE_INDEX).all()
            counted = (m == 1) & (batch.position_ids[r].numpy() != 0)
            np.testing.assert_array_equal(lab[counted], batch.input_ids[r].numpy()[counted])


def test_val_split_and_finite_epochs(ds):
    val = TokenDataset(ds.root, "val")
    loader = PackedLoader(val, seq_len=64, batch_size=2, seed=0, shuffle=False, epochs=1)
    first = list(loader)
    assert len(first) == len(loader) == (len(val) // 64) // 2
    assert torch.equal(first[0].input_ids[0], torch.from_numpy(val.tokens[:64].astype(np.int64)))
    again = list(loader)  # a finished finite loader starts over
    assert all(same(x, y) for x, y in zip(first, again, strict=True))


def test_errors(ds, tmp_path):
    with pytest.raises(MobaError, match="fewer than one global batch"):
        PackedLoader(ds, seq_len=len(ds) // 2, batch_size=3, seed=0)
    with pytest.raises(MobaError, match="rank"):
        PackedLoader(ds, seq_len=8, batch_size=1, seed=0, rank=2, world_size=2)
    with pytest.raises(MobaError, match="packing"):
        PackedLoader(ds, seq_len=8, batch_size=1, seed=0, pack="rows")
    state = PackedLoader(ds, seq_len=8, batch_size=2, seed=0).state_dict()
    with pytest.raises(MobaError, match="saved pack"):
        PackedLoader(ds, seq_len=8, batch_size=2, seed=0, pack="whole").load_state_dict(state)
    with pytest.raises(MobaError, match="seed"):
        PackedLoader(ds, seq_len=8, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(MobaError, match="global_batch"):
        PackedLoader(ds, seq_len=8, batch_size=3, seed=0).load_state_dict(state)
    with pytest.raises(MobaError, match="no manifest.json"):
        TokenDataset(tmp_path)
    with pytest.raises(MobaError, match="no split 'test'"):
        TokenDataset(ds.root, "test")
    broken = write_raw(tmp_path / "broken", [5, 6])
    (broken / "train.tokens").write_bytes(b"\0\0")
    with pytest.raises(MobaError, match="rebuild"):
        TokenDataset(broken)
