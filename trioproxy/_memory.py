"""Giving freed heap memory back to the kernel once a load is over.

Why RSS stays up after a load (glibc malloc): payload chunks are 64 KiB
``bytes`` objects, below glibc's mmap threshold (128 KiB, and raised
dynamically up to 32 MiB once an mmapped chunk has been freed), so they come
from the heap arenas. Freed chunks go to the arenas' free lists; glibc gives
pages back to the kernel only when the free space at the very *top* of the
main heap exceeds M_TRIM_THRESHOLD. A few long-lived objects allocated late
(a connection's h11 state, a task frame) pin the top, and every free page
below them stays resident, so RSS stays at the load's level although Python
holds nothing. ``malloc_trim(0)`` walks every arena and releases free pages
anywhere in them (``madvise(MADV_DONTNEED)``, glibc >= 2.8), which is exactly
what is left over. See docs/memory.md for the measurements of this and of the
alternatives (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX).

When: ``trim_heap_when_idle`` looks once per ``IDLE_CHECK_SECONDS``; when bytes
were relayed since the last trim but none in the last interval and none are
held, it trims once. A trim of a heap of a few tens of MB takes about a
millisecond, and an idle server never trims twice.

Elsewhere (musl, macOS, Windows) ``trim_heap`` is a no-op.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import cache

import trio

from ._metrics import ProxyMeters

logger = logging.getLogger("trioproxy.memory")

# How often the trimmer looks; also how long the proxy must have moved no
# bytes before it counts as idle. Short enough that RSS is back well within
# the 5 s after a load that the stress suite waits, long enough to cost
# nothing (one comparison per second).
IDLE_CHECK_SECONDS = 1.0


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` through ctypes, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError):  # not glibc: the name is unknown
        return None
    import ctypes  # only here: ~1 MB of RSS nobody else needs

    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return function


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; True if anything was released."""
    malloc_trim = _malloc_trim()
    return bool(malloc_trim(0)) if malloc_trim is not None else False


def _relayed(meters: ProxyMeters) -> int:
    return meters.request_bodies.relayed + meters.response_bodies.relayed


def _held(meters: ProxyMeters) -> int:
    return meters.request_bodies.held + meters.response_bodies.held


async def trim_heap_when_idle(meters: ProxyMeters) -> None:
    """Run until cancelled; trim once each time the proxy goes idle after work."""
    trimmed_at = seen = _relayed(meters)
    while True:
        await trio.sleep(IDLE_CHECK_SECONDS)
        now = _relayed(meters)
        if now == seen and now != trimmed_at and _held(meters) == 0:
            released = trim_heap()
            logger.debug("idle after %d bytes relayed; heap trimmed: %s", now, released)
            trimmed_at = now
        seen = now
