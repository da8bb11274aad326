"""Token counts written the way people say them: parse_size, parse_size_list, format_size."""

from __future__ import annotations

import pytest

from moba_cli import MobaError
from moba_cli.utils.sizes import format_size, parse_size, parse_size_list


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
    assert parse_size(format_size(n)) == n
