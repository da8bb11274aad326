"""`build_dataset` on tiny local corpora: determinism, lossless tokens, sources, SFT masks, mixing, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moba_cli.errors import MobaError
from moba_cli.train.data import IGNORE_INDEX, PackedLoader, TokenDataset
from moba_cli.train.data_build import build_dataset, manifest_hash, tokenizer_sample
from moba_cli.train.data_config import config_from_dict
from moba_cli.train.data_sources import SourceStats, code_files, iter_code
from moba_cli.train.data_synth import make_document

WORDS = ["alpha", "beta", "gamma", "delta", "x = 1", "def f():", "return y", "  # note", "ünïcødé", "\n"]


def make_corpus(folder: Path, n: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = rng.choice(WORDS, int(rng.integers(20, 120)))
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words))
    return folder


def cfg(sources: list[dict], **kw) -> object:
    return config_from_dict({"vocab_size": 320, "val_fraction": 0.25, "sources": sources, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("built") / "ds"
    c = cfg([{"kind": "files", "paths": [str(corpus)]}, {"kind": "synthetic", "docs": 4, "lengths": [200]}])
    return out, build_dataset(c, out)


def test_layout_and_manifest(built):
    out, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["manifest_hash"] == manifest_hash(on_disk) == manifest["manifest_hash"]
    assert on_disk["schema"] == "moba-data/1" and on_disk["dtype"] == "uint16"
    assert on_disk["vocab_size"] <= 320 and on_disk["loss_mask"] is False
    for split in ("train", "val"):
        info = on_disk["splits"][split]
        ds = TokenDataset(out, split)
        assert len(ds) == info["tokens"] and ds.n_docs == info["docs"] > 0
        assert not (out / f"{split}.mask").exists()
    assert sum(s["docs"] for s in on_disk["sources"]) == 24 + 4
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_tokens_decode_to_the_documents(built, corpus):
    """Byte-level BPE is lossless: every stored document decodes back to its text, bos/eos around it."""
    out, _ = built
    texts = {p.read_text() for p in corpus.iterdir()}
    tok = TokenDataset(out).tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    ids = tok("return y")["input_ids"]  # as an evaluation would encode a prompt: bos first, like training
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "return y"
    found = 0
    for split in ("train", "val"):
        ds = TokenDataset(out, split)
        for i in range(ds.n_docs):
            doc = ds.doc(i)
            assert doc[0] == tok.bos_token_id and doc[-1] == tok.eos_token_id
            text = tok.decode(doc[1:-1].tolist())
            found += text in texts
            assert text in texts or re.search(r"\nAnswer: \w+$", text)  # a file or a synthetic document
    assert found == 24


def test_build_is_deterministic(tmp_path, corpus, built):
    _, first = built
    c = cfg([{"kind": "files", "paths": [str(corpus)]}, {"kind": "synthetic", "docs": 4, "lengths": [200]}])
    again = build_dataset(c, tmp_path / "again")
    assert again["files_hash"] == first["files_hash"] and again["manifest_hash"] == first["manifest_hash"]
    as_dict = build_dataset({**c.to_dict(), "out": str(tmp_path / "dict")})  # a recipe's data.build mapping
    assert as_dict["manifest_hash"] == first["manifest_hash"]
    other = build_dataset(cfg(c.to_dict()["sources"], seed=1), tmp_path / "seed1")
    assert other["files_hash"] != first["files_hash"]


def test_build_is_the_same_in_another_process(tmp_path, corpus, built):
    """Another hash seed and thread count (as on another machine) must not change a byte."""
    _, first = built
    code = (
        "import json, sys\n"
        "from moba_cli.train.data_build import build_dataset\n"
        "from moba_cli.train.data_config import config_from_dict\n"
        "cfg = config_from_dict(json.loads(sys.argv[1]))\n"
        "print(build_dataset(cfg, sys.argv[2])['manifest_hash'])\n"
    )
    data = {"vocab_size": 320, "val_fraction": 0.25, "sources": [{"kind": "files", "paths": [str(corpus)]},
                                                                  {"kind": "synthetic", "docs": 4, "lengths": [200]}]}
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(data), str(tmp_path / "other")], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == first["manifest_hash"]


def test_split_is_by_document(tmp_path):
    folder = make_corpus(tmp_path / "c", n=30)
    for i in range(5):  # duplicates must land on the same side
        (folder / f"dup{i}.txt").write_text((folder / "doc00.txt").read_text())
    out = tmp_path / "ds"
    build_dataset(cfg([{"kind": "files", "paths": [str(folder)]}]), out)
    sides = {}
    for split in ("train", "val"):
        ds = TokenDataset(out, split)
        for i in range(ds.n_docs):
            sides.setdefault(ds.doc(i).tobytes(), set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    assert len(sides) == 30


def test_reuse_tokenizer(tmp_path, built, corpus):
    out, first = built
    again = build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}], tokenizer=str(out), vocab_size=999),
                          tmp_path / "reuse")
    assert again["files"]["tokenizer/tokenizer.json"] == first["files"]["tokenizer/tokenizer.json"]
    assert again["vocab_size"] == first["vocab_size"]


def test_reuse_a_foreign_tokenizer(tmp_path, corpus):
    """A checkpoint's own tokenizer (other special tokens, no pad) serves too; pad falls back to eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([p.read_text() for p in corpus.iterdir()],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(str(tmp_path / "ckpt"))
    m = build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}], tokenizer=str(tmp_path / "ckpt")),
                      tmp_path / "ds")
    assert m["special_tokens"] == {"bos": 1, "eos": 2, "pad": 2}
    ds = TokenDataset(tmp_path / "ds")
    assert ds.doc(0)[0] == 1 and ds.doc(0)[-1] == 2 and ds.tokenizer().pad_token == "</s>"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(tmp_path / "nobos"))
    with pytest.raises(MobaError, match="has no bos token"):
        build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}], tokenizer=str(tmp_path / "nobos")),
                      tmp_path / "bad")
    with pytest.raises(MobaError, match="no tokenizer at"):
        build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}], tokenizer=str(corpus)), tmp_path / "bad")


