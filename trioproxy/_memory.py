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
alternatives (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX, and jemalloc
or mimalloc through LD_PRELOAD, which left as much or more resident).

Cyclic garbage first: a cancelled task's exception and its frames reference
each other, so the chunks in those frames stay alive until the cyclic GC's
next full collection, which under a steady load can be minutes away. Trimming
the heap while they are alive would release nothing, so the trimmer calls
``gc.collect()`` first.

Tasks outlive their connection count: a connection's handler task ends a
close or two after the count drops, and after thousands closed at once some
were measured still alive a second later. So trio's ``tasks_living`` is part
of what the trimmer watches, and a trim follows once they are gone.

What a trim alone could not return, each traced to the page it pinned
(docs/memory.md, "After a load"): attribute names that CPython's type cache
keeps alive (``release_type_cache_names``), chunks parked in glibc's
per-thread cache (turned off by ``glibc_tunables`` at the re-exec), and the
upstream pool's idle connections, closed seconds after the load (the trimmer
watches the pool's idle count too).

When: ``trim_heap_when_idle`` looks once per ``IDLE_CHECK_SECONDS``; when the
proxy worked since the last trim (bytes relayed, connections opened or
closed, tasks started or ended, pooled connections closed), nothing but the
pool changed in the last interval and no payload bytes are held, it collects
and trims once. These take a few milliseconds at our heap sizes, and an idle
server never does it twice. Start-up counts as work: the first settled look
trims what imports and parsing left behind.

Small objects: CPython's own allocator (pymalloc) carves them out of 1 MiB
arenas and returns an arena only when every object in it is dead. After a few
thousand connections have come and gone, a handful of survivors per arena
(objects that happened to be allocated during the load and live on) keep
dozens of arenas resident, and ``malloc_trim`` cannot touch them. With
``PYTHONMALLOC=malloc`` small objects come from glibc instead, whose free
pages ``malloc_trim`` does return, at 4 KiB granularity instead of 1 MiB. So
the command line re-executes itself once with ``PYTHONMALLOC=malloc``
(``prepare_process_memory``) unless PYTHONMALLOC is already set. Measured in
docs/memory.md: after 5,000 idle connections closed, 37 MiB stayed resident
with pymalloc and 11 MiB with malloc; idle RSS +0.4 MiB. The price is speed
on small requests: 1 KiB responses through 50 keep-alive connections ran at
949-1,119 req/s with malloc against 1,408-1,418 with pymalloc (wrk, two
alternating pairs). Memory is what this proxy is for, so malloc stays the
default; ``PYTHONMALLOC=pymalloc`` in the environment opts out.

Elsewhere (musl, macOS, Windows) ``trim_heap`` is a no-op and the process is not re-executed.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
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
# A full collection stops the event loop for ~60 us per open connection
# (measured: 300 ms with 5,000 idle connections, 3 ms with none after
# gc.freeze). Above this many connections the trimmer skips it, which caps the
# pause near 15 ms; CPython's own full collections still run as usual.
GC_MAX_CONNECTIONS = 256


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


TCACHE_OFF = "glibc.malloc.tcache_count=0"


def glibc_tunables(current: str | None) -> str:
    """``GLIBC_TUNABLES`` for the re-executed proxy: the user's, with glibc's
    per-thread cache (tcache) turned off unless the user set its size.

    The tcache keeps up to 7 freed chunks of each of 64 small sizes outside
    glibc's free lists; ``malloc_trim`` neither empties nor coalesces it. After
    a load the last chunks freed are the load's own, each alone on a page
    that is otherwise free: measured 115-175 such pages (0.5-0.7 MiB) after
    600 connections, about what was left over once the other causes were
    fixed. The cache speeds up threads racing for an arena; this process is
    one thread, and 1 KiB requests cost the same CPU without it (within the
    noise of alternating runs, docs/memory.md).
    """
    if not current:
        return TCACHE_OFF
    if "glibc.malloc.tcache_count=" in current:
        return current
    return f"{current}:{TCACHE_OFF}"


def prepare_process_memory() -> None:
    """Set up the allocator and the GC for a long-running proxy process.

    Re-executes this process with ``PYTHONMALLOC=malloc`` and the tcache off
    (``glibc_tunables``), once, on glibc, unless PYTHONMALLOC is set (a user's
    choice, or our own re-exec); then freezes the objects that exist after
    start-up (modules, classes) so that the cyclic GC never traverses them
    again: a full collection then costs in proportion to the connections, not
    to the ~100,000 start-up objects.

    Call it first thing in a command-line entry point, never in a library or
    a test: it replaces the running process (same PID, same arguments).
    """
    if "PYTHONMALLOC" not in os.environ and _malloc_trim() is not None:
        environment = {
            **os.environ,
            "PYTHONMALLOC": "malloc",
            "GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES")),
        }
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    gc.collect()
    gc.freeze()


