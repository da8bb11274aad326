"""moba eval loss: buckets of the documents' token losses, MoBA equal to full when top-k covers every block."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from eval_fixtures import tiny_checkpoint  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.evals import model as em  # noqa: E402
from moba_cli.evals.loss import LossConfig, documents, run_loss  # noqa: E402
from moba_cli.evals.position_loss import bucket_means, token_losses  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("loss") / "m", moba={"chunk_size": 32, "topk": 2})


def _cli(*args):
    from moba_cli.cli import app

    return runner.invoke(app, ["eval", "loss", *map(str, args)])


def test_run_loss_buckets_match_token_losses(ckpt):
    lm = em.load(ckpt, ["moba", "full"], device=torch.device("cpu"), dtype=torch.float32)
    cfg = LossConfig("code", seq=161, buckets=3, docs=2)
    docs = documents(lm, cfg)
    assert docs.shape == (2, 161) and bool((docs[:, 0] == lm.tokenizer.bos_token_id).all())
    assert not torch.equal(docs[0, 1:], docs[1, 1:])  # consecutive windows, not one repeated
    records, summary = run_loss(lm, cfg, ["moba", "full"])
    for attn in ("moba", "full"):
        with em.attention(lm, attn), torch.no_grad():
            ref = bucket_means(token_losses(lm.model, docs), 3)
        got = [r for r in records if r["attn"] == attn]
        assert [(r["start"], r["end"]) for r in got] == [(0, 53), (53, 106), (106, 160)]
        assert [r["loss"] for r in got] == pytest.approx(ref, rel=1e-5)
    moba_rows = [r for r in records if r["attn"] == "moba"]
    assert moba_rows[0]["moba_calls"] > 0
    # top-k 2 of 32-token blocks: the first 64 positions are full attention; later ones are not
    assert summary["moba_minus_full"][2] != 0.0


def test_loss_command_both_equal_when_topk_covers_all(ckpt, tmp_path):
    out = tmp_path / "out"
    r = _cli("--model", ckpt, "--seq", "200", "--buckets", "4", "--device", "cpu", "--topk", "7", "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads(next(out.glob("eval-loss-*.json")).read_text())
    assert res["schema"] == "moba-result/1" and res["kind"] == "eval-loss"
    assert res["config"]["seq"] == 200 and res["config"]["attn"] == ["moba", "full"]
    moba = [r["loss"] for r in res["records"] if r["attn"] == "moba"]
    full = [r["loss"] for r in res["records"] if r["attn"] == "full"]
    assert len(moba) == 4 and moba == pytest.approx(full, rel=1e-5)
    assert next(out.glob("eval-loss-*.png")).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "noise"], "too predictable"),
        (["--data", "{short}"], "are needed"),
        (["--seq", "1"], "at least 2"),
        (["--seq", "100", "--buckets", "0"], "--buckets"),
        (["--seq", "abc"], "--seq"),
    ],
)
def test_loss_bad_input(ckpt, tmp_path, args, message):
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    out = tmp_path / "out"
    r = _cli("--model", ckpt, "--device", "cpu", "--out", out, *[a.replace("{short}", str(short)) for a in args])
    assert r.exit_code == 1 and "error:" in r.output and message in r.output, r.output
    assert not out.exists() or not any(out.iterdir())