def test_code_source_reads_packages_in_order(tmp_path):
    root = tmp_path / "site-packages"
    for name, text in {"zeta/__init__.py": "Z = 1\n", "alpha/b.py": "B = 2\n", "alpha/a.py": "A = 3\n",
                       "alpha/__pycache__/a.py": "no", "alpha/notes.md": "docs", "solo.py": "S = 4\n",
                       "alpha-1.0.dist-info/x.py": "no", "big/huge.py": "H = 0\n" * 100, "empty/e.py": ""}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    src = config_from_dict({"sources": [{"kind": "code", "roots": [str(root)]}]}).sources[0]
    assert [n for n, _ in code_files(src)] == ["alpha/a.py", "alpha/b.py", "big/huge.py", "empty/e.py", "solo.py",
                                               "zeta/__init__.py"]
    src = config_from_dict({"sources": [{"kind": "code", "roots": [str(root)], "include": ["a*", "z*"],
                                         "exclude": ["zeta"], "suffixes": [".py", ".md"]}]}).sources[0]
    assert [n for n, _ in code_files(src)] == ["alpha/a.py", "alpha/b.py", "alpha/notes.md"]
    out = tmp_path / "ds"
    m = build_dataset(cfg([{"kind": "code", "roots": [str(root)], "max_file_bytes": 100}], val_fraction=0.0), out)
    assert m["sources"][0]["docs"] == 4 and m["sources"][0]["skipped"] == 2  # huge.py too big, e.py empty
    tok = TokenDataset(out).tokenizer()
    ds = TokenDataset(out)
    assert [tok.decode(ds.doc(i)[1:-1].tolist()) for i in range(ds.n_docs)] == ["A = 3\n", "B = 2\n", "S = 4\n",
                                                                               "Z = 1\n"]
    # one document per package, files in order; a package over max_doc_bytes continues in a new document
    src = config_from_dict({"sources": [{"kind": "code", "roots": [str(root)], "group": "package",
                                         "max_file_bytes": 100}]}).sources[0]
    docs = [d.text for d in iter_code(src, SourceStats())]
    assert docs == ["# file: alpha/a.py\nA = 3\n# file: alpha/b.py\nB = 2\n", "# file: solo.py\nS = 4\n",
                    "# file: zeta/__init__.py\nZ = 1\n"]
    src.max_doc_bytes = 20
    assert [d.text for d in iter_code(src, SourceStats())][:2] == ["# file: alpha/a.py\nA = 3\n",
                                                                   "# file: alpha/b.py\nB = 2\n"]


