"""The one rule for sizes and durations (trioproxy/_units.py)."""

from __future__ import annotations

import argparse
import math

import pytest

from trioproxy._units import (
    UNITS_HELP,
    for_argparse,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("4096B", 4096),
        ("64k", 65_536),
        ("64K", 65_536),
        ("64KiB", 65_536),
        ("64kib", 65_536),
        ("64 KiB", 65_536),
        ("64kB", 64_000),
        ("64KB", 64_000),
        ("20M", 20 * 1024**2),
        ("20MiB", 20 * 1024**2),
        ("20MB", 20_000_000),
        ("1g", 1 << 30),
        ("1GiB", 1 << 30),
        ("1GB", 1_000_000_000),
        ("2T", 2 << 40),
        ("1.5k", 1536),
        ("1.5GB", 1_500_000_000),
        (" 8KiB ", 8192),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    """K/M/G/T with or without iB are powers of 1024; with a B and no i,
    powers of 1000; a bare number is bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a size: ''"),
        ("MB", "not a size: 'MB'"),
        ("-1", "not a size: '-1'"),
        ("12 apples", "unknown unit 'apples'"),
        ("5i", "unknown unit 'i'"),
        ("64Ki", "unknown unit 'ki'"),
        ("1.3k", "1331.2 bytes, not a whole number"),
        ("0.5", "0.5 bytes, not a whole number"),
    ],
)
def test_parse_size_rejects_with_a_message(text: str, message: str) -> None:
    """Anything that is not a whole number of bytes is a ValueError that
    shows the text and what is wrong, never a silent zero or a truncation."""
    with pytest.raises(ValueError, match="not a size") as raised:
        parse_size(text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20", 20.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("20s", 20.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5m", 90.0),
        ("250 ms", 0.25),
        ("2M", 120.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    """A bare number is seconds; ms, s, m and h scale it."""
    assert parse_duration(text) == expected


def test_parse_duration_reads_bare_numbers_as_float_does() -> None:
    """A bare number keeps every spelling float() takes (so ``inf`` still
    means "never" and ``-1`` reaches the setting's own check, with its own
    message)."""
    assert parse_duration("inf") == math.inf
    assert parse_duration("1e3") == 1000.0
    assert parse_duration("-1") == -1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "not a duration: ''"), ("s", "not a duration: 's'"), ("5d", "unknown unit 'd'")],
)
def test_parse_duration_rejects_with_a_message(text: str, message: str) -> None:
    """A duration with no number or an unknown unit is a ValueError naming it."""
    with pytest.raises(ValueError, match="not a duration") as raised:
        parse_duration(text)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (65_536, "64 KiB"),
        (1536, "1.5 KiB"),
        (50_000_000, "47.7 MiB"),
        (1 << 30, "1 GiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    """Binary units; whole multiples without decimals, others with one."""
    assert format_size(size) == text


@pytest.mark.parametrize("size", [0, 512, 1024, 65_536, 3 << 20, 5 << 30])
def test_format_size_of_a_whole_multiple_parses_back(size: int) -> None:
    """What format_size writes for a whole multiple, parse_size reads as the same bytes."""
    assert parse_size(format_size(size)) == size


def test_argparse_shows_the_parsers_message() -> None:
    """Through for_argparse, a bad value's error is the parser's own message,
    not argparse's "invalid parse_size value"."""
    assert for_argparse(int) is int  # argparse's "invalid int value" says enough
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--size", type=for_argparse(parse_size))
    assert parser.parse_args(["--size", "2k"]).size == 2048
    with pytest.raises(argparse.ArgumentError, match="unknown unit 'apples'"):
        parser.parse_args(["--size", "3 apples"])


def test_the_help_text_states_the_rule() -> None:
    """The --help paragraph gives the example that tells the two rules apart."""
    assert "64k = 65536" in UNITS_HELP
    assert "64kB = 64000" in UNITS_HELP
    assert parse_size("64k") == 65536
    assert parse_size("64kB") == 64000
    for example in ("500ms", "20s", "2m", "1h"):
        assert example in UNITS_HELP
        parse_duration(example)
