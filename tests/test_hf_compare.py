"""`moba compare --model`: per-layer MoBA vs full attention on one checkpoint, with and without a tokenizer."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hf_tiny import save_random_checkpoint, tiny_config  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.cli import app  # noqa: E402
from moba_cli.integrations.convert import convert_checkpoint  # noqa: E402
from moba_cli.integrations.model_compare import generated_text  # noqa: E402
from moba_cli.results import read_result  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def _naive_backend_on_cpu(monkeypatch):
    # The command has no backend option with --model: 'auto' would pick the Triton interpreter that
    # conftest enables on CPU; the float32 reference is what a CPU user gets.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("cmp") / "qwen3", tiny_config("qwen3"))


def _compare(dst, out, *extra: str):
    res = runner.invoke(app, ["compare", "--model", str(dst), "--device", "cpu", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return res, read_result(out)


def test_topk_covering_all_blocks_matches_full(src, tmp_path):
    dst = tmp_path / "moba"
    convert_checkpoint(src, dst, chunk_size=16, topk=64, full_layers="last:1")
    res, result = _compare(dst, tmp_path / "r.json", "--seq", "96")
    assert result["kind"] == "compare-model"
    assert result["config"]["tokenizer"] == "bytes" and "no tokenizer" in res.output
    assert any("UTF-8 bytes" in n for n in result["summary"]["notes"])
    assert [r["attention"] for r in result["records"]] == ["-", "moba", "moba", "moba", "full"]
    assert all(r["rel_l2"] < 1e-5 for r in result["records"])
    s = result["summary"]
    assert s["tokens"] == 96 and s["logits"]["top1_agreement"] == 1.0
    assert s["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert "perplexity" in res.output and "layer 3" in res.output


def test_sparse_moba_shows_where_it_departs(src, tmp_path):
    dst = tmp_path / "moba"
    convert_checkpoint(src, dst, chunk_size=16, topk=2, full_layers="0")
    _, result = _compare(dst, tmp_path / "r.json", "--seq", "96")
    rec = result["records"]
    assert rec[1]["attention"] == "full" and rec[1]["rel_l2"] < 1e-5  # layer 0 is full: identical
    assert rec[2]["attention"] == "moba" and rec[2]["rel_l2"] > 1e-3  # the first MoBA layer departs
    assert result["summary"]["sparsity_moba_layer"] > 0.3


def test_text_file_and_local_tokenizer(src, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dst = tmp_path / "moba"
    convert_checkpoint(src, dst, chunk_size=8, topk=3, full_layers="none")
    words = sorted(set(generated_text(4000).replace(".", " ").split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(dst)
    text = tmp_path / "t.txt"
    text.write_text(generated_text(600, seed=3))
    res, result = _compare(dst, tmp_path / "r.json", "--text", str(text), "--seq", "50")
    assert result["config"]["tokenizer"] == "tokenizer" and result["config"]["text"] == str(text)
    assert result["summary"]["tokens"] == 50
    assert "no tokenizer" not in res.output


def test_errors(src, tmp_path):
    res = runner.invoke(app, ["compare", "--model", str(src), "--device", "cpu"])  # not converted
    assert res.exit_code == 1 and "moba convert" in res.stderr and "Traceback" not in res.output
    dst = tmp_path / "moba"
    convert_checkpoint(src, dst, chunk_size=8, topk=3)
    res = runner.invoke(app, ["compare", "--model", str(dst), "--device", "cpu", "--text", str(tmp_path / "no")])
    assert res.exit_code == 1 and "does not exist" in res.stderr