def test_tokenizer_sample_spreads_over_the_corpus(tmp_path):
    folder = make_corpus(tmp_path / "c", n=80)
    chars = sum(len(p.read_text()) for p in folder.iterdir())
    c = cfg([{"kind": "files", "paths": [str(folder)]}], max_tokens=chars // 4, tokenizer_bytes=chars // 4)
    texts = {p.read_text(): int(p.stem[3:]) for p in folder.iterdir()}
    picked = [texts[t] for t in tokenizer_sample(c)]
    assert 0.1 * chars < sum(len(t) for t in tokenizer_sample(c)) < 0.5 * chars
    assert picked == sorted(picked) and max(picked) >= 60 and len(picked) < 50  # not just the first files
    assert list(tokenizer_sample(c)) == list(tokenizer_sample(c))


def test_max_tokens_and_max_bytes(tmp_path, corpus):
    m = build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}], max_tokens=1000), tmp_path / "a")
    total = sum(s["tokens"] for s in m["splits"].values())
    assert 1000 <= total < 1000 + 200
    m = build_dataset(cfg([{"kind": "files", "paths": [str(corpus)], "max_bytes": "2k"}], val_fraction=0.0),
                      tmp_path / "b")
    assert 0 < m["sources"][0]["bytes"] <= 2048 and m["sources"][0]["docs"] < 24


def test_mixture_follows_the_fractions(tmp_path):
    folder = make_corpus(tmp_path / "c", n=60)
    m = build_dataset(cfg([{"kind": "files", "paths": [str(folder)]},
                           {"kind": "synthetic", "lengths": [150], "fraction": 0.3}], val_fraction=0.1),
                      tmp_path / "ds")
    tokens = [s["tokens"] for s in m["sources"]]
    assert m["sources"][0]["docs"] == 60  # the bounded source is read to its end
    assert abs(tokens[1] / sum(tokens) - 0.3) < 0.05


def test_synthetic_documents_answer_from_their_text():
    """Each template's answer can be found in its own text (and only by looking back at it)."""
    count = lambda pieces: [len(p) for p in pieces]  # noqa: E731 - additive, like a tokenizer at piece borders
    for i in range(12):
        for task in ("passkey", "kv", "vartrack"):
            prompt, answer = make_document(task, np.random.default_rng([7, i]), 600, count)
            assert 0.85 * 600 <= sum(count([prompt, answer])) + 2 <= 600
            value = answer.strip()
            if task == "passkey":
                assert f"secret number is {value}." in prompt
            elif task == "kv":
                key = re.search(r"value of record (\w+)\?", prompt).group(1)
                assert f"record {key} -> {value}\n" in prompt + "\n"
            else:
                env = {}
                for name, rhs in re.findall(r"LET (\w+) = (\w+)\.", prompt):
                    env[name] = env.get(rhs, rhs)
                asked = re.search(r"what value does (\w+) hold", prompt).group(1)
                assert env[asked] == value


def test_synthetic_lengths_in_real_tokens(tmp_path):
    m = build_dataset(cfg([{"kind": "synthetic", "docs": 6, "lengths": [300, 700]}], val_fraction=0.0),
                      tmp_path / "ds")
    ds = TokenDataset(tmp_path / "ds")
    assert m["sources"][0]["docs"] == 6
    for i in range(ds.n_docs):
        target = (300, 700)[i % 2]
        assert 0.9 * target <= len(ds.doc(i)) <= 1.02 * target


def test_sft_mask_covers_the_answer(tmp_path):
    out = tmp_path / "sft"
    m = build_dataset(cfg([{"kind": "synthetic", "docs": 8, "lengths": [200], "sft": True}], val_fraction=0.2), out)
    assert m["loss_mask"] is True
    ds = TokenDataset(out)
    tok = ds.tokenizer()
    assert ds.loss_mask is not None
    for i in range(ds.n_docs):
        lo, hi = ds.doc_starts[i], ds.doc_starts[i + 1]
        mask = ds.loss_mask[lo:hi]
        answer = tok.decode(ds.tokens[lo:hi][mask == 1][:-1].tolist())
        prompt = tok.decode(ds.tokens[lo:hi][mask == 0][1:].tolist())
        assert re.fullmatch(r" \w+", answer) and prompt.endswith("Answer:") and mask[-1] == 1
    batch = next(iter(PackedLoader(ds, seq_len=64, batch_size=2, seed=0)))
    assert (batch.labels != IGNORE_INDEX).sum() < batch.labels.numel() // 4


