"""`moba convert` never changes or loses a user's files (issue 15 §2).

DST independent of SRC, Hugging Face cache snapshots, `--force` only over its own output, signals and
kills, the user's umask, `--out` inside DST, config/weight checks, and a MoBA model saved again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import random_model, save_random_checkpoint, tiny_config  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moba_cli.cli import app  # noqa: E402
from moba_cli.errors import MobaError  # noqa: E402
from moba_cli.integrations import files as files_mod  # noqa: E402
from moba_cli.integrations import load_model, parse_full_layers  # noqa: E402
from moba_cli.integrations.files import clone_file  # noqa: E402

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = save_random_checkpoint(tmp_path_factory.mktemp("safety") / "llama", tiny_config("llama", layers=4))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
    return path


@pytest.fixture(scope="module")
def bin_src(tmp_path_factory):
    """A checkpoint whose weights are a torch.save ``pytorch_model.bin``."""
    path = tmp_path_factory.mktemp("safety-bin") / "llama-bin"
    config = tiny_config("llama", layers=4)
    path.mkdir()
    config.save_pretrained(path)
    torch.save(random_model(config).state_dict(), path / "pytorch_model.bin")
    return path


def _run(*args: object):
    return runner.invoke(app, ["convert", *map(str, args)])


def _ok(res) -> None:
    assert res.exit_code == 0, res.output


def _one_line_error(res, needle: str) -> str:
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert needle.lower() in err.lower(), err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moba-" in p.name)


# --------------------------------------------------------------------------------------------- DST independent


@pytest.mark.parametrize("which", ["safetensors", "bin"])
def test_writing_into_dst_never_changes_src(src, bin_src, tmp_path, which):
    source = src if which == "safetensors" else bin_src
    before = _snapshot(source)
    dst = tmp_path / "moba"
    _ok(_run(source, dst, "--chunk", "8", "--full-layers", "none"))
    for name in before:
        if name != "config.json":
            assert os.stat(source / name).st_ino != os.stat(dst / name).st_ino, name
    # What users do to a converted checkpoint: rewrite files in place, torch.save, save_pretrained.
    for name in before:
        if name not in ("config.json",):
            with open(dst / name, "r+b") as f:
                f.write(b"\0" * 16)
    torch.save({"x": torch.zeros(3)}, dst / "pytorch_model.bin")
    (dst / "generation_config.json").write_text("{}")
    assert _snapshot(source) == before


def test_link_is_an_explicit_opt_in_for_weights_only(src, tmp_path):
    dst = tmp_path / "moba"
    res = _run(src, dst, "--chunk", "8", "--link")
    _ok(res)
    assert os.stat(src / "model.safetensors").st_ino == os.stat(dst / "model.safetensors").st_ino
    assert os.stat(src / "generation_config.json").st_ino != os.stat(dst / "generation_config.json").st_ino
    assert "hard-linked to SRC" in " ".join(res.stdout.split())
    help_text = " ".join(runner.invoke(app, ["convert", "--help"]).stdout.replace("│", " ").split())
    assert "changes SRC" in help_text


def test_clone_tries_a_reflink_then_falls_back_to_copies(tmp_path, monkeypatch):
    a = tmp_path / "a.bin"
    a.write_bytes(os.urandom(70_000))
    if sys.platform.startswith("linux"):
        import fcntl

        calls = []

        def no_reflink(fd, request, arg):
            calls.append(request)
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(fcntl, "ioctl", no_reflink)
        assert clone_file(a, tmp_path / "b.bin") == "copied"
        assert calls == [0x40049409]  # FICLONE was asked for first
    assert (tmp_path / "b.bin").read_bytes() == a.read_bytes()

    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    assert clone_file(a, tmp_path / "c.bin") == "copied"
    assert (tmp_path / "c.bin").read_bytes() == a.read_bytes()
    with pytest.raises(FileExistsError):  # never over an existing file
        clone_file(a, tmp_path / "c.bin")


# --------------------------------------------------------------------------------------------- HF cache


def _fake_hub_snapshot(src: Path, root: Path) -> Path:
    """The hub cache layout: snapshots/<rev>/<file> are relative symlinks to blobs/<hash>."""
    repo = root / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        (blobs / f"blob{i}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    extra = repo / "extra"  # a symlinked subfolder must be followed, not dropped
    extra.mkdir()
    (extra / "notes.txt").write_text("kept")
    (snap / "docs").symlink_to(Path("..", "..", "extra"), target_is_directory=True)
    return snap


def test_hub_cache_snapshot_converts_to_real_files(src, tmp_path):
    snap = _fake_hub_snapshot(src, tmp_path / "hub")
    dst = tmp_path / "moba"
    _ok(_run(snap, dst, "--chunk", "8", "--full-layers", "none"))
    for name in ("model.safetensors", "generation_config.json", "tokenizer_config.json", "docs/notes.txt"):
        p = dst / name
        assert p.is_file() and not p.is_symlink(), name
        assert p.read_bytes() == (snap / name).read_bytes()
    assert not (dst / "docs").is_symlink()
    model = load_model(dst, backend="naive")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 20)[None]).logits).all()


def test_hub_cache_problems_are_one_line(src, tmp_path):
    snap = _fake_hub_snapshot(src, tmp_path / "hub")
    (snap / "loop").symlink_to(Path("."), target_is_directory=True)
    _one_line_error(_run(snap, tmp_path / "a"), "symlink loop")
    (snap / "loop").unlink()
    (snap / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "missing"))
    _one_line_error(_run(snap, tmp_path / "b"), "dangling symlink")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and _hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------- --force


def test_force_replaces_only_an_unchanged_convert_output(src, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _one_line_error(_run(src, mine, "--force"), "not written by moba convert")
    assert (mine / "thesis.tex").read_text() == "years of work"
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(_run(src, afile, "--force"), "is a file")
    assert afile.read_text() == "x"

    dst = tmp_path / "moba"
    _ok(_run(src, dst, "--chunk", "8"))
    _ok(_run(src, dst, "--chunk", "16", "--force"))  # our own, unchanged: replaced
    assert json.loads((dst / "config.json").read_text())["moba"]["chunk_size"] == 16
    (dst / "finetuned.safetensors").write_bytes(b"new weights")
    _one_line_error(_run(src, dst, "--force"), "finetuned.safetensors")
    (dst / "finetuned.safetensors").unlink()
    time.sleep(0.01)
    with open(dst / "model.safetensors", "r+b") as f:  # trained in place
        f.write(b"\1")
    _one_line_error(_run(src, dst, "--force"), "model.safetensors changed")
    assert (dst / "model.safetensors").read_bytes()[:1] == b"\1" and _hidden(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    _ok(_run(src, empty, "--force"))
    (empty / "data").symlink_to(mine, target_is_directory=True)  # a link to the user's folder
    _one_line_error(_run(src, empty, "--force"), "the link data")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_failed_run_removes_the_folders_it_created(src, tmp_path, monkeypatch):
    from moba_cli.integrations import convert as convert_mod

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_mod, "move_into_place", full_disk)
    res = _run(src, tmp_path / "new" / "deeper" / "moba", "--out", tmp_path / "new" / "r.json")
    _one_line_error(res, "No space left")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- signals, umask

_CHILD = """
import signal, sys, time
for name in ("SIGTERM", "SIGHUP"):  # as in a terminal, whatever the test runner inherited
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
from pathlib import Path
from moba_cli.integrations import convert
real = convert.populate
def slow(files, stage, link=False):
    counts = real(files, stage, link=link)
    Path(sys.argv[3]).write_text(str(stage))
    time.sleep(60)
    return counts
