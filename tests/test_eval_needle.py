"""moba eval needle: exact prompt building, scoring against brute force, resume, the command end to end."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from eval_fixtures import bpe_tokenizer, char_tokenizer, tiny_checkpoint  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.errors import MobaError  # noqa: E402
from moba_cli.evals import model as em  # noqa: E402
from moba_cli.evals.haystack import haystack_tokens  # noqa: E402
from moba_cli.evals.needle import (  # noqa: E402
    Templates,
    encode_parts,
    exact_match,
    make_samples,
    parse_depths,
    score_batch,
)
from moba_cli.evals.needle_run import NeedleConfig, run_needle  # noqa: E402
from moba_cli.evals.state import PartialRun  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("needle") / "m", moba={"chunk_size": 32, "topk": 2})


@pytest.mark.parametrize("make_tok", [bpe_tokenizer, char_tokenizer], ids=["bpe", "char"])
@pytest.mark.parametrize("haystack", ["noise", "code"])
def test_needle_lands_at_exact_depth(make_tok, haystack):
    tok = make_tok()
    t = Templates()
    special = em.special_prefix(tok)
    assert special == ([tok.bos_token_id] if make_tok is bpe_tokenizer else [])
    for length in (401, 517, 1000):
        hay = haystack_tokens(tok, haystack, length).ids
        for depth in (0.0, 12.5, 33.0, 50.0, 99.0, 100.0):
            for s in make_samples(tok, t, hay, special, length, depth, 2, seed=3, distractors=4):
                parts = encode_parts(tok, t, s.key, s.value, special)
                h = length - len(parts.prefix) - len(parts.needle) - len(parts.question)
                p = round(depth / 100 * h)
                assert len(s.ids) == length
                assert s.needle_start == len(parts.prefix) + p
                assert s.ids[: len(parts.prefix)] == parts.prefix
                assert s.ids[s.needle_start : s.needle_start + s.needle_len] == parts.needle
                assert s.ids[len(parts.prefix) : s.needle_start] == hay[:p]
                assert s.ids[s.needle_start + s.needle_len : length - len(parts.question)] == hay[p:h]
                assert s.ids[length - len(parts.question) :] == parts.question
                assert s.value in tok.decode(parts.needle) and s.key in tok.decode(parts.question)
                assert len({s.value, *[tok.decode(c).strip() for c in s.candidates]}) == 5  # distinct values


def test_samples_differ_and_repeat():
    tok = bpe_tokenizer()
    hay = haystack_tokens(tok, "noise", 400).ids
    a = make_samples(tok, Templates(), hay, [], 400, 50.0, 3, seed=1, distractors=3)
    b = make_samples(tok, Templates(), hay, [], 400, 50.0, 3, seed=1, distractors=3)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert len({s.value for s in a}) == 3 and len({s.key for s in a}) >= 2


def test_depths_and_templates():
    assert parse_depths("11") == [float(10 * i) for i in range(11)]
    assert parse_depths("1") == [50.0]
    assert parse_depths("100,0,50") == [0.0, 50.0, 100.0]
    for bad in ("0", "102", "x", "-5,50", "0,101"):
        with pytest.raises(MobaError):
            parse_depths(bad)
    with pytest.raises(MobaError, match="value"):
        Templates(needle="the number for {key}").check()
    with pytest.raises(MobaError, match="key"):
        Templates(question="What is the number?").check()
    with pytest.raises(MobaError, match="give the answer away"):
        Templates(question="{key} is {value}").check()
    assert exact_match("The number is 1234567.", "1234567") and not exact_match("123456", "1234567")


@torch.no_grad()
def _brute_logprob(model, prompt: list[int], cand: list[int]) -> float:
    ids = torch.tensor([prompt + cand])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cand))


@pytest.mark.parametrize("attn", ["full", "moba"])
def test_scores_match_brute_force(ckpt, attn):
    """One prefill + rewound cache gives the same log-probs and greedy answer as separate full passes."""
    torch.manual_seed(0)
    lm = em.load(ckpt, ["moba", "full"], device=torch.device("cpu"), dtype=torch.float32)
    tok = lm.tokenizer
    hay = haystack_tokens(tok, "noise", 200).ids
    samples = make_samples(tok, Templates(), hay, em.special_prefix(tok), 199, 40.0, 2, seed=0, distractors=3)
    with em.attention(lm, attn):
        rows = score_batch(lm.model, tok, samples, gen_tokens=4)
        for s, r in zip(samples, rows, strict=True):
            lps = [_brute_logprob(lm.model, s.ids, c) for c in s.candidates]
            assert r["logprob"] == pytest.approx(lps[0], rel=1e-4, abs=1e-4)
            assert r["rank"] == 1 + sum(lp >= lps[0] for lp in lps[1:])
            assert r["margin"] == pytest.approx(lps[0] - max(lps[1:]), rel=1e-4, abs=1e-4)
            gen = lm.model.generate(torch.tensor([s.ids]), max_new_tokens=4, do_sample=False, min_new_tokens=4)
            assert r["answer"] == tok.decode(gen[0, len(s.ids) :], skip_special_tokens=True)[:200]


def test_resume_after_interruption(ckpt, tmp_path):
    lm = em.load(ckpt, ["full"], device=torch.device("cpu"), dtype=torch.float32)
    cfg = NeedleConfig([200], [0.0, 50.0, 100.0], samples=1, distractors=2, gen_extra=1)

    class Stop(Exception):
        pass

    calls = []

    def tick(n, desc):
        calls.append(desc)
        if len(calls) == 2:
            raise Stop  # interrupted while the second cell is being written

    state = PartialRun(tmp_path, "eval-needle", cfg.settings(), ("attn", "length", "depth"))
    state.open(resume=False)
    with pytest.raises(Stop):
        run_needle(lm, cfg, ["full"], state, tick)
    lines = state.path.read_text().splitlines()
    assert len(lines) == 2  # header + the one finished cell
    state2 = PartialRun(tmp_path, "eval-needle", cfg.settings(), ("attn", "length", "depth"))
    notes = state2.open(resume=True)
    assert state2.resumed == 1 and "resumed 1" in notes[0]
    seen = []
    records, _ = run_needle(lm, cfg, ["full"], state2, lambda n, d: seen.append(d))
    assert sum("resumed" in d for d in seen) == 1 and len(seen) == 3
    other = PartialRun(tmp_path / "b", "eval-needle", cfg.settings(), ("attn", "length", "depth"))
    other.open(resume=False)
    fresh, _ = run_needle(lm, cfg, ["full"], other)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records) == strip(fresh)


def _cli(*args):
    from moba_cli.cli import app

    return runner.invoke(app, ["eval", "needle", *map(str, args)])


def test_needle_command_both_identical_when_topk_covers_all(ckpt, tmp_path):
    """--attn both, top-k covering every block: MoBA and full give the same scores; result and plots."""
    out = tmp_path / "out"
    r = _cli("--model", ckpt, "--attn", "both", "--lengths", "200,260", "--depths", "1", "--samples", "2",
             "--distractors", "3", "--answer-tokens", "1", "--device", "cpu", "--topk", "12", "--out", out)
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.endswith(".json")] and not [f for f in files if "partial" in f], files
    res = json.loads(next(out.glob("*.json")).read_text())
    assert res["schema"] == "moba-result/1" and res["kind"] == "eval-needle"
    assert res["config"]["moba"]["topk"] == 12 and res["config"]["attn"] == ["moba", "full"]
    recs = res["records"]
    assert len(recs) == 2 * 1 * 2 and all(r["status"] == "ok" and r["samples"] == 2 for r in recs)
    by = {(r["attn"], r["length"], r["depth"]): r for r in recs}
    for (attn, n, d), rec in by.items():
        if attn != "moba":
            continue
        assert rec["moba_calls"] > 0
        full = by[("full", n, d)]
        for a, b in zip(rec["per_sample"], full["per_sample"], strict=True):
            assert (a["value"], a["rank"], a["exact"], a["answer"]) == (b["value"], b["rank"], b["exact"], b["answer"])
            assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-4, abs=1e-4)
    for name in ("moba", "full", "diff"):
        png = next(out.glob(f"*-{name}.png"))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["summary"]["scores"]) == {"moba", "full"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/nope"], "not a directory"),
        (["--model", "{notok}"], "no tokenizer"),
        (["--model", "{ckpt}", "--lengths", "4q"], "--lengths"),
        (["--model", "{ckpt}", "--depths", "0"], "between 1 and 101"),
        (["--model", "{ckpt}", "--depths", "102"], "between 1 and 101"),
        (["--model", "{ckpt}", "--needle", "magic {key}"], "{value}"),
        (["--model", "{ckpt}", "--attn", "sparse"], "--attn"),
        (["--model", "{ckpt}", "--haystack", "{tmp}/missing.txt"], "haystack"),
        (["--model", "{ckpt}", "--lengths", "20", "--device", "cpu"], "no room"),
        (["--model", "{plain}", "--device", "cpu"], "pass both --chunk and --topk"),
    ],
)
def test_needle_bad_input(ckpt, tmp_path, args, message):
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text((ckpt / "config.json").read_text())
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ckpt.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["moba"]
    (plain / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(ckpt)).replace("{notok}", str(notok))
            .replace("{plain}", str(plain))
            for a in args]
    r = _cli(*args, "--out", out)
    assert r.exit_code == 1
    assert "error:" in r.output and message in r.output and "Traceback" not in r.output
    assert not out.exists() or not any(out.iterdir())


def test_oom_cell_is_recorded_and_run_goes_on(ckpt, tmp_path, monkeypatch):
    from moba_cli.evals import needle_run

    lm = em.load(ckpt, ["full"], device=torch.device("cpu"), dtype=torch.float32)
    cfg = NeedleConfig([200, 1100], [50.0], samples=2, distractors=2, gen_extra=0)
    real = needle_run.score_batch

    def fake(model, tok, samples, gen):
        if len(samples[0].ids) > 1024:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tok, samples, gen)

    monkeypatch.setattr(needle_run, "score_batch", fake)
    state = PartialRun(tmp_path, "eval-needle", cfg.settings(), ("attn", "length", "depth"))
    state.open(resume=False)
    records, notes = run_needle(lm, cfg, ["full"], state)
    assert [r["status"] for r in records] == ["ok", "oom"] and "out of memory" in records[1]["error"]
    assert records[1]["beyond_trained_positions"] and any("max_position_embeddings" in n for n in notes)


def test_needle_command_resumes_after_ctrl_c(ckpt, tmp_path, monkeypatch):
    from moba_cli.evals import needle_run

    out = tmp_path / "out"
    args = ["--model", ckpt, "--attn", "full", "--lengths", "200", "--depths", "3", "--samples", "1",
            "--distractors", "2", "--answer-tokens", "0", "--device", "cpu", "--no-plot", "--out", out]
    real = needle_run.score_batch
    calls = []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(needle_run, "score_batch", interrupt_second)
    r = _cli(*args)
    assert r.exit_code == 130 and "--resume" in r.output, r.output
    partial = list(out.glob(".eval-needle-*.partial.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 2  # header + one cell
    assert not list(out.glob("*.json"))
    monkeypatch.setattr(needle_run, "score_batch", real)
    r = _cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "resumed 1 finished cell" in r.output
    res = json.loads(next(out.glob("eval-needle-*.json")).read_text())
    assert [rec["depth"] for rec in res["records"]] == [0.0, 50.0, 100.0]
    assert not list(out.glob(".eval-needle-*"))  # the partial file is gone once the result is written