def test_jsonl_text_and_pairs(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"line {i} " * 20, "q": f"q{i}?", "a": f" a{i}"})
                           for i in range(20)) + "\n")
    m = build_dataset(cfg([{"kind": "files", "paths": [str(f)]}]), tmp_path / "plain")
    assert sum(s["docs"] for s in m["splits"].values()) == 20 and not m["loss_mask"]
    m = build_dataset(cfg([{"kind": "files", "paths": [str(f)], "prompt_field": "q", "answer_field": "a"}]),
                      tmp_path / "pairs")
    assert m["loss_mask"] is True
    with pytest.raises(MobaError, match=r"d.jsonl:1: no text field 'body'"):
        build_dataset(cfg([{"kind": "files", "paths": [str(f)], "text_field": "body"}]), tmp_path / "bad")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sources": [{"kind": "web"}]}, "unknown source kind 'web'"),
        ({"sources": [{"kind": "code", "colour": 1}]}, "unknown key 'colour'"),
        ({"sources": [{"kind": "code"}], "vocab_size": 100}, "too small"),
        ({"sources": [{"kind": "code"}], "vocab_size": "big"}, "expected a whole number"),
        ({"sources": [{"kind": "code"}], "max_tokens": "lots"}, "cannot read 'lots' as a size"),
        ({"sources": []}, "no sources"),
        ({"sources": [{"kind": "synthetic"}]}, "never end"),
        ({"sources": [{"kind": "synthetic", "tasks": ["riddle"], "docs": 1}]}, "unknown"),
        ({"sources": [{"kind": "code", "fraction": 0.7}, {"kind": "synthetic", "fraction": 0.7, "docs": 1}]},
         "add up to 1.4"),
        ({"sources": [{"kind": "files", "paths": ["x"], "prompt_field": "q"}]}, "both prompt_field"),
        ({"sources": [{"kind": "code", "group": "module"}]}, "group must be file or package"),
        ({"sources": [{"kind": "code"}], "max_tokens": 0}, "max_tokens must be positive"),
        ({"sources": [{"kind": "code", "max_bytes": -5}]}, "max_bytes must be positive"),
        ({"sources": [{"kind": "synthetic", "docs": 2, "lengths": [10]}]}, "at least 64 tokens"),
    ],
)
def test_config_errors(data, message):
    with pytest.raises(MobaError, match=re.escape(message)):
        config_from_dict(data)


