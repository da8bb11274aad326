"""`moba bench` options: sizes, presets, overrides, bad values (CPU only, no timing)."""

import pytest
import torch
from typer.testing import CliRunner

from moba_cli.bench.presets import PRESETS, build_config, parse_passes
from moba_cli.cli import app
from moba_cli.errors import MobaError


def test_sizes_lists_are_parsed_sorted_and_deduplicated():
    cfg = build_config(seq="1m,32k,128k,32k", device="cuda")
    assert cfg.seqs == [32768, 131072, 1048576]
    assert build_config(seq="10m", device="cuda").seqs == [10 * 2**20]
    assert build_config(seq="5000", device="cuda").seqs == [5000]


def test_defaults_differ_on_cpu_and_gpu():
    gpu = build_config(device="cuda")
    assert (gpu.seqs, gpu.heads, gpu.head_dim, gpu.chunk, gpu.topk, gpu.dtype, gpu.passes) == (
        [32768, 131072], [8], 128, 512, 3, "bfloat16", ["fwd"])
    cpu = build_config(device="cpu")
    assert max(cpu.seqs) <= 1024 and cpu.dtype == "float32"


def test_paper_preset():
    cfg = build_config(preset="paper", device="cuda")
    assert (cfg.chunk, cfg.topk, cfg.heads) == (4096, 12, [1, 8])
    assert cfg.seqs == [32768, 131072, 524288, 1048576]
    assert cfg.passes == ["fwd", "fwd+bwd"]
    assert len(cfg.cases()) == 2 * 2 * 4


def test_flashmoba_preset():
    cfg = build_config(preset="flashmoba", device="cuda")
    assert (cfg.chunk, cfg.topk, cfg.heads, cfg.passes) == (128, 8, [16], ["fwd+bwd"])
    assert cfg.seqs == [65536, 131072, 262144, 524288]


def test_10m_preset_chunk_follows_seq():
    cfg = build_config(preset="10m", device="cuda")
    assert cfg.chunk is None and cfg.chunk_divisor == 64 and cfg.topk == 3 and cfg.heads == [1]
    (case,) = cfg.cases()
    assert case.seq == 10 * 2**20 and case.chunk == 10 * 2**20 // 64
    cfg = build_config(preset="10m", seq="1m,10m", device="cuda")
    assert [c.chunk for c in cfg.cases()] == [2**20 // 64, 10 * 2**20 // 64]
    assert cfg.to_dict()["chunk_rule"] == "seq/64"


def test_explicit_options_override_a_preset():
    cfg = build_config(preset="paper", seq="64k", chunk=1024, topk=4, heads="32", kv_heads=8, passes=["fwd"],
                       device="cuda")
    assert (cfg.seqs, cfg.chunk, cfg.topk, cfg.heads, cfg.kv_heads, cfg.passes) == (
        [65536], 1024, 4, [32], 8, ["fwd"])
    assert build_config(preset="10m", chunk=4096, device="cuda").cases()[0].chunk == 4096


def test_passes_accept_repeats_and_commas():
    assert parse_passes(["fwd", "fwd+bwd,decode", "fwd"]) == ["fwd", "fwd+bwd", "decode"]
    assert parse_passes("fwd_bwd") == ["fwd+bwd"]


def test_baselines():
    assert build_config(baselines="none", device="cuda").providers == ["moba-triton"]
    assert build_config(baselines="sdpa-flash,moba-naive", device="cuda").providers == [
        "moba-triton", "moba-naive", "sdpa-flash"]
    everything = build_config(device="cuda").providers
    assert everything[0] == "moba-triton" and {"sdpa-cudnn", "sdpa-flash", "flex-moba"} <= set(everything)
    assert "sdpa-math" not in everything  # O(S^2) memory: opt-in on GPU
    assert "sdpa-math" in build_config(device="cpu").providers


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topk": 0}, "--topk must be >= 1"),
        ({"chunk": -1}, "--chunk must be >= 1"),
        ({"batch": 0}, "--batch must be >= 1"),
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"passes": ["foo"]}, "unknown pass 'foo'"),
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"heads": "6", "kv_heads": 4}, "multiple of --kv-heads"),
        ({"heads": "8,x"}, "--heads must be an integer"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"seq": "12q"}, "cannot read '12q' as a size"),
        ({"seq": "0"}, "size must be positive"),
        ({"baselines": "sdpa-nope"}, "unknown provider 'sdpa-nope'"),
        ({"device": "tpu"}, "unknown device"),
        ({"max_dense_seconds": 0}, "--max-dense-seconds must be positive"),
        ({"chunk": 2**31}, "--chunk must be at most 2147483647"),
        ({"chunk": 10**20}, "--chunk must be at most"),
        ({"topk": 10**20}, "--topk must be at most"),
        ({"heads": str(10**20)}, "--heads must be at most"),
        ({"batch": 2**20, "seq": "4k"}, "--batch x --seq"),
        ({"seed": 2**32}, "--seed must be an integer in"),
        ({"seed": 10**30}, "--seed must be an integer in"),
        ({"seed": -1}, "--seed must be an integer in"),
        ({"repeats": 10**9}, "--repeats must be at most 10000"),
        ({"check_rows": 10**9}, "--check-rows must be at most 65536"),
    ],
)
def test_bad_values_give_one_clear_error(kwargs, message):
    with pytest.raises(MobaError, match=message.replace("(", r"\(").replace("+", r"\+")):
        build_config(**{"device": "cuda", **kwargs})


