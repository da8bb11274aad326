"""moba eval ruler: task selection, the missing-lm-eval message, and one offline task end to end."""

import builtins
import json

import pytest

pytest.importorskip("transformers")

from eval_fixtures import tiny_checkpoint  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.errors import MobaError  # noqa: E402
from moba_cli.evals import ruler as rl  # noqa: E402

runner = CliRunner()


def _cli(*args):
    from moba_cli.cli import app

    return runner.invoke(app, ["eval", "ruler", *map(str, args)])


def test_parse_tasks():
    assert rl.parse_tasks("default", None) == list(rl.DEFAULT_TASKS)
    assert rl.parse_tasks("niah_single_1, ruler_vt,niah_single_1", None) == ["niah_single_1", "ruler_vt"]
    assert rl.parse_tasks("all", None) == list(rl.DEFAULT_TASKS)
    assert rl.parse_tasks("all", "essays.txt") == list(rl.DEFAULT_TASKS + rl.ESSAY_TASKS)
    with pytest.raises(MobaError, match="unknown RULER task"):
        rl.parse_tasks("niah_single_9", None)
    with pytest.raises(MobaError, match="download"):
        rl.parse_tasks("ruler_qa_squad", None)
    with pytest.raises(MobaError, match="cannot run offline"):
        rl.parse_tasks("ruler", None)
    with pytest.raises(MobaError, match="--essay-haystack"):
        rl.parse_tasks("niah_single_2", None)


def test_split_sentences():
    assert rl.split_sentences("One. Two? Three!  Four") == ["One.", "Two?", "Three!", "Four"]


def test_missing_lm_eval_is_one_line(tmp_path, monkeypatch):
    ckpt = tiny_checkpoint(tmp_path / "m", moba={"chunk_size": 32, "topk": 2})
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    r = _cli("--model", ckpt, "--out", tmp_path / "out")
    assert r.exit_code == 1 and "error:" in r.output and "pip install 'lm-eval[hf,ruler]==0.4.13'" in r.output
    assert not (tmp_path / "out").exists()


def test_unknown_task_fails_before_loading(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[hf,ruler]==0.4.13')")
    ckpt = tiny_checkpoint(tmp_path / "m", moba={"chunk_size": 32, "topk": 2})
    r = _cli("--model", ckpt, "--tasks", "niah_nope", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "unknown RULER task" in r.output


def _run_ruler(tmp_path, task: str, length: int, *more) -> tuple[dict, dict, str]:
    """``moba eval ruler`` on a tiny checkpoint, one task at one length, 1 sample, on the CPU: (result JSON,
    lm-eval's raw output, console output)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[hf,ruler]==0.4.13')")
    ckpt = tiny_checkpoint(tmp_path / "m", moba={"chunk_size": 32, "topk": 2})
    out = tmp_path / "out"
    r = _cli("--model", ckpt, "--tasks", task, "--lengths", length, "--samples", "1", "--device", "cpu",
             "--out", out, *more)
    assert r.exit_code == 0, r.output
    res = json.loads(next(out.glob("eval-ruler-*[0-9]Z.json")).read_text())
    return res, json.loads(next(out.glob("*-lm_eval.json")).read_text()), r.output


@pytest.mark.slow
def test_ruler_end_to_end_one_task(tmp_path):
    """niah_single_1 at one short length: MoBA with top-k covering every block answers exactly like full."""
    res, raw, _ = _run_ruler(tmp_path, "niah_single_1", 400, "--topk", "20")
    assert res["schema"] == "moba-result/1" and res["kind"] == "eval-ruler"
    recs = {(x["attn"], x["task"], x["length"]): x for x in res["records"]}
    assert set(recs) == {("moba", "niah_single_1", 400), ("full", "niah_single_1", 400)}  # no 4096 placeholder
    assert all(x["status"] == "ok" and x["samples"] == 1 and 0 <= x["score"] <= 1 for x in recs.values())
    assert recs[("moba", "niah_single_1", 400)]["moba_calls"] > 0  # lm-eval really ran MoBA
    assert res["summary"]["same_prompts"] is True
    moba, full = raw["moba"]["niah_single_1"]["samples"], raw["full"]["niah_single_1"]["samples"]
    assert [s["response"] for s in moba] == [s["response"] for s in full]
    assert moba[0]["length"] == 400


@pytest.mark.slow
def test_both_attentions_get_the_same_cwe_samples(tmp_path):
    """ruler_cwe's generator keeps a module-level random.Random: without a fresh load per run the second
    attention got other word lists (seen on the GPU: same_prompts False)."""
    res, raw, _ = _run_ruler(tmp_path, "ruler_cwe", 2000)
    assert res["summary"]["same_prompts"] is True
    moba, full = raw["moba"]["ruler_cwe"]["samples"], raw["full"]["ruler_cwe"]["samples"]
    assert len(moba) == 1 and moba[0]["prompt_sha256"] == full[0]["prompt_sha256"]


@pytest.mark.slow
def test_a_failing_lm_eval_task_is_a_record_not_a_traceback(tmp_path):
    """lm-eval's ruler_cwe generator divides by zero at 1K tokens: the run goes on, the records say
    ``error`` and the notes say why, in one line per task and attention."""
    res, _, output = _run_ruler(tmp_path, "ruler_cwe", 1000, "--attn", "full")
    assert "Traceback" not in output
    assert [x["status"] for x in res["records"]] == ["error"]
    assert "ZeroDivisionError" in res["records"][0]["error"]
    assert any("ruler_cwe (full): lm-eval failed" in n for n in res["summary"]["notes"])


def test_time_limit_interrupts_a_loop():
    import time

    t0 = time.perf_counter()
    with pytest.raises(rl.TaskTimeout), rl.deadline(0.2, "spin"):
        while True:  # like ruler_vt's sampler with a small-vocabulary tokenizer
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001 - a broad except inside lm-eval must not swallow the timeout
                pass
    assert time.perf_counter() - t0 < 5


def test_network_guard_blocks_connections():
    import socket

    with rl.network_blocked(), pytest.raises(rl.NetworkBlocked):
        socket.create_connection(("10.255.255.1", 80), timeout=1)
    err = RuntimeError("wrapped")
    err.__cause__ = rl.NetworkBlocked("blocked")
    assert isinstance(rl.network_cause(err), rl.NetworkBlocked)


@pytest.mark.slow
def test_essay_task_builds_offline_on_a_local_haystack(tmp_path):
    """niah_single_2 without the essay download or punkt: the local prose is the haystack."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[hf,ruler]==0.4.13')")
    ckpt = tiny_checkpoint(tmp_path / "m")
    prose = tmp_path / "prose.txt"
    prose.write_text(" ".join(f"The lighthouse keeper wrote entry {i} about the tide." for i in range(400)))
    from moba_cli.evals import model as em

    em.set_offline()
    rl.prepare_imports(str(prose))
    from lm_eval.tasks.ruler import niah_utils

    with rl.network_blocked():
        data = niah_utils.niah_single_2(tokenizer=str(ckpt), max_seq_lengths=[4096])["test"]
    assert len(data) == 500 and data[0]["max_length"] == 4096
    assert "lighthouse keeper" in data[0]["input"] and data[0]["outputs"][0] in data[0]["input"]
