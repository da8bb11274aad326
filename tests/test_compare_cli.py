"""`moba compare` end to end (Typer CliRunner) and the analysis behind it (recall, sparsity, equivalence)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moba_cli.analysis import equivalence, error_stats, inputs, recall, sparse_vs_full
from moba_cli.cli import app
from moba_cli.ops.moba import full_attention, make_layout
from moba_cli.ops.moba.naive import block_means, select_blocks

runner = CliRunner()
TINY = ["--seq", "256", "--chunk", "32", "--topk", "2", "--heads", "2", "--head-dim", "16", "--device", "cpu"]


def run(*args: str):
    return runner.invoke(app, ["compare", *args])


def read_json(path) -> dict:
    return json.loads(open(path).read())


def cu(*lens: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- CLI


def test_small_run_writes_a_valid_result(tmp_path):
    res = run(*TINY, "--kv-heads", "1", "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    data = read_json(tmp_path / "r.json")
    assert data["schema"] == "moba-result/1" and data["kind"] == "compare"
    assert {"env", "config", "records", "summary", "created"} <= set(data)
    c = data["config"]
    assert (c["seq"], c["chunk"], c["topk"], c["heads"], c["kv_heads"], c["head_dim"]) == (256, 32, 2, 2, 1, 16)
    assert c["dtype"] == "float32" and c["device"] == "cpu" and c["backend"] == "naive"
    s = data["summary"]
    eq = s["equivalence"]
    assert eq["passed"] is True
    assert {"passed", "max_abs", "rel_l2", "tolerance"} <= set(eq)
    assert eq["rel_l2"] <= eq["tolerance"]["rel_l2"] and eq["rows_checked"] == 256
    assert 0.0 <= s["recall_p5"] <= s["recall_mean"] <= 1.0
    assert s["recall_mean"] <= s["recall_oracle_mean"] + 1e-6  # the oracle is the best possible choice
    assert s["recall_mean"] < 0.99  # 8 blocks, 2 chosen: some mass must be lost
    assert s["recall_sampled_rows"] is None
    # 8 blocks of 32, top-2: a query in block b attends min(b, 1) past blocks plus its own prefix.
    attended = sum(min(i // 32, 1) * 32 + i % 32 + 1 for i in range(256))
    assert s["sparsity"] == pytest.approx(1 - attended / (256 * 257 / 2))
    assert s["sparsity"] > 0.4
    assert s["rel_l2"] > 0.01 and s["max_abs"] > 0  # MoBA at top-2 of 8 is not full attention
    assert len(data["records"]) == 2 and [r["kv_head"] for r in data["records"]] == [0, 0]
    for r in data["records"]:
        assert 0.0 <= r["recall_p5"] <= r["recall_mean"] <= 1.0
    assert "equivalence" in res.output and "passed" in res.output and "r.json" in res.output


def test_defaults_run_and_out_folder(tmp_path):
    # No size options at all: the CPU defaults (the README's first command) must run quickly.
    res = run("--device", "cpu", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    files = list(tmp_path.glob("compare-*.json"))
    assert len(files) == 1
    data = read_json(files[0])
    assert data["config"]["seq"] == inputs.DEFAULTS["cpu"]["seq"]
    assert data["summary"]["blocks_per_sequence"] >= 8  # a first run must show real sparsity
    assert data["summary"]["sparsity"] > 0.5
    assert data["summary"]["equivalence"]["passed"] is True


def test_qkv_file_round_trip(tmp_path):
    # Saving the random inputs of --seed 3 and loading them with --qkv must give the same numbers.
    setup = inputs.CompareSetup(seq=96, batch=2, heads=4, kv_heads=2, head_dim=8, chunk=16, topk=2,
                             dtype=torch.float32, device=torch.device("cpu"), backend="naive", seed=3)
    q, k, v = inputs.random_qkv(setup)
    save_file({"q": q, "k": k, "v": v}, str(tmp_path / "qkv.safetensors"))
    a = run("--qkv", str(tmp_path / "qkv.safetensors"), "--chunk", "16", "--topk", "2", "--device", "cpu",
            "--out", str(tmp_path / "a.json"))
    assert a.exit_code == 0, a.output
    b = run("--seq", "96", "--batch", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--chunk", "16",
            "--topk", "2", "--seed", "3", "--device", "cpu", "--out", str(tmp_path / "b.json"))
    assert b.exit_code == 0, b.output
    ra, rb = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert ra["config"]["qkv"].endswith("qkv.safetensors") and ra["config"]["kv_heads"] == 2
    for key in ("rel_l2", "max_abs", "recall_mean", "recall_p5", "sparsity"):
        assert ra["summary"][key] == pytest.approx(rb["summary"][key], rel=1e-6, abs=1e-7), key
    # [S, H, D] tensors are one sequence; a half-precision file keeps its dtype under --dtype auto.
    save_file({"q": q[0].half(), "k": k[0].half(), "v": v[0].half()}, str(tmp_path / "one.safetensors"))
    c = run("--qkv", str(tmp_path / "one.safetensors"), "--chunk", "16", "--device", "cpu",
            "--out", str(tmp_path / "c.json"))
    assert c.exit_code == 0, c.output
    rc = read_json(tmp_path / "c.json")
    assert rc["config"]["batch"] == 1 and rc["config"]["seq"] == 96 and rc["config"]["dtype"] == "float16"
    assert rc["summary"]["equivalence"]["passed"] is True


def _bad_files(tmp_path):
    save_file({"q": rand(8, 2, 4, seed=0), "k": rand(8, 2, 4, seed=1)}, str(tmp_path / "nov.safetensors"))
    save_file({"q": rand(8, 8, seed=0), "k": rand(8, 8, seed=1), "v": rand(8, 8, seed=2)},
              str(tmp_path / "rank2.safetensors"))
    save_file({"q": rand(8, 3, 4, seed=0), "k": rand(8, 2, 4, seed=1), "v": rand(8, 2, 4, seed=2)},
              str(tmp_path / "heads.safetensors"))
    save_file({"q": rand(8, 2, 4, seed=0), "k": rand(9, 2, 4, seed=1), "v": rand(9, 2, 4, seed=2)},
              str(tmp_path / "len.safetensors"))
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seq", "0"], "--seq"),
        (["--seq", "lots"], "--seq"),
        (["--chunk", "0"], "--chunk"),
        (["--chunk", "-8"], "--chunk"),
        (["--topk", "0"], "--topk"),
        (["--heads", "0"], "--heads"),
        (["--batch", "0"], "--batch"),
        (["--head-dim", "0"], "--head-dim"),
        (["--heads", "6", "--kv-heads", "4"], "must divide"),
        (["--dtype", "float64"], "unknown dtype"),
        (["--device", "tpu"], "unknown device"),
        (["--backend", "flash"], "unknown backend"),
        (["--qkv", "missing.safetensors"], "not found"),
        (["--qkv", "{tmp}/junk.safetensors"], "cannot read"),
        (["--qkv", "{tmp}/nov.safetensors"], "no tensor named v"),
        (["--qkv", "{tmp}/rank2.safetensors"], "[B, S, H, D] or [S, H, D]"),
        (["--qkv", "{tmp}/heads.safetensors"], "multiple"),
        (["--qkv", "{tmp}/len.safetensors"], "must agree"),
        (["--qkv", "{tmp}/heads.safetensors", "--heads", "3"], "multiple"),
        (["--qkv", "{tmp}/len.safetensors", "--seq", "4"], "must agree"),
        (["--chunk", "99999999999999999999"], "--chunk"),
        (["--chunk", str(2**31)], "--chunk"),
        (["--topk", str(2**40)], "--topk must be at most"),
        (["--seed", "99999999999999999999999"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--batch", str(2**22), "--seq", "1k"], "--batch x --seq"),
        (["--text", "x.txt"], "--text needs --model"),
        (["--model", "m", "--qkv", "f"], "cannot be combined with --model"),
    ],
)
def test_bad_inputs_exit_1_with_one_line(tmp_path, args, needle):
    _bad_files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = run(*args, "--out", str(tmp_path / "out"))
    assert res.exit_code == 1, res.output
    assert "error:" in res.output and needle in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_qkv_shape_conflict(tmp_path):
    q = rand(1, 32, 2, 8, seed=0)
    save_file({"q": q, "k": q.clone(), "v": q.clone()}, str(tmp_path / "f.safetensors"))
    res = run("--qkv", str(tmp_path / "f.safetensors"), "--heads", "4", "--device", "cpu")
    assert res.exit_code == 1 and "--heads 4 conflicts with the --qkv file" in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_one_line_error():
    res = run("--device", "cuda")
    assert res.exit_code == 1 and "no CUDA GPU" in res.output and "Traceback" not in res.output


def test_triton_backend_errors(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the triton backend is available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    res = run(*TINY, "--backend", "triton", "--out", str(tmp_path))
    assert res.exit_code == 1 and "needs CUDA tensors" in res.output, res.output
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    res = run("--head-dim", "48", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path))
    assert res.exit_code == 1 and "head dim 48" in res.output, res.output


def test_triton_backend_checks_the_sparse_kernels(monkeypatch, tmp_path):
    # Tiny, because without a GPU the kernels run under the Triton interpreter.
    from moba_cli.ops.moba import dense

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def no_dense(*args, **kwargs):
        raise AssertionError("the equivalence check must run the sparse kernels, not the dense shortcut")

    monkeypatch.setattr(dense, "dense_causal", no_dense)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = run("--backend", "triton", "--seq", "64", "--chunk", "16", "--topk", "2", "--heads", "2", "--kv-heads", "1",
              "--head-dim", "32", "--dtype", "float32", "--device", device, "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    s = read_json(tmp_path / "r.json")["summary"]
    assert s["selection"] == "triton gate" and s["selection_agreement"] == 1.0
    assert s["equivalence"]["passed"] is True and s["equivalence"]["path"] == "sparse kernels"
    assert 0 < s["sparsity"] < 1


def test_equivalence_run_asks_for_the_sparse_kernels_through_options(monkeypatch):
    """No module global is flipped: the all-blocks run passes KernelOptions(dense_when_full=False)."""
    import moba_cli.ops.moba as ops

    seen = []

    def fake(q, k, v, *, chunk_size, topk, backend, options=None):
        seen.append(options)
        return q

    monkeypatch.setattr(ops, "moba_attention", fake)
    x = torch.zeros(1, 8, 1, 4)
    equivalence.run_moba(x, x, x, 4, 2, "triton", sparse_only=True)
    equivalence.run_moba(x, x, x, 4, 2, "triton")
    equivalence.run_moba(x, x, x, 4, 2, "naive", sparse_only=True)
    assert seen[0] is not None and seen[0].dense_when_full is False
    assert seen[1] is None and seen[2] is None


def test_equivalence_failure_exits_1_after_writing(monkeypatch, tmp_path):
    real = equivalence.run_moba

    def broken(q, k, v, chunk, topk, backend, sparse_only=False):
        out = real(q, k, v, chunk, topk, backend, sparse_only)
        blocks = math.ceil(q.shape[1] / chunk)
        return out + 1e-3 if topk >= blocks else out  # wrong only in the all-blocks run

    monkeypatch.setattr(equivalence, "run_moba", broken)
    res = run(*TINY, "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1, res.output
    assert "equivalence check failed" in res.output and "Traceback" not in res.output
    eq = read_json(tmp_path / "r.json")["summary"]["equivalence"]
    assert eq["passed"] is False and eq["max_abs"] == pytest.approx(1e-3, rel=1e-3)


def test_help():
    res = runner.invoke(app, ["compare", "--help"])
    assert res.exit_code == 0
    for word in ("--qkv", "--seq", "--chunk", "--topk", "--kv-heads", "--model", "recall", "sparsity", "equivalence"):
        assert word in res.output, word


def test_model_branch_delegates(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("moba_cli.commands.compare_model")
    fake.run_model_compare = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "moba_cli.commands.compare_model", fake)
    res = run("--model", str(tmp_path), "--text", "t.txt", "--seq", "4k", "--dtype", "bf16", "--device", "cpu",
              "--out", str(tmp_path / "o"))
    assert res.exit_code == 0, res.output
    assert calls == [{"model": tmp_path, "text": Path("t.txt"), "out": tmp_path / "o",
                      "device": "cpu", "dtype": "bf16", "seq": 4096, "backend": None}]
    # --backend reaches the model comparison instead of being dropped; auto keeps the checkpoint's choice
    res = run("--model", str(tmp_path), "--backend", "Naive", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert calls[-1]["backend"] == "naive"
    _one_line_error(run("--model", str(tmp_path), "--backend", "flash"), "unknown backend 'flash'")
    assert len(calls) == 2


def test_model_branch_missing_module(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "moba_cli.commands.compare_model", None)  # import fails as if absent
    res = run("--model", str(tmp_path))
    assert res.exit_code == 1 and "not available" in res.output and "Traceback" not in res.output


def _one_line_error(res, needle: str) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "out,needle",
    [
        ("{file}/r.json", "is a file, not a folder"),  # the parent folder is a file
        ("{file}/sub/r.json", "is a file, not a folder"),
        ("{file}", "is a file; give a folder or a path ending in .json"),  # a file without .json is no folder
        ("{dir}", "is a folder; give a new .json file name"),  # a folder named like a .json file
    ],
)
def test_unusable_out_fails_before_the_run(monkeypatch, tmp_path, out, needle):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.json").mkdir()
    out = out.format(file=tmp_path / "afile", dir=tmp_path / "d.json")

    def never(*a, **k):
        raise AssertionError("the comparison must not start when --out cannot be written")

    monkeypatch.setattr(sparse_vs_full, "run_compare", never)
    line = _one_line_error(run(*TINY, "--out", out), needle)
    assert line.startswith(f"error: --out {out}")


def test_result_that_cannot_be_written_is_one_line(monkeypatch, tmp_path):
    # Past the early check (a disk that fills up or turns read-only during the run): still one line.
    import moba_cli.results as results

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(results, "check_out", lambda *a, **k: None)
    out = tmp_path / "afile" / "r.json"
    _one_line_error(run(*TINY, "--out", str(out)), f"cannot write the result {out}")
    assert not list(tmp_path.glob("**/*.tmp"))


def test_qkv_and_text_folders_are_named_as_folders(tmp_path):
    _one_line_error(run("--qkv", str(tmp_path), "--device", "cpu"), "is a folder; give a safetensors file")
    pytest.importorskip("transformers")
    _one_line_error(run("--model", str(tmp_path), "--text", str(tmp_path), "--device", "cpu"),
                    "is a folder; give a text file")


def test_model_compare_checks_out_before_loading(tmp_path):
    (tmp_path / "afile").write_text("x")
    # tmp_path is no checkpoint: reaching the model loader would give a different error
    _one_line_error(run("--model", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "afile" / "r.json")),
                    "is a file, not a folder")


def test_help_paragraphs_have_no_line_breaks_inside_sentences():
    from moba_cli.commands import compare

    # rich wraps each source line to the terminal; a break inside a sentence shows up as a ragged line
    for line in compare.HELP.split("\n"):
        assert line == "" or line.endswith((".", ":")), line
    res = runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0 and max(map(len, res.output.splitlines())) <= 80


# -------------------------------------------------------------------------------------------- analysis


@pytest.mark.parametrize("nan_key", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_tiled_selection_equals_the_reference_rule(hq, hkv, nan_key):
    lens = (70, 33, 128)
    c = cu(*lens)
    q, k = rand(sum(lens), hq, 8, seed=1), rand(sum(lens), hkv, 8, seed=2)
    k[16:24] = k[0:8]  # an exact tie between blocks 0 and 2 of the first sequence
    if nan_key:  # a NaN block mean ranks first in the reference rule (as in the Triton gate): same here
        k[110, 0, 3] = float("nan")
    layout = make_layout(c, 8)
    for topk in (1, 2, 4):
        want = select_blocks(q, k, layout, topk).long()
        means = block_means(k, layout)
        slots = want.shape[-1]
        for s0, s1 in zip(c[:-1].tolist(), c[1:].tolist(), strict=True):
            first = int(layout.token_first_block[s0])
            nb = math.ceil((s1 - s0) / 8)
            for r0 in range(0, s1 - s0, 13):  # ragged tiles
                r1 = min(s1 - s0, r0 + 13)
                got = recall.select_tile(q[s0 + r0 : s0 + r1], means[first : first + nb], torch.arange(r0, r1), 8,
                                      slots, first)
                assert torch.equal(got, want[s0 + r0 : s0 + r1]), (topk, s0, r0)


def test_reference_rows_is_dense_attention_and_mass_sums_to_one():
    q, k, v = rand(50, 4, 8, seed=3), rand(50, 2, 8, seed=4), rand(50, 2, 8, seed=5)
    ref = full_attention(q[None], k[None], v[None], backend="naive")[0]
    rows = torch.tensor([0, 7, 8, 31, 49])
    out, mass = recall.reference_rows(q[rows], k, v, rows, 8, 1 / math.sqrt(8))
    torch.testing.assert_close(out, ref[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(5, 4))
    # No mass on blocks after the query's own block.
    own = rows // 8
    later = torch.arange(mass.shape[-1])[None, :] > own[:, None]
    assert (mass.masked_select(later[:, None, :].expand_as(mass)) == 0).all()


def test_recall_equals_brute_force_and_sparsity_is_counted():
    lens = (45, 20)
    c = cu(*lens)
    q, k, v = rand(65, 2, 8, seed=6), rand(65, 1, 8, seed=7), rand(65, 1, 8, seed=8)
    ana = recall.analyse_selection(q, k, v, c, 8, 2)
    layout = make_layout(c, 8)
    idx = select_blocks(q, k, layout, 2)
    want_recall, attended = [], 0
    for s0, s1 in zip(c[:-1].tolist(), c[1:].tolist(), strict=True):
        n = s1 - s0
        s = torch.einsum("qhd,kd->qhk", q[s0:s1], k[s0:s1, 0]) / math.sqrt(8)
        s = s.masked_fill(torch.ones(n, n).triu(1).bool()[:, None, :], float("-inf"))
        p = torch.softmax(s, -1)
        key_block = layout.token_block[s0:s1].long()
        mask = (idx[s0:s1, :, :, None].long() == key_block[None, None, None, :]).any(2)  # [n, H, keys]
        mask &= ~torch.ones(n, n).triu(1).bool()[:, None, :]
        want_recall.append((p * mask).sum(-1))
        attended += int(mask.sum())
    torch.testing.assert_close(ana.recall, torch.cat(want_recall), rtol=1e-5, atol=1e-6)
    causal = 2 * sum(n * (n + 1) // 2 for n in lens)
    assert ana.causal_pairs == causal and ana.attended_pairs == attended
    assert ana.sparsity == pytest.approx(1 - attended / causal)
    assert (ana.recall <= ana.recall_oracle + 1e-6).all()


def test_all_blocks_gives_full_recall_and_no_sparsity():
    q, k, v = rand(40, 2, 8, seed=9), rand(40, 2, 8, seed=10), rand(40, 2, 8, seed=11)
    ana = recall.analyse_selection(q, k, v, cu(40), 8, 5)
    torch.testing.assert_close(ana.recall, torch.ones_like(ana.recall))
    assert ana.sparsity == 0.0


def test_sampled_rows_match_the_full_computation():
    q, k, v = rand(96, 2, 8, seed=12), rand(96, 2, 8, seed=13), rand(96, 2, 8, seed=14)
    c = cu(60, 36)
    full = recall.analyse_selection(q, k, v, c, 8, 2)
    part = recall.analyse_selection(q, k, v, c, 8, 2, max_rows=50, sample_rows=20, seed=1)
    assert part.sampled and not full.sampled and part.rows.numel() == 20
    assert part.rows.unique().numel() == 20
    assert part.rows.max() >= 60 and part.rows.min() < 48  # uniform over all rows, not the first ones
    torch.testing.assert_close(part.recall, full.recall[part.rows])
    assert part.sparsity == full.sparsity  # sparsity always uses every row


def test_equivalence_on_a_prefix_when_all_blocks_is_too_big(monkeypatch, tmp_path):
    assert equivalence.equivalence_length(1, 256, 2, 32) == 256
    monkeypatch.setattr(equivalence, "EQUIV_MAX_ENTRIES", 2 * 64 * 2)  # fits 64 tokens x 2 blocks x 2 heads
    assert equivalence.equivalence_length(1, 256, 2, 32) == 64
    assert equivalence.equivalence_length(4, 256, 2, 32) == 32  # never below one block
    res = run(*TINY, "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    s = read_json(tmp_path / "r.json")["summary"]
    eq = s["equivalence"]
    assert eq["tokens_per_sequence"] == 64 and eq["topk"] == 2 and eq["rows_checked"] == 64 and eq["passed"]
    assert s["blocks_per_sequence"] == 8 and s["sparsity"] > 0.4  # the main run still covers every token


def test_error_stats_and_percentile():
    ref = torch.zeros(3, 2, 4)
    ref[..., 0] = 1.0
    out = ref.clone()
    out[1, 1, 0] = 1.5
    st = error_stats.output_error(out, ref, rows_per_step=2)
    assert st.summary()["max_abs"] == pytest.approx(0.5)
    assert st.rel_l2() == pytest.approx(0.5 / math.sqrt(6))
    assert st.head_rel_l2() == pytest.approx([0.0, 0.5 / math.sqrt(3)])
    assert st.summary()["worst_row_rel_l2"] == pytest.approx(0.5)
    x = torch.arange(101, dtype=torch.float32)
    assert error_stats.percentile(x, 5) == pytest.approx(5.0)
    assert error_stats.percentile(torch.tensor([1.0, 2.0]), 50) == pytest.approx(1.5)


def test_equivalence_tolerance():
    assert equivalence.equivalence_tolerance(torch.bfloat16, 1e-3)["rel_l2"] == 2e-2  # the floor
    assert equivalence.equivalence_tolerance(torch.float32, 1e-3)["rel_l2"] == pytest.approx(2e-3)  # 2x SDPA's error
    tol = equivalence.equivalence_tolerance(torch.float16, 0.0)
    assert tol["worst_row_rel_l2"] == pytest.approx(equivalence.EQUIV_ROW_FACTOR * tol["rel_l2"])


def test_model_compare_kl_is_never_negative():
    """KL(full || MoBA) of nearly identical logits can round below 0 in float32: clamp it and say so."""
    from moba_cli.integrations.model_compare import _logit_stats

    class Model:
        def __init__(self, head):
            self.head = head

        def get_output_embeddings(self):
            return self.head

    torch.manual_seed(0)
    vocab = 32000
    head = torch.nn.Linear(64, vocab, bias=False).requires_grad_(False)
    h_full = torch.randn(1, 65, 64) * 10
    ids = torch.randint(0, vocab, (1, 65))
    notes = []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        h_moba = h_full + 1e-7 * torch.randn(h_full.shape, generator=g)
        stats = _logit_stats(Model(head), h_moba, h_full, ids)
        assert stats["kl_full_moba_mean"] >= 0.0
        if "kl_note" in stats:
            assert stats["kl_full_moba_mean"] == 0.0 and "rounding" in stats["kl_note"]
            notes.append(stats["kl_note"])
    assert notes, "no seed rounded below zero: the test no longer exercises the clamp"


def _strict_json(path) -> dict:
    def refuse(name):
        raise AssertionError(f"bare {name} in result JSON")

    return json.loads(open(path).read(), parse_constant=refuse)


@pytest.mark.parametrize("poison,flags,needle", [
    (float("nan"), [], "1 NaN and 0 infinite"),
    (float("inf"), [], "0 NaN and 1 infinite"),
    (1e6, ["--dtype", "float16"], "0 NaN and 1 infinite"),  # finite in the file, past float16's range
])
def test_non_finite_qkv_input_is_one_error_line(tmp_path, poison, flags, needle):
    q, k, v = rand(1, 64, 2, 8, seed=0), rand(1, 64, 1, 8, seed=1), rand(1, 64, 1, 8, seed=2)
    k[0, 40, 0, 3] = poison
    save_file({"q": q, "k": k, "v": v}, str(tmp_path / "f.safetensors"))
    res = run("--qkv", str(tmp_path / "f.safetensors"), "--chunk", "16", "--device", "cpu", *flags,
              "--out", str(tmp_path / "out"))
    line = _one_line_error(res, needle)
    assert "tensor k" in line and "(0, 40, 0, 3)" in line and "equivalence" not in line
    assert not (tmp_path / "out").exists()


def test_error_stats_count_poisoned_rows_instead_of_hiding_them():
    ref = rand(6, 2, 4, seed=0)
    out = ref + 1e-3
    out[2, 1, 0] = float("nan")
    stats = error_stats.output_error(out, ref, rows_per_step=4)
    s = stats.summary()
    assert s["nonfinite_rows"] == 1
    assert all(math.isfinite(s[k]) for k in ("max_abs", "rel_l2", "worst_row_rel_l2"))
    assert s["worst_row_rel_l2"] > 0 and s["max_abs"] == pytest.approx(1e-3, rel=1e-3)


def test_poisoned_equivalence_run_fails_by_name_with_strict_json(monkeypatch, tmp_path):
    real = equivalence.run_moba

    def poisoned(q, k, v, chunk, topk, backend, sparse_only=False):
        out = real(q, k, v, chunk, topk, backend, sparse_only)
        if topk >= math.ceil(q.shape[1] / chunk):  # only the all-blocks run
            out = out.clone()
            out[0, 5, 1, 0] = float("nan")
        return out

    monkeypatch.setattr(equivalence, "run_moba", poisoned)
    res = run(*TINY, "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 1 and "NaN or infinite" in res.output and "Traceback" not in res.output, res.output
    eq = _strict_json(tmp_path / "r.json")["summary"]["equivalence"]
    assert eq["passed"] is False and eq["nonfinite_rows"] == 1 and "NaN" in eq["note"]
    assert eq["worst_row_rel_l2"] is not None and math.isfinite(eq["rel_l2"])


def test_strict_floats_nulls_every_non_finite_number():
    from moba_cli.utils.metrics import strict_floats

    clean, bad = strict_floats({"a": 1.0, "b": [float("nan"), {"c": float("-inf")}], "d": "x", "e": 3}, "summary")
    assert clean == {"a": 1.0, "b": [None, {"c": None}], "d": "x", "e": 3}
    assert bad == ["summary.b[0]", "summary.b[1].c"]
    json.dumps(clean, allow_nan=False)


def test_chunk_longer_than_the_sequence_is_one_block(tmp_path):
    """One block holds the whole sequence: MoBA is full attention, and nothing is sized by the chunk."""
    res = run("--seq", "200", "--chunk", str(2**30), "--heads", "2", "--head-dim", "16", "--device", "cpu",
              "--out", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    s = read_json(tmp_path / "r.json")["summary"]
    assert s["blocks_per_sequence"] == 1 and s["sparsity"] == 0.0
    assert s["recall_mean"] == pytest.approx(1.0) and s["equivalence"]["passed"] is True
    assert s["equivalence"]["tokens_per_sequence"] == 200
