"""Sizes and durations as people write them: one rule for the CLI, the config and the scripts.

Sizes. A number of bytes, or a number and a unit (case ignored, a space allowed):

* ``K``, ``M``, ``G``, ``T`` and ``KiB``, ``MiB``, ``GiB``, ``TiB`` are powers
  of 1024: ``64k`` = ``64KiB`` = 65536.
* ``kB``, ``MB``, ``GB``, ``TB`` (a B without the i) are powers of 1000:
  ``64kB`` = 64000, ``100MB`` = 100000000.
* ``B`` is bytes. A fraction is fine if it comes to whole bytes: ``1.5k`` = 1536.

Why binary for a bare K: every size trioproxy takes is a memory size (a read,
a buffer, a budget), and memory comes in pages of 4096. Why decimal with a B:
that is what ``MB`` means on a network link or a disk, and what curl's
``--limit-rate 20MB`` users expect of ``--rate 20MB``. Until issue #10 the
stress scripts read a bare ``64k`` as 64000; their defaults were written
with ``MB``, which means the same bytes under both rules.

Durations. A number of seconds (``20``, ``0.5``, ``inf``), or a number and one
of ``ms``, ``s``, ``m``, ``h``: ``500ms`` = 0.5, ``20s`` = 20, ``2m`` = 120.

Every parser raises ``ValueError`` with a message that shows the text and how
to write it; ``for_argparse`` makes argparse print that message as it is.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

UNITS_HELP = (
    "Sizes are bytes, or take a unit: K, M, G (or KiB, MiB, GiB) are powers of 1024, "
    "kB, MB, GB are powers of 1000; 64k = 65536, 64kB = 64000. "
    "Durations are seconds, or take a unit: 500ms, 20s, 2m, 1h."
)
"""The rule in one paragraph, for ``--help`` epilogs."""

_NUMBER_AND_UNIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)


def _size_units() -> dict[str, int]:
    units = {"": 1, "b": 1}
    for power, prefix in enumerate("kmgt", start=1):
        units[prefix] = units[f"{prefix}ib"] = 1024**power
        units[f"{prefix}b"] = 1000**power
    return units


_SIZE_UNITS = _size_units()  # lower-case unit -> bytes
# Seconds per unit, as (numerator, denominator): exact, without importing
# fractions (which brings in decimal: ~0.5 MiB of idle RSS).
_DURATION_UNITS = {"ms": (1, 1000), "s": (1, 1), "m": (60, 1), "h": (3600, 1)}
_SIZE_EXAMPLES = "e.g. 65536, 64k (= 64KiB = 65536), 64kB (= 64000), 1.5GiB"
_DURATION_EXAMPLES = "e.g. 20, 0.5, 500ms, 20s, 2m, 1h"


def _split(text: str, what: str, examples: str) -> tuple[int, int, str]:
    """``"1.5 GiB"`` -> ``(15, 10, "gib")``: the number as an exact ratio of
    integers (numerator, a power of ten), and the unit."""
    match = _NUMBER_AND_UNIT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a {what}: {text!r} ({examples})")
    number, unit = match.groups()
    whole, _, decimals = number.partition(".")
    return int(whole + decimals or "0"), 10 ** len(decimals), unit.lower()


def parse_size(text: str) -> int:
    """Parse a size such as ``65536``, ``64k``, ``64KiB``, ``100MB``, ``1.5GiB`` into bytes.

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; kB/MB/GB/TB are powers of
    1000 (see the module docstring for why).

    Raises:
        ValueError: ``text`` is not a size, has an unknown unit, or does not
            come to a whole number of bytes.
    """
    numerator, denominator, unit = _split(text, "size", _SIZE_EXAMPLES)
    factor = _SIZE_UNITS.get(unit)
    if factor is None:
        raise ValueError(
            f"not a size: {text!r} has the unknown unit {unit!r} "
            "(use B, K, M, G, T, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
        )
    size, rest = divmod(numerator * factor, denominator)
    if rest:
        exact = numerator * factor / denominator
        raise ValueError(f"not a size: {text!r} is {exact:g} bytes, not a whole number")
    return size


def parse_duration(text: str) -> float:
    """Parse a duration such as ``20``, ``0.5``, ``500ms``, ``20s``, ``2m`` into seconds.

    A bare number is read as Python's ``float`` reads it, so ``inf`` and
    ``1e3`` work as they always did; whether a value is allowed (negative,
    zero, infinite) is for the setting to decide.

    Raises:
        ValueError: ``text`` is not a number of seconds or a number with
            ``ms``, ``s``, ``m`` or ``h``.
    """
    try:
        return float(text)
    except ValueError:
        pass
    numerator, denominator, unit = _split(text, "duration", _DURATION_EXAMPLES)
    factor = _DURATION_UNITS.get(unit)
    if factor is None:
        raise ValueError(
            f"not a duration: {text!r} has the unknown unit {unit!r} (use ms, s, m or h)"
        )
    return numerator * factor[0] / (denominator * factor[1])


def format_size(size: float) -> str:
    """A size for people, in binary units: ``"512 B"``, ``"64 KiB"``, ``"812.4 MiB"``.

    Whole multiples print without decimals, so ``parse_size`` reads them back
    exactly; others print one decimal.
    """
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def for_argparse(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type`` whose ValueError message is shown as is.

    argparse replaces a plain ValueError with "invalid parse_size value",
    which says nothing about how to write the value. A type such as ``int``
    is returned as it is: "invalid int value: 'x'" says enough.
    """
    if isinstance(parse, type):
        return parse

    def argument(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    argument.__name__ = parse.__name__
    return argument
