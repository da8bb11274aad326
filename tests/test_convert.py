"""`moba convert`: the written checkpoint, the summary, sparsity, and every user error (one line, exit 1)."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import save_random_checkpoint, tiny_config  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.cli import app  # noqa: E402
from moba_cli.integrations import convert as convert_mod  # noqa: E402
from moba_cli.integrations import files as files_mod  # noqa: E402
from moba_cli.integrations.sparsity import expected_sparsity  # noqa: E402
from moba_cli.ops.moba.layout import make_layout  # noqa: E402
from moba_cli.ops.moba.naive import select_blocks  # noqa: E402
from moba_cli.ops.moba.pairs import attended_pairs  # noqa: E402
from moba_cli.results import read_result  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("conv") / "llama", tiny_config("llama", layers=6))


def _run(*args: str):
    return runner.invoke(app, ["convert", *map(str, args)])


def _assert_one_line_error(res, needle: str) -> None:
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in res.output


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "moba-tmp" in p.name or "moba-old" in p.name)


# --------------------------------------------------------------------------------------------- success


def test_convert_writes_independent_weights_config_summary_and_result(src, tmp_path):
    dst, out = tmp_path / "moba", tmp_path / "res.json"
    res = _run(src, dst, "--chunk", "16", "--topk", "3", "--full-layers", "last:3", "--out", out)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "6 (3 MoBA: 0-2; 3 full: 3-5)" in text
    assert "heads: 2, KV heads: 1, head dim: 32" in text
    for size in ("32k", "128k", "1m"):
        assert size in text
    # The same bytes in a file of DST's own (no hard link: writing into DST must not reach SRC).
    w_src, w_dst = src / "model.safetensors", dst / "model.safetensors"
    assert w_dst.read_bytes() == w_src.read_bytes()
    assert os.stat(w_src).st_ino != os.stat(w_dst).st_ino
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["attn_implementation"] == "moba"
    assert cfg["moba"] == {"version": 1, "chunk_size": 16, "topk": 3, "full_layers": [3, 4, 5]}
    src_cfg = json.loads((src / "config.json").read_text())
    assert "moba" not in src_cfg and {k: cfg[k] for k in src_cfg} == src_cfg  # nothing else changed
    for path in (dst / "moba_convert.json", out):
        result = read_result(path)
        assert result["kind"] == "convert"
        assert result["summary"]["full_layers"] == [3, 4, 5] and result["summary"]["moba_layers"] == [0, 1, 2]
        assert [r["seq_len"] for r in result["records"]] == [32768, 131072, 1048576]
        r = result["records"][0]
        assert r["sparsity_moba_layer"] == pytest.approx(expected_sparsity(32768, 16, 3))
        assert r["sparsity_model"] == pytest.approx(r["sparsity_moba_layer"] / 2)
    assert _leftovers(tmp_path) == []


def test_convert_force_replaces_and_full_layer_lists(src, tmp_path):
    dst = tmp_path / "moba"
    assert _run(src, dst, "--chunk", "4k", "--full-layers", "none").exit_code == 0
    assert json.loads((dst / "config.json").read_text())["moba"]["chunk_size"] == 4096
    res = _run(src, dst, "--full-layers", "0,5", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((dst / "config.json").read_text())["moba"]["full_layers"] == [0, 5]
    assert _leftovers(tmp_path) == []


def test_sliding_window_wider_than_context_is_dropped(tmp_path):
    src = save_random_checkpoint(
        tmp_path / "mistral", tiny_config("mistral", sliding_window=4096, max_positions=512)
    )
    res = _run(src, tmp_path / "moba", "--chunk", "8", "--topk", "2")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "moba" / "config.json").read_text())
    assert cfg["sliding_window"] is None and cfg["moba"]["dropped"] == {"sliding_window": 4096}
    from moba_cli.integrations import load_model

    model = load_model(tmp_path / "moba", backend="naive")
    with torch.no_grad():
        model(torch.arange(1, 30)[None])


# --------------------------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize(("n", "chunk", "topk"), [(64, 8, 3), (61, 8, 2), (37, 16, 1), (50, 8, 100), (7, 8, 4)])
def test_attended_pairs_match_the_selection(n, chunk, topk):
    """The analytic count equals the keys the reference gate actually lets each query see."""
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(n, 2, 8, generator=g), torch.randn(n, 1, 8, generator=g)
    layout = make_layout(torch.tensor([0, n], dtype=torch.int32), chunk)
    ids = select_blocks(q, k, layout, topk)  # [n, H, slots]
    pos = torch.arange(n)
    for h in range(2):
        seen = 0
        for t in range(n):
            for blk in ids[t, h].tolist():
                if blk >= 0:
                    seen += int(((pos >= blk * chunk) & (pos < (blk + 1) * chunk) & (pos <= t)).sum())
        assert seen == attended_pairs(n, chunk, topk)


def test_expected_sparsity_values():
    assert expected_sparsity(4096, 4096, 12) == 0.0  # one block: nothing skipped
    assert expected_sparsity(10 * 4096, 4096, 100) == 0.0  # top-k covers everything
    # Far beyond topk blocks a query attends about (topk - 1/2) * chunk keys (its own block half full).
    n = 1024 * 1024
    assert 1 - expected_sparsity(n, 4096, 12) == pytest.approx(2 * 11.5 * 4096 / n, rel=0.03)


# --------------------------------------------------------------------------------------------- errors


def _broken_json(d):
    (d / "config.json").write_text("{not json")


def _no_config(d):
    (d / "config.json").unlink()


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _corrupt_weights(d):
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.unlink()  # the fixture copy may be a hard link: never write through it
    path.write_bytes(data[: len(data) // 2])


def _wrong_layers(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 9
    (d / "config.json").write_text(json.dumps(cfg))


def _gpt2(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("breaker", "needle"),
    [
        (_broken_json, "not valid JSON"),
        (_no_config, "no config.json"),
        (_no_weights, "no weights"),
        (_corrupt_weights, "is broken"),
        (_wrong_layers, "num_hidden_layers=9"),
        (_gpt2, "unsupported architecture 'gpt2'"),
    ],
)
def test_broken_sources(src, tmp_path, breaker, needle):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    breaker(bad)
    dst = tmp_path / "out" / "moba"
    _assert_one_line_error(_run(bad, dst), needle)
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("config_kw", "needle"),
    [
        ({"model_type": "llama", "hidden": 32, "heads": 2}, "unsupported head dim 16"),
        ({"model_type": "mistral", "sliding_window": 64, "max_positions": 512}, "sliding_window=64"),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2},
            "layers 2,3 use sliding-window attention",
        ),
    ],
)
def test_unservable_models(tmp_path, config_kw, needle):
    kw = dict(config_kw)
    src = save_random_checkpoint(tmp_path / "src", tiny_config(kw.pop("model_type"), **kw))
    dst = tmp_path / "moba"
    _assert_one_line_error(_run(src, dst), needle)
    assert not dst.exists()


def test_bad_arguments(src, tmp_path):
    dst = tmp_path / "moba"
    _assert_one_line_error(_run(tmp_path / "nowhere", dst), "does not exist")
    _assert_one_line_error(_run(src / "model.safetensors", dst), "is a file")
    _assert_one_line_error(_run(src, dst, "--full-layers", "last:7"), "the model has 6")
    _assert_one_line_error(_run(src, dst, "--full-layers", "a,b"), "cannot read --full-layers")
    _assert_one_line_error(_run(src, dst, "--topk", "0"), "--topk must be a positive integer")
    _assert_one_line_error(_run(src, dst, "--chunk", "zero"), "cannot read 'zero' as a size")
    _assert_one_line_error(_run(src, src / "inner"), "neither inside the other")
    assert not dst.exists()
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _assert_one_line_error(_run(src, dst), "already exists (use --force")
    assert (dst / "keep.txt").read_text() == "mine"


def test_hub_id_that_cannot_be_fetched(tmp_path, monkeypatch):
    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to the hub\nsecond line")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    dst = tmp_path / "moba"
    _assert_one_line_error(_run("someorg/some-model", dst), "could not be fetched from the hub")
    assert not dst.exists()


def test_hub_id_downloaded(src, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(src))
    res = _run("someorg/some-model", tmp_path / "moba", "--chunk", "8")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "moba" / "model.safetensors").is_file()


def test_failure_at_the_end_leaves_nothing(src, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_mod, "move_into_place", boom)
    dst, out = tmp_path / "moba", tmp_path / "res.json"
    _assert_one_line_error(_run(src, dst, "--out", out), "No space left on device")
    assert not dst.exists() and not out.exists()
    assert _leftovers(tmp_path) == []


def test_chunk_errors_name_the_option(src, tmp_path):
    _assert_one_line_error(_run(src, tmp_path / "moba", "--chunk", "0"), "--chunk: size must be positive")
    _assert_one_line_error(_run(src, tmp_path / "moba", "--chunk", "1.5"), "--chunk: size '1.5'")
    assert not (tmp_path / "moba").exists()


def test_dst_that_cannot_be_created(src, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    dst = tmp_path / "afile" / "moba"
    _assert_one_line_error(_run(src, dst), f"cannot create DST {dst}: {tmp_path / 'afile'} is a file, not a folder")

    def refused(*a, **k):  # a read-only or foreign folder (root ignores permission bits, so simulate it)
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(files_mod.tempfile, "mkdtemp", refused)
    _assert_one_line_error(_run(src, tmp_path / "moba"), "cannot create DST")
    _assert_one_line_error(_run(src, tmp_path / "moba"), "Permission denied")
    assert not (tmp_path / "moba").exists()


@pytest.mark.parametrize(
    "out,needle",
    [("{file}/r.json", "is a file, not a folder"), ("{file}", "is a file; give a folder or a path ending in .json")],
)
def test_unusable_out_fails_before_dst_is_built(src, tmp_path, out, needle):
    (tmp_path / "afile").write_text("x")
    out = out.format(file=tmp_path / "afile")
    dst = tmp_path / "moba"
    res = _run(src, dst, "--out", out)
    _assert_one_line_error(res, f"--out {out}")
    _assert_one_line_error(res, needle)
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_usage_names_src_and_dst():
    res = runner.invoke(app, ["convert"])
    assert res.exit_code == 2
    assert "SRC" in res.output and "DST" in res.output
