"""Token counts written the way people say them: parse_size, parse_size_list, format_size."""

from __future__ import annotations

import numpy as np
import pytest

from moba_cli import MobaError
from moba_cli.utils.sizes import MAX_SIZE, format_size, parse_size, parse_size_list


@pytest.mark.parametrize(
    "text,value",
    [
        ("4096", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("128k", 131072),
        ("1m", 1048576),
        ("1M", 1048576),
        ("10m", 10 * 1048576),
        ("1g", 1024**3),
        (" 2k ", 2048),
        ("1.5k", 1536),
        ("0.5m", 524288),
        ("300", 300),
        ("1", 1),
        (65536, 65536),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", " ", "k", "abc", "4kb", "4 k k", "1.2.3", "-1", "0", "0k", "-4k", "0.0001k",
                                  "1e3", "4x", 0, -5])
def test_parse_size_rejects(text):
    with pytest.raises(MobaError) as info:
        parse_size(text)
    msg = str(info.value)
    assert repr(text) in msg or str(text) in msg  # the message quotes what was given


def test_parse_size_error_suggests_the_format():
    with pytest.raises(MobaError, match="4k, 128k, 1m"):
        parse_size("lots")


def test_parse_size_list():
    assert parse_size_list("32k,128k,1m") == [32768, 131072, 1048576]
    assert parse_size_list(" 4k , 8k ") == [4096, 8192]
    assert parse_size_list("4k,") == [4096]  # a trailing comma is harmless
    assert parse_size_list("100") == [100]


@pytest.mark.parametrize("text", ["", ",", " , ", "4k,x", "4k,0", "4k,,-1"])
def test_parse_size_list_rejects(text):
    with pytest.raises(MobaError):
        parse_size_list(text)


@pytest.mark.parametrize(
    "n,text",
    [(1048576, "1m"), (4096, "4k"), (131072, "128k"), (1024**3, "1g"), (5000, "5000"), (1536, "1536"),
     (1, "1"), (1023, "1023"), (3 * 1024**2, "3m"), (1024**2 + 1024, "1025k")],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n", [1, 100, 1024, 4096, 5000, 65536, 98304, 131072, 1048576, 10 * 1048576, 2**31])
def test_format_then_parse_round_trips(n):
    assert parse_size(format_size(n), limit=2**40) == n


@pytest.mark.parametrize("text", ["2g", "3g", str(2**31), "1" * 40, "1" * 400 + ".5k", "9" * 25 + "m", 2**63,
                                  np.int64(2**40)])
def test_huge_sizes_are_one_clear_error(text):
    # Used to be accepted (then NaN logits or an IndexError deep in a kernel) or an OverflowError traceback.
    with pytest.raises(MobaError, match="too large"):
        parse_size(text)


def test_largest_size_and_a_caller_limit():
    assert parse_size(MAX_SIZE) == MAX_SIZE and parse_size("1g") == 1024**3
    assert parse_size("4k", limit=4096) == 4096
    with pytest.raises(MobaError, match=r"at most 4096 \(4k\)"):
        parse_size("8k", limit=4096)
    with pytest.raises(MobaError, match="too large"):
        parse_size_list("4k,1m", limit=65536)


@pytest.mark.parametrize("value", [np.int64(4096), np.int32(4096), np.uint16(4096)])
def test_numpy_integers_are_sizes(value):
    assert parse_size(value) == 4096


@pytest.mark.parametrize("value", [True, 4.0, np.float32(4), None, np.int64(0), np.int64(-3)])
def test_non_integers_and_non_positive_numbers_are_refused(value):
    with pytest.raises(MobaError):
        parse_size(value)