def test_cpu_runs_stay_small():
    with pytest.raises(MobaError, match="smoke run"):
        build_config(device="cpu", seq="1m")


def test_presets_are_documented_in_help():
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in (*PRESETS, "moba-triton", "sdpa-cudnn", "sdpa-flash", "flex-moba", "optional", "estimated",
                 "results/bench"):
        assert name in result.output


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_gpu_bench_says_so_in_one_line():
    line = _one_line_error(CliRunner().invoke(app, ["bench", "--seq", "32k"]))
    assert "no CUDA GPU" in line and "--device cpu" in line


@pytest.mark.parametrize(
    "args", [["--topk", "0"], ["--chunk", "-1"], ["--pass", "foo"], ["--preset", "nope"], ["--seq", "abc"],
             ["--chunk", "99999999999999999999"], ["--seed", "99999999999999999999999"], ["--topk", str(2**40)]]
)
def test_cli_bad_values(args):
    _one_line_error(CliRunner().invoke(app, ["bench", "--device", "cpu", *args]))


@pytest.mark.parametrize(("name", "value"), [("MOBA_BWD_GLUON", "on"), ("MOBA_FWD_DESC", "yes"),
                                             ("MOBA_BWD_CFG", "64,128"), ("MOBA_GATE_KIND", "fast")])
@pytest.mark.parametrize("command", ["bench", "compare"])
def test_cli_bad_kernel_knob(name, value, command, monkeypatch):
    # A tuning knob with a bad value stops the command before any work, in one line (the bench used to
    # record its own provider as skipped and carry on).
    monkeypatch.setenv(name, value)
    line = _one_line_error(CliRunner().invoke(app, [command, "--device", "cpu"]))
    assert name in line


def test_chunk_takes_sizes_like_the_other_commands():
    assert build_config(device="cuda", chunk="4k").chunk == 4096
    assert build_config(device="cuda", chunk="512").chunk == 512
    assert build_config(device="cuda", chunk=256).chunk == 256


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": "1.5"}, "--seq: size '1.5' is not a whole number"),
        ({"seq": ","}, "--seq: expected at least one size"),
        ({"chunk": "1.5"}, "--chunk: size '1.5' is not a whole number"),
        ({"chunk": "0"}, "--chunk: size must be positive"),
    ],
)
def test_size_errors_name_the_option(kwargs, message):
    with pytest.raises(MobaError, match=message.replace("(", r"\(").replace("+", r"\+")):
        build_config(**{"device": "cuda", **kwargs})


def _captured_config(monkeypatch, *args: str):
    """Run ``moba bench ARGS`` with the bench itself replaced; return the config it would have run."""
    import moba_cli.bench

    seen = []
    monkeypatch.setattr(moba_cli.bench, "run_bench", lambda config, *a, **k: seen.append(config))
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_cli_chunk_size_units_and_no_plots(monkeypatch):
    cfg = _captured_config(monkeypatch, "--chunk", "1k", "--seq", "2k", "--no-plots")
    assert cfg.chunk == 1024 and cfg.seqs == [2048] and cfg.plots is False
    assert _captured_config(monkeypatch).plots is True


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seq", "1.5"], "--seq: size '1.5'"),
        (["--chunk", "1.5"], "--chunk: size '1.5'"),
        (["--chunk", "0"], "--chunk: size must be positive"),
    ],
)
def test_cli_size_errors_name_the_option(args, needle):
    assert needle in _one_line_error(CliRunner().invoke(app, ["bench", "--device", "cpu", *args]))


@pytest.mark.parametrize(
    "out,needle",
    [
        ("{file}/r.json", "is a file, not a folder"),
        ("{file}", "is a file; give a folder or a path ending in .json"),
        ("{dir}", "is a folder; give a new .json file name"),
    ],
)
def test_cli_unusable_out_fails_before_any_measurement(monkeypatch, tmp_path, out, needle):
    import moba_cli.bench

    def never(*a, **k):
        raise AssertionError("no measurement may start when --out cannot be written")

    monkeypatch.setattr(moba_cli.bench, "Runner", never)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.json").mkdir()
    out = out.format(file=tmp_path / "afile", dir=tmp_path / "d.json")
    line = _one_line_error(CliRunner().invoke(app, ["bench", "--device", "cpu", "--seq", "256", "--out", out]))
    assert line.startswith(f"error: --out {out}") and needle in line


def test_cli_os_errors_are_one_line(monkeypatch):
    # A disk that fills up while the CSV or plots are written: one line, not a traceback.
    import moba_cli.bench

    def full(*a, **k):
        raise OSError(28, "No space left on device", "results/bench/cpu/bench-x.csv")

    monkeypatch.setattr(moba_cli.bench, "run_bench", full)
    line = _one_line_error(CliRunner().invoke(app, ["bench", "--device", "cpu"]))
    assert line == "error: cannot access results/bench/cpu/bench-x.csv: No space left on device"


def test_help_paragraphs_have_no_line_breaks_inside_sentences():
    from moba_cli.commands import bench

    # rich wraps each source line to the terminal; a break inside a sentence shows up as a ragged line
    for line in bench.HELP.split("\n"):
        assert line == "" or line.endswith((".", ":")), line
    for columns in ("80", "120"):
        result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": columns})
        assert result.exit_code == 0 and max(map(len, result.output.splitlines())) <= int(columns)
        assert "…" not in result.output  # no option help cut short