def test_build_errors_leave_nothing(tmp_path, corpus):
    with pytest.raises(MobaError, match="file not found"):
        build_dataset(cfg([{"kind": "files", "paths": [str(tmp_path / "missing")]}]), tmp_path / "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(MobaError, match="empty corpus"):
        build_dataset(cfg([{"kind": "files", "paths": [str(tmp_path / "empty")]}]), tmp_path / "b")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"ok {i} " * 30}) + "\n" for i in range(10)) + "{oops\n")
    with pytest.raises(MobaError, match=r"bad.jsonl:11: not a JSON line"):
        build_dataset(cfg([{"kind": "files", "paths": [str(bad)]}]), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty"]  # no dataset, no partial folder
    with pytest.raises(MobaError, match="validation split is empty"):
        build_dataset(cfg([{"kind": "files", "paths": [str(corpus / "doc00.txt")]}]), tmp_path / "d")


def test_nothing_looks_complete_before_the_end(tmp_path, corpus):
    """While the build runs (where a kill could strike) DATA does not exist; a killed build's leftovers go."""
    out = tmp_path / "ds"
    stale = tmp_path / ".ds.partial-999999999"  # a build killed earlier: no such process
    stale.mkdir()
    seen = []

    def progress(phase, done, total):
        partial = list(tmp_path.glob(".ds.partial-*"))
        seen.append((out.exists(), len(partial), any((p / "manifest.json").exists() for p in partial)))

    build_dataset(cfg([{"kind": "files", "paths": [str(corpus)]}]), out, progress=progress)
    assert seen and all(s == (False, 1, False) for s in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_existing_output_is_protected(tmp_path, corpus):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    c = cfg([{"kind": "files", "paths": [str(corpus)]}])
    with pytest.raises(MobaError, match="already exists"):
        build_dataset(c, mine)
    with pytest.raises(MobaError, match="not a dataset built by moba"):
        build_dataset(c, mine, overwrite=True)
    assert (mine / "keep.txt").read_text() == "user data"
    out = tmp_path / "ds"
    first = build_dataset(c, out)
    second = build_dataset(c, out, overwrite=True)
    assert first["files_hash"] == second["files_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mine"]


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [f"row {i} " * 30 for i in range(20)]
    pq.write_table(pa.table({"body": rows, "n": list(range(20))}), tmp_path / "d.parquet")
    out = tmp_path / "ds"
    m = build_dataset(cfg([{"kind": "files", "paths": [str(tmp_path / "d.parquet")], "text_field": "body"}]), out)
    assert sum(s["docs"] for s in m["splits"].values()) == 20
    tok = TokenDataset(out).tokenizer()
    ds = TokenDataset(out)
    assert all(tok.decode(ds.doc(i)[1:-1].tolist()) in rows for i in range(ds.n_docs))
    with pytest.raises(MobaError, match="no column 'text'"):
        build_dataset(cfg([{"kind": "files", "paths": [str(tmp_path / "d.parquet")]}]), tmp_path / "bad")


def test_needle_documents_take_the_eval_prompt_form():
    """The `needle` task writes `moba eval needle`'s preamble, needle and question, asks for the first key,
    hides 1-3 keyed needles, and is the same for the same seed."""
    from moba_cli.evals.needle import PREAMBLE, Templates

    count = lambda pieces: [len(p) for p in pieces]  # noqa: E731
    t = Templates()
    seen_multi = False
    for i in range(20):
        prompt, answer = make_document("needle", np.random.default_rng([3, i]), 900, count)
        assert 0.85 * 900 <= sum(count([prompt, answer])) + 2 <= 900
        assert prompt.startswith(PREAMBLE)
        found = dict(re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d{7})\.", prompt))
        asked = re.search(r"What is the special magic number for ([\w-]+) mentioned", prompt).group(1)
        assert prompt.endswith("\n" + t.fill_question(asked))
        assert found[asked] == answer.strip()
        assert 1 <= len(found) <= 3
        seen_multi |= len(found) > 1
        again = make_document("needle", np.random.default_rng([3, i]), 900, count)
        assert again == (prompt, answer)
    assert seen_multi


def test_many_question_documents_answer_every_question_from_their_facts():
    """`needle_multi` and `kv_multi`: many facts, questions each followed by the right answer, the last one
    the document's answer; about the target length; the same for the same seed."""
    from moba_cli.evals.needle import PREAMBLE, Templates

    count = lambda pieces: [len(p) for p in pieces]  # noqa: E731
    t = Templates()
    for target in (2000, 12000):
        for i in range(5):
            prompt, answer = make_document("needle_multi", np.random.default_rng([4, i]), target, count)
            assert 0.85 * target <= sum(count([prompt, answer])) + 2 <= target
            assert prompt.startswith(PREAMBLE)
            facts = dict(re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d{7})\.", prompt))
            assert len(facts) == max(2, target // 256)
            qa = re.findall(r"magic number for ([\w-]+) mentioned in the provided text is (\d{7})\.", prompt)
            assert len(qa) == len(facts) - 1 and all(facts[k] == v for k, v in qa)
            last = re.findall(r"What is the special magic number for ([\w-]+) mentioned", prompt)[-1]
            assert prompt.endswith("\n" + t.fill_question(last)) and facts[last] == answer.strip()
            assert {k for k, _ in qa} | {last} == set(facts)  # every fact asked once
            assert make_document("needle_multi", np.random.default_rng([4, i]), target, count) == (prompt, answer)

            prompt, answer = make_document("kv_multi", np.random.default_rng([5, i]), target, count)
            assert 0.8 * target <= sum(count([prompt, answer])) + 2 <= target
            table = dict(re.findall(r"\nrecord ([0-9a-f]{8}) -> ([0-9a-f]{8})", prompt))
            lookups = re.findall(r"\nlookup ([0-9a-f]{8}) -> ([0-9a-f]{8})", prompt)
            assert len(table) >= 3 and len(lookups) >= 1
            assert all(table[k] == v for k, v in lookups)
            last = re.search(r"\nlookup ([0-9a-f]{8}) ->$", prompt).group(1)
            assert table[last] == answer.strip()
            assert make_document("kv_multi", np.random.default_rng([5, i]), target, count) == (prompt, answer)


def test_repeat_documents_copy_their_passage():
    """`repeat`: a marked passage, filler, then the same passage again, its last piece the answer; about
    the target length; the same for the same seed; the passage's length and distance vary by seed (a fixed
    distance let a tiny model copy by position instead of content)."""
    count = lambda pieces: [len(p) for p in pieces]  # noqa: E731
    start, stop, mid = "\n\nPassage:\n", "\nEnd of passage.\n", "\n\nThe same passage again:\n"
    for target in (300, 2000, 12000):
        distances, lengths = set(), set()
        for i in range(6):
            prompt, answer = make_document("repeat", np.random.default_rng([6, i]), target, count)
            first, second = prompt.split(mid)
            passage = first.split(start, 1)[1].split(stop, 1)[0]
            assert passage == second + answer and len(answer.strip()) > 0
            assert len(passage) <= target // 2 + 60
            distances.add(len(first) - first.index(start))
            lengths.add(len(passage))
            # (a short target fits few whole pieces: only its upper bound holds)
            assert (0.8 * target if target >= 2000 else 0) <= sum(count([prompt, answer])) + 2 <= target
            assert make_document("repeat", np.random.default_rng([6, i]), target, count) == (prompt, answer)
        if target >= 2000:
            assert len(distances) >= 5 and len(lengths) >= 5