convert.populate = slow
convert.convert_checkpoint(sys.argv[1], sys.argv[2], chunk_size=8, topk=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_signals_and_kills_leave_no_hidden_folder(src, tmp_path, sig):
    if not hasattr(signal, sig):
        pytest.skip(f"no {sig} here")
    dst, ready = tmp_path / "moba", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(src), str(dst), str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), child.communicate(timeout=5)[1].decode()[-2000:]
        stage = Path(ready.read_text())
        assert stage.parent == tmp_path and stage.name.startswith(".moba.moba-tmp-") and stage.is_dir()
        assert (stage.stat().st_mode & 0o777) == 0o777 & ~files_mod.current_umask()
        child.send_signal(getattr(signal, sig))
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -getattr(signal, sig)  # ends the way the sender meant
    assert not dst.exists()
    if sig != "SIGKILL":
        assert _hidden(tmp_path) == []
    else:
        assert stage.is_dir()  # nothing can run on SIGKILL: the next run cleans up
        _ok(_run(src, dst, "--chunk", "8"))
        assert _hidden(tmp_path) == []


def test_stale_stages_of_dead_runs_are_removed_live_ones_kept(src, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files_mod.HOST
    stale = tmp_path / f".old.moba-tmp-{host}-{dead.pid}-x1y2z3"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".other.moba-tmp-{host}-{os.getppid()}-a1b2c3"
    other_host = tmp_path / f".other.moba-tmp-{host}x-{dead.pid}-a1b2c3"  # maybe running there (NFS)
    live.mkdir()
    other_host.mkdir()
    _ok(_run(src, tmp_path / "moba", "--chunk", "8"))
    assert not stale.exists() and live.is_dir() and other_host.is_dir()


def test_dst_gets_the_users_umask(src, tmp_path):
    old = os.umask(0o027)
    try:
        _ok(_run(src, tmp_path / "moba", "--chunk", "8"))
    finally:
        os.umask(old)
    dst = tmp_path / "moba"
    assert dst.stat().st_mode & 0o777 == 0o750
    assert (dst / "model.safetensors").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------------------------- --out


def test_out_inside_dst_is_written_there(src, tmp_path):
    dst = tmp_path / "moba"
    res = _run(src, dst, "--chunk", "8", "--out", dst / "results" / "r.json")
    _ok(res)
    written = dst / "results" / "r.json"
    assert json.loads(written.read_text())["kind"] == "convert"
    assert "r.json" in res.stdout
    res = _run(src, dst, "--chunk", "8", "--force", "--out", dst)  # DST itself as the folder
    _ok(res)
    assert len(list(dst.glob("convert-*.json"))) == 1 and not written.exists()
    assert _hidden(tmp_path) == []


def test_out_that_would_replace_a_dst_file_is_refused_up_front(src, tmp_path):
    dst = tmp_path / "moba"
    _one_line_error(_run(src, dst, "--out", dst / "config.json"), "config.json")
    _one_line_error(_run(src, dst, "--out", dst / "model.safetensors" / "r.json"), "model.safetensors")
    assert not dst.exists() and _hidden(tmp_path) == []


@pytest.mark.parametrize("name", ["r.JSON", "r.Json"])
def test_out_json_suffix_in_any_case_is_a_file(src, tmp_path, name):
    _ok(_run(src, tmp_path / "moba", "--chunk", "8", "--out", tmp_path / name))
    assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / name).read_text())["kind"] == "convert"


