"""`moba bench` end to end on CPU: the smoke run, the result files, OOM, errors, estimates."""

import csv
import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

from moba_cli.bench.presets import build_config
from moba_cli.bench.providers import BY_NAME, Op, Provider, Unsupported
from moba_cli.bench.report import write_plots
from moba_cli.bench.runner import RECORD_FIELDS, STATUSES, TIMERS, Runner, add_speedups, time_call
from moba_cli.cli import app
from moba_cli.results import read_result

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def _cfg(**kw):
    base = {"device": "cpu", "seq": "256", "heads": "2", "kv_heads": 1, "repeats": 1, "plots": False}
    return build_config(**{**base, **kw})


def _by(records, provider, **match):
    out = [r for r in records if r["provider"] == provider and all(r[k] == v for k, v in match.items())]
    assert out, (provider, match)
    return out


@pytest.fixture
def no_interpreter(monkeypatch):
    # The Triton interpreter takes seconds per call; these tests exercise the bench, not the kernel.
    monkeypatch.setattr(BY_NAME["moba-triton"], "unavailable", lambda case: "not run in this test (slow on CPU)")


def test_cpu_smoke_run_writes_json_csv_and_plots(tmp_path, no_interpreter):
    out = tmp_path / "res"
    result = CliRunner().invoke(app, [
        "bench", "--device", "cpu", "--seq", "256,512", "--heads", "2", "--kv-heads", "1",
        "--pass", "fwd", "--pass", "fwd+bwd", "--repeats", "1", "--out", str(out),
    ], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "moba-naive" in result.output and "sdpa-math" in result.output  # the table
    (path,) = out.glob("bench-*.json")
    data = read_result(path)
    assert data["kind"] == "bench"
    for key in ("gpu", "driver", "torch", "triton", "cudnn", "flash_attn", "git_commit", "command", "date"):
        assert key in data["env"]
    assert data["config"]["seqs"] == [256, 512] and data["config"]["passes"] == ["fwd", "fwd+bwd"]
    records = data["records"]
    assert len(records) == 2 * 2 * len(data["config"]["providers"])
    for r in records:
        assert set(RECORD_FIELDS) <= set(r)
        assert r["status"] in STATUSES
        assert isinstance(r["seq"], int) and isinstance(r["heads"], int) and isinstance(r["chunk"], int)
        assert r["dtype"] == "float32" and r["kv_heads"] == 1 and isinstance(r["attended_pairs"], int)
        if r["status"] == "ok":
            assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["tflops"] > 0 and r["runs"] >= 1
            assert r["check_out_err"] <= r["check_tol"]
        else:
            assert r["ms"] is None and r["reason"]
    for p in ("moba-naive", "sdpa-math"):
        assert all(r["status"] == "ok" for r in _by(records, p))
    assert all(r["check_grad_err"] is not None for r in _by(records, "moba-naive", **{"pass": "fwd+bwd"}))
    assert [r["status"] for r in _by(records, "flex-moba")] == ["ok", "ok", "skipped", "skipped"]
    for p in ("sdpa-cudnn", "sdpa-flash", "flash-attn", "flash-moba", "moba-ref"):
        assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in _by(records, p))
    assert all(r["status"] == "skipped" for r in _by(records, "moba-triton"))  # switched off above
    moba = _by(records, "moba-naive", seq=512, **{"pass": "fwd"})[0]
    assert 0 < moba["sparsity"] < 1 and moba["attended_pairs"] < _by(records, "sdpa-math", seq=512)[0]["attended_pairs"]
    with open(path.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and list(rows[0])[: len(RECORD_FIELDS)] == RECORD_FIELDS
    pngs = sorted(p.name for p in out.glob("*.png"))
    if HAS_MPL:
        assert pngs == [path.stem + "-time.png"]  # no sdpa-cudnn on CPU: no speedup plot
        assert data["summary"]["files"]["plots"]
    assert data["summary"]["status_counts"]["ok"] >= 6


def test_decode_pass_on_cpu(no_interpreter):
    records = Runner(_cfg(passes=["decode"], seq="200", baselines="moba-naive,sdpa-math,flex-moba")).run()
    assert _by(records, "moba-naive")[0]["status"] == "ok"
    dense = _by(records, "sdpa-math")[0]
    assert dense["status"] == "ok" and dense["attended_pairs"] == 2 * 200
    assert _by(records, "moba-naive")[0]["attended_pairs"] == 2 * (64 * 2 + 200 - 192)  # 2 past blocks + own
    assert _by(records, "flex-moba")[0]["status"] == "skipped"


class _Fake(Provider):
    """A provider whose forward is given by the test."""

    def build(self, case, inputs):
        return self.extra["build"](case, inputs)


def _fake(name, kind, build):
    return _Fake(name, kind, "test double", ("fwd", "fwd+bwd"), cuda_only=False, extra={"build": build})


def _naive_op(inputs, topk=None, case=None):
    q, k, v = inputs.q, inputs.k, inputs.v
    from moba_cli import moba_attention

    return Op(forward=lambda: moba_attention(q, k, v, chunk_size=case.chunk, topk=topk or case.topk,
                                             backend="naive"), grad_inputs=(q, k, v))


def test_out_of_memory_is_a_record_and_the_bench_goes_on(no_interpreter):
    calls = {"n": 0}

    def oom_on_third_call(case, inputs):
        op = _naive_op(inputs, case=case)
        inner = op.forward

        def forward():
            calls["n"] += 1
            if calls["n"] >= 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
            return inner()

        op.forward = forward
        return op

    providers = [_fake("oom-late", "moba", oom_on_third_call),
                 _fake("oom-build", "moba", lambda c, i: (_ for _ in ()).throw(
                     RuntimeError("CUDA error: out of memory"))),
                 BY_NAME["sdpa-math"]]
    records = Runner(_cfg(), providers=providers).run()
    late, build, dense = records
    assert late["status"] == "oom" and "out of memory" in late["reason"] and late["ms"] is None
    assert late["check_out_err"] is not None  # it passed its spot-check before running out
    assert build["status"] == "oom"
    assert dense["status"] == "ok" and dense["ms"] > 0


def test_a_wrong_kernel_is_refused_and_not_timed(no_interpreter):
    providers = [_fake("own-block-only", "moba", lambda c, i: _naive_op(i, topk=1, case=c))]
    (rec,) = Runner(_cfg(), providers=providers).run()
    assert rec["status"] == "error" and rec["reason"].startswith("spot-check failed, not timed")
    assert rec["check_out_err"] > rec["check_tol"] and rec["ms"] is None


def test_wrong_gradients_are_refused(no_interpreter):
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def build(case, inputs):
        op = _naive_op(inputs, case=case)
        inner = op.forward
        op.forward = lambda: Twice.apply(inner())
        return op

    (rec,) = Runner(_cfg(passes=["fwd+bwd"]), providers=[_fake("bad-bwd", "moba", build)]).run()
    assert rec["status"] == "error" and "gradients off" in rec["reason"]


def test_crashes_and_unsupported_cases_are_recorded(no_interpreter):
    def crash(case, inputs):
        raise ValueError("kernel exploded")

    def unsupported(case, inputs):
        raise Unsupported("needs head_dim 128")

    records = Runner(_cfg(), providers=[_fake("crash", "dense", crash), _fake("nope", "dense", unsupported)]).run()
    assert records[0]["status"] == "error" and "ValueError: kernel exploded" in records[0]["reason"]
    assert records[1]["status"] == "skipped" and records[1]["reason"] == "needs head_dim 128"


def test_slow_dense_baselines_are_estimated_from_a_measured_length(no_interpreter):
    cfg = _cfg(seq="256,512", baselines="sdpa-math", max_dense_seconds=1e-9)
    runner = Runner(cfg, providers=[BY_NAME["sdpa-math"]])
    records = runner.run()
    anchor, first, second = sorted(records, key=lambda r: r["seq"])
    assert anchor["seq"] == 128 and anchor["status"] == "ok" and anchor["anchor_for"] == 256
    for est, ratio in ((first, 4), (second, 16)):
        assert est["status"] == "estimated"
        assert est["estimated_from"] == {"seq": 128, "ms": anchor["ms"], "law": "ms ~ seq^2"}
        assert est["ms"] == pytest.approx(anchor["ms"] * ratio)
        assert est["ms_min"] == pytest.approx(anchor["ms_min"] * ratio)
        assert est["tflops"] == pytest.approx(est["flops"] / (est["ms"] * 1e-3) / 1e12)
        assert est["peak_mem_bytes"] is None and "max-dense-seconds" in est["reason"]


def test_a_fast_dense_baseline_is_run_not_estimated(no_interpreter):
    records = Runner(_cfg(seq="256,512", baselines="sdpa-math"), providers=[BY_NAME["sdpa-math"]]).run()
    assert [r["status"] for r in records] == ["ok", "ok"]


def _rec(provider, seq, ms, status="ok", p="fwd", heads=8):
    r = dict.fromkeys(RECORD_FIELDS)
    r.update(provider=provider, kind="dense" if provider.startswith("sdpa") else "moba", batch=1, seq=seq,
             heads=heads, kv_heads=heads, head_dim=128, chunk=4096, topk=12, dtype="bfloat16", device="cuda",
             status=status, ms=ms, ms_min=ms, ms_max=ms, tflops=1.0, peak_mem_bytes=None)
    r["pass"] = p
    return r


def test_speedups_and_estimated_baselines():
    records = [_rec("moba-triton", 1024, 2.0), _rec("sdpa-cudnn", 1024, 10.0),
               _rec("sdpa-flash", 1024, 12.0, status="estimated"), _rec("moba-triton", 2048, 4.0),
               _rec("sdpa-cudnn", 2048, 1.0, status="oom"), _rec("moba-triton", 1024, 3.0, p="fwd+bwd")]
    add_speedups(records)
    m = records[0]
    assert m["speedup_vs_sdpa_cudnn"] == pytest.approx(5.0) and m["speedup_vs_sdpa_flash"] == pytest.approx(6.0)
    assert m["baseline_estimated"] == "sdpa-flash"
    assert records[3]["speedup_vs_sdpa_cudnn"] is None  # the baseline ran out of memory
    assert records[5]["speedup_vs_sdpa_cudnn"] is None  # other pass
    assert records[1]["speedup_vs_sdpa_cudnn"] == pytest.approx(1.0)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plots_time_and_speedup(tmp_path):
    records = [_rec(p, s, ms * s / 1024, status=st) for s in (1024, 4096) for p, ms, st in (
        ("moba-triton", 1.0, "ok"), ("sdpa-cudnn", 3.0, "estimated" if s == 4096 else "ok"))]
    add_speedups(records)
    files, note = write_plots(records, tmp_path / "bench-x")
    assert note is None and [f.name for f in files] == ["bench-x-time.png", "bench-x-speedup.png"]
    assert all(f.stat().st_size > 1000 for f in files)


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    files, note = write_plots([_rec("moba-triton", 1024, 1.0)], tmp_path / "b")
    assert files == [] and "matplotlib is not installed" in note


def test_time_call_reports_median_min_max():
    n = {"calls": 0}

    def fn():
        n["calls"] += 1
        return sum(range(1000))

    t = time_call(fn, "cpu", repeats=5)
    assert t.runs >= 5 and t.ms_min <= t.ms <= t.ms_max and n["calls"] >= t.runs + 1
    assert t.peak_mem_bytes is None and math.isfinite(t.ms)


def test_json_is_valid_for_nested_fields(tmp_path, no_interpreter):
    from moba_cli.bench import run_bench
    from moba_cli.commands._common import console

    cfg = _cfg(out=str(tmp_path / "r.json"), baselines="sdpa-math", max_dense_seconds=1e-9)
    path = run_bench(cfg, console)
    assert path == tmp_path / "r.json"
    data = json.loads(path.read_text())
    est = [r for r in data["records"] if r["status"] == "estimated"]
    assert est and est[0]["estimated_from"]["seq"] == 128
    assert (tmp_path / "r.csv").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or the Triton interpreter")
def test_moba_triton_through_the_bench():
    # Our kernel through the public API, checked against the reference (seconds per call interpreted).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = _cfg(device=device, seq="128", head_dim=32, chunk=32, topk=2, baselines="none", check_rows=16)
    (rec,) = Runner(cfg).run()
    assert rec["provider"] == "moba-triton" and rec["status"] == "ok", rec["reason"]
    assert rec["check_out_err"] <= rec["check_tol"] and rec["runs"] == 1


def test_an_interrupted_run_keeps_its_finished_records(tmp_path, no_interpreter, monkeypatch):
    from rich.console import Console

    from moba_cli.bench import run_bench

    real = Runner.run_case
    calls = []

    def run_case(self, case, providers, anchor_for=None):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. a time limit or Ctrl-C in the middle of a long run
        return real(self, case, providers, anchor_for)

    monkeypatch.setattr(Runner, "run_case", run_case)
    cfg = _cfg(seq="256,512", out=str(tmp_path), passes="fwd", baselines="moba-naive,sdpa-math")
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, Console(file=open(os.devnull, "w")))
    (partial,) = tmp_path.glob("bench-*.partial.json")
    data = read_result(partial)
    assert data["summary"]["partial"] is True
    assert {r["seq"] for r in data["records"]} == {256}
    assert {r["provider"]: r["status"] for r in data["records"]} == {
        "moba-triton": "skipped", "moba-naive": "ok", "sdpa-math": "ok"}


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_plot_titles_lie_inside_the_figure(tmp_path, monkeypatch, groups):
    """A one-panel figure is narrow (5.5 in): the long suptitle was cut off at both edges."""
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig

    def spy(fig, *args, **kwargs):
        real_savefig(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        box = fig.get_window_extent(renderer)
        texts = [fig._suptitle] + [ax.title for ax in fig.axes if ax.get_visible()]
        saved.append([(t.get_text(), t.get_window_extent(renderer), box) for t in texts])

    monkeypatch.setattr(Figure, "savefig", spy)
    records = [_rec("moba-triton", s, 1.0 * s / 1024, heads=h) for s in (1024, 4096) for h in range(1, groups + 1)]
    records += [_rec("sdpa-cudnn", s, 3.0 * s / 1024, heads=h) for s in (1024, 4096) for h in range(1, groups + 1)]
    add_speedups(records)
    files, _ = write_plots(records, tmp_path / "bench-x")
    assert len(saved) == len(files) == 2
    for texts in saved:
        for text, ext, fig_box in texts:
            assert text
            assert ext.x0 >= fig_box.x0 - 0.5 and ext.x1 <= fig_box.x1 + 0.5, (text, ext, fig_box)
            assert ext.y0 >= fig_box.y0 - 0.5 and ext.y1 <= fig_box.y1 + 0.5, (text, ext, fig_box)


def test_cpu_records_say_how_they_were_really_timed(no_interpreter):
    from moba_cli.bench.report import summarize

    records = Runner(_cfg(baselines="moba-naive,sdpa-math")).run()
    timed = [r for r in records if r["status"] == "ok"]
    assert timed
    for r in timed:
        assert "wall clock" in r["timer"] and "CUDA" not in r["timer"]
    fields = summarize(records)["fields"]
    assert "wall clock" in fields["ms"] and "CUDA" not in fields["ms"] and "L2" not in fields["ms"]
    json.dumps(records, allow_nan=False)  # strict JSON: no NaN/inf anywhere in a record


def test_a_zero_time_gives_no_infinite_speedup():
    records = [_rec("moba-triton", 1024, 0.0), _rec("sdpa-cudnn", 1024, 2.0)]
    add_speedups(records)
    assert records[0]["speedup_vs_sdpa_cudnn"] is None
    json.dumps(records, allow_nan=False)


def test_gpu_timer_is_named_for_cuda_records():
    from moba_cli.bench.report import summarize

    rec = _rec("moba-triton", 1024, 1.0)
    rec["timer"] = TIMERS["cuda"]
    assert "CUDA events" in summarize([rec])["fields"]["ms"]


@pytest.mark.parametrize("path,needle", [("dense", "dense causal attention through SDPA"),
                                         ("long_blocks", "long blocks"), ("dense_prefix", "first 300 tokens"),
                                         ("sparse", None)])
def test_moba_triton_note_reads_the_call_plan(monkeypatch, path, needle):
    """The record says what ran from ops' plan_call, not from a second copy of the dispatch rules."""
    import types

    import moba_cli.ops.moba as ops
    from moba_cli.bench.case import Case
    from moba_cli.bench.providers import _dense_parts

    calls = []

    def plan_call(q, k, *, chunk_size, topk, backend, options=None):
        calls.append((chunk_size, topk, backend))
        return types.SimpleNamespace(path=path, options=ops.KernelOptions(), prefix=types.SimpleNamespace(rows=300))

    monkeypatch.setattr(ops, "plan_call", plan_call)
    case = Case("fwd", 1, 1024, 2, 2, 16, 64, 3, "bfloat16", "cuda")
    x = torch.zeros(1, 1024, 2, 16)
    note = _dense_parts(case, x, x)
    assert calls == [(64, 3, "triton")]
    assert (note is None) if needle is None else (needle in note)