def release_type_cache_names() -> None:
    """Drop the attribute names that CPython's type cache keeps alive.

    The cache (4,096 slots) holds a strong reference to each name it looked
    up. C code that calls a method by a C string makes a new ``str`` for every
    call: ``ExceptionGroup.split`` looks up ``derive`` that way, and trio's
    ``CancelScope.__exit__`` splits every exception group it catches, which
    a cancelled connection's nursery raises. The slot is chosen from the
    string's address, so each new "derive" takes a slot of its own and lives
    on: measured after 600 connections, ~100 such 48-byte strings, each alone
    on a heap page that ``malloc_trim`` then cannot return (1.4 MiB). Clearing
    the cache frees them; it refills in microseconds.
    """
    # CPython's, documented in sys: _clear_internal_caches from 3.13, which
    # deprecates _clear_type_cache (a DeprecationWarning from 3.14).
    clear = getattr(sys, "_clear_internal_caches", None) or getattr(sys, "_clear_type_cache", None)
    if clear is not None:
        clear()


def trim_heap() -> bool:
    """Return the heap's free pages to the kernel; True if anything was released."""
    release_type_cache_names()
    malloc_trim = _malloc_trim()
    return bool(malloc_trim(0)) if malloc_trim is not None else False


def _no_idle_upstreams() -> int:
    return 0


def _activity(meters: ProxyMeters) -> tuple[int, int, int, int]:
    """What changes while the proxy works: bytes relayed, connections open,
    responses sent (a whole short exchange may fit between two looks), and
    tasks alive: a connection's task outlives its count by a close or two,
    and after thousands closed at once some were measured still alive, with
    their sockets and frames, when the count had been 0 for a second."""
    relayed = meters.request_bodies.relayed + meters.response_bodies.relayed
    tasks = trio.lowlevel.current_statistics().tasks_living
    return relayed, meters.client_connections, sum(meters.responses.values()), tasks


def _held(meters: ProxyMeters) -> int:
    return meters.request_bodies.held + meters.response_bodies.held


async def trim_heap_when_idle(
    meters: ProxyMeters, idle_upstreams: Callable[[], int] = _no_idle_upstreams
) -> None:
    """Run until cancelled; collect and trim once each time the proxy settles.

    "Settles" means: bytes were relayed or connections opened or closed since
    the last trim, nothing but the pool changed during the last interval, and
    no payload bytes are held. Closing thousands of idle connections is work
    to clean up after as much as a download is.

    ``idle_upstreams`` counts the upstream pool's idle connections
    (``UpstreamPool.idle_count``). The pool closes them one by one for
    ``--upstream-idle-timeout`` seconds after a load, and their memory is
    free only then (measured: 0.9-1.5 MiB still resident after 600
    connections while this was not watched). So a change in it is work to
    trim after, but it does not hold a trim back: the client side settled.
    """
    # Start-up is work to trim after as well: imports, argument parsing and
    # the classes attrs builds twice leave freed pages all over the heap
    # (measured: idle RSS 30.5 MB before the first trim, 29.4 MB after). So
    # nothing counts as trimmed yet, and the first settled look trims.
    seen = _activity(meters)
    trimmed_at: tuple[int, int, int, int] | None = None
    pooled_at_trim = idle_upstreams()
    while True:
        await trio.sleep(IDLE_CHECK_SECONDS)
        now = _activity(meters)
        pooled = idle_upstreams()
        worked = now != trimmed_at or pooled != pooled_at_trim
        if now == seen and worked and _held(meters) == 0:
            # Cancelled tasks leave exception <-> frame cycles that hold their
            # chunks until a full collection; free them, then trim.
            started = time.perf_counter()
            few = meters.client_connections <= GC_MAX_CONNECTIONS
            unreachable = gc.collect() if few else 0
            collected = time.perf_counter()
            released = trim_heap()
            logger.debug(
                "settled at %s; gc freed %d objects in %.1f ms; heap trimmed (%s) in %.1f ms",
                now,
                unreachable,
                (collected - started) * 1000,
                released,
                (time.perf_counter() - collected) * 1000,
            )
            trimmed_at = now
            pooled_at_trim = pooled
        seen = now