# --------------------------------------------------------------------------------------------- checks


def _copy(source: Path, to: Path) -> Path:
    to.mkdir()
    for f in source.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_kv_heads_that_do_not_match_the_weights(src, tmp_path):
    bad = _copy(src, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 2  # the weights have 1
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(_run(bad, tmp_path / "moba"), "num_key_value_heads=2")
    assert "k_proj" in err and not (tmp_path / "moba").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_bin_weights(bin_src, tmp_path, damage):
    bad = _copy(bin_src, tmp_path / "bad")
    data = (bad / "pytorch_model.bin").read_bytes()
    new = data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 100
    (bad / "pytorch_model.bin").write_bytes(new)
    _one_line_error(_run(bad, tmp_path / "moba"), "pytorch_model.bin is broken")
    assert not (tmp_path / "moba").exists()


def test_bin_checkpoint_converts_and_loads(bin_src, tmp_path):
    _ok(_run(bin_src, tmp_path / "moba", "--chunk", "8"))
    model = load_model(tmp_path / "moba", backend="naive")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 12)[None]).logits).all()


def test_saved_again_still_loads_as_moba(src, tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    dst = tmp_path / "moba"
    _ok(_run(src, dst, "--chunk", "8", "--topk", "2", "--full-layers", "1"))
    model = load_model(dst)
    model.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["attn_implementation"] == "moba"
    assert cfg["moba"] == {"version": 1, "chunk_size": 8, "topk": 2, "full_layers": [1]}
    if int(transformers.__version__.split(".")[0]) >= 5:  # 4.x ignores the stored implementation
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
        assert again.config._attn_implementation == "moba"
    dense = load_model(dst, attn="full")  # a model loaded dense saves as dense
    dense.save_pretrained(tmp_path / "dense")
    assert "attn_implementation" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    plain = tiny_config("llama").to_dict()  # configs without MoBA settings serialise as before
    assert "attn_implementation" not in plain


# --------------------------------------------------------------------------------------------- --full-layers


@pytest.mark.parametrize("bad", ["-1-2", "-3--1", "1--2", "3-1", "2-", "-", "1,,2"])
def test_full_layer_ranges_that_are_refused(bad):
    with pytest.raises(MobaError, match="cannot read --full-layers") as e:
        parse_full_layers(bad, 6)
    assert len(str(e.value).splitlines()) == 1


def test_full_layer_indices_that_still_work():
    import numpy as np

    assert parse_full_layers("-1", 6) == [5]
    assert parse_full_layers("0,-1,2-3", 6) == [0, 2, 3, 5]
    assert parse_full_layers([np.int64(1), 2], 6) == [1, 2]


def test_full_layers_negative_range_on_the_command_line(src, tmp_path):
    _one_line_error(_run(src, tmp_path / "moba", "--full-layers", "-1-2"), "two non-negative indices")
    assert not (tmp_path / "moba").exists()
