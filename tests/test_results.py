"""Result files: never overwritten by a parallel run, strict JSON, atomic, readable back."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from moba_cli.errors import MobaError
from moba_cli.results import SCHEMA, make_result, read_result, result_path, strict_json, write_result

ROOT = Path(__file__).resolve().parent.parent
SAME_SECOND = "2026-01-01T00:00:00Z"


def _strict_load(path: Path) -> dict:
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _result(**summary) -> dict:
    result = make_result("compare", {"seq": 7}, [{"case": 0, "ms": 1.5}], summary, env={"gpu": None})
    result["created"] = SAME_SECOND  # every run in these tests starts "in the same second"
    return result


def test_eight_parallel_writers_keep_eight_files(tmp_path):
    # Eight processes write into one folder with the same creation time, at the same moment: each must keep its
    # own file (the old names were <kind>-<time>.json with one shared .json.tmp, so most runs were lost).
    writer = textwrap.dedent(
        f"""
        import sys, time
        from moba_cli.results import make_result, write_result
        result = make_result("compare", {{"writer": int(sys.argv[1])}}, [], {{}}, env={{}})
        result["created"] = {SAME_SECOND!r}
        while time.time() < float(sys.argv[2]):  # start together
            pass
        print(write_result(result, sys.argv[3], "unused"))
        """
    )
    import time

    start = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", writer, str(i), str(start), str(tmp_path / "runs")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    files = sorted((tmp_path / "runs").iterdir())
    assert len(files) == 8, files  # and no temp file left behind
    assert sorted(_strict_load(f)["config"]["writer"] for f in files) == list(range(8))
    assert sorted(str(f) for f in files) == sorted(out.strip() for out, _ in outputs)


def test_same_process_same_second_gives_two_files(tmp_path):
    a = write_result(_result(), tmp_path, "unused")
    b = write_result(_result(), tmp_path, "unused")
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith("compare-20260101T000000Z-") and a.suffix == ".json"
    assert len(list(tmp_path.iterdir())) == 2


def test_an_existing_file_in_the_folder_is_never_replaced(tmp_path, monkeypatch):
    # Even if the new name happens to be taken (another run, a copied file), that file stays as it was.
    taken = tmp_path / "compare-taken.json"
    taken.write_text("theirs")
    names = iter([taken, tmp_path / "compare-free.json"])
    monkeypatch.setattr("moba_cli.results.result_path", lambda *a, **k: next(names))
    path = write_result(_result(), tmp_path, "unused")
    assert path == tmp_path / "compare-free.json"
    assert taken.read_text() == "theirs"
    assert _strict_load(path)["schema"] == SCHEMA


def test_non_finite_numbers_become_null_with_a_note(tmp_path):
    result = _result(rel_l2=float("nan"), worst=float("inf"), best=-math.inf, ok=1.0,
                     curve=[1.0, float("nan"), np.float32("inf")], nested={"t": torch.tensor(float("nan"))})
    result["records"] = [{"case": 0, "ms": np.float64("nan"), "mem": np.int64(3)}, {"case": 1, "ms": 2.0}]
    path = write_result(result, tmp_path / "r.json", "unused")
    data = _strict_load(path)  # raises on NaN / Infinity
    s = data["summary"]
    assert s["rel_l2"] is None and s["worst"] is None and s["best"] is None and s["ok"] == 1.0
    assert s["curve"] == [1.0, None, None]
    assert s["non_finite"] == {"rel_l2": "NaN", "worst": "Infinity", "best": "-Infinity", "curve[1]": "NaN",
                               "curve[2]": "Infinity"}
    assert s["nested"] == {"t": None, "non_finite": {"t": "NaN"}}
    assert data["records"][0] == {"case": 0, "ms": None, "mem": 3, "non_finite": {"ms": "NaN"}}
    assert data["records"][1] == {"case": 1, "ms": 2.0}  # a clean record gets no note
    assert math.isnan(result["summary"]["rel_l2"])  # the caller's dict is not changed


def test_strict_json_output_passes_allow_nan_false():
    cleaned = strict_json({"a": [float("nan"), {"b": float("-inf")}], "c": (1, 2)})
    json.dumps(cleaned, allow_nan=False)
    assert cleaned == {"a": [None, {"b": None, "non_finite": {"b": "-Infinity"}}], "c": [1, 2],
                       "non_finite": {"a[0]": "NaN"}}


def test_named_file_is_written_exactly_and_upper_case_suffix_is_a_file(tmp_path):
    path = write_result(_result(), tmp_path / "sub" / "r.JSON", "unused")
    assert path == tmp_path / "sub" / "r.JSON" and path.is_file()
    first = read_result(path)
    result = _result(second=True)
    assert write_result(result, path, "unused") == path  # the user named it: replaced, atomically
    assert read_result(path)["summary"] == {"second": True} and first["summary"] == {}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.JSON"]


def test_result_path_new_names_are_unique(tmp_path):
    names = {result_path("bench", tmp_path, "unused", SAME_SECOND) for _ in range(200)}
    assert len(names) == 200
    assert result_path("bench", None, tmp_path / "d", SAME_SECOND).parent == tmp_path / "d"
    assert result_path("bench", tmp_path / "x.json", "unused") == tmp_path / "x.json"


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_result(_result(), tmp_path, "unused")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not the 0600 of a mkstemp file


def test_failed_serialisation_leaves_nothing(tmp_path):
    result = _result(bad=object())
    with pytest.raises(TypeError):
        write_result(result, tmp_path / "out", "unused")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_place_is_one_moba_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MobaError, match="is a file, not a folder"):
        write_result(_result(), tmp_path / "file" / "deeper", "unused")
    assert (tmp_path / "file").read_text() == "x"


def test_read_result_round_trip_and_schema(tmp_path):
    path = write_result(_result(x=1), tmp_path, "unused")
    data = read_result(path)
    assert data["schema"] == SCHEMA and data["kind"] == "compare" and data["summary"] == {"x": 1}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "else"}))
    with pytest.raises(ValueError, match=SCHEMA):
        read_result(other)
