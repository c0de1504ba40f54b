"""Connection limits: a bounded accept loop and the open-file limit.

``serve_listeners_limited`` is ``trio.serve_listeners`` with a
``trio.Semaphore``: each accept loop takes a slot *before* it accepts
and hands it to the connection's handler, which gives it back when the
connection ends. At the limit the loops stop calling ``accept``, so further
connections wait in the kernel's listen backlog (and, past it, are refused by
the kernel) instead of costing memory and descriptors here. With several
listeners (IPv4 and IPv6) each loop may hold a slot while it waits in
``accept``; a held slot becomes a connection, so at most ``limit``
connections are served however many listeners there are. (Not a
``trio.CapacityLimiter``: it remembers every borrower in a set, and a set
keeps the table of its peak size, 512 KiB after 5,000 connections; a
semaphore only counts.)

Like ``trio.serve_listeners``, the loop survives running out of file
descriptors (EMFILE and friends): it logs and retries after a short sleep,
so the connections already served can end and free some.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import trio

logger = logging.getLogger("trioproxy")

StreamT = TypeVar("StreamT", bound=trio.abc.AsyncResource)
ListenerT = TypeVar("ListenerT", bound=trio.abc.Listener[Any])
Handler = Callable[[StreamT], Awaitable[object]]

# accept(2) errors that mean "the system is out of resources right now", not
# "this listener is broken": the same set trio.serve_listeners retries on.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# Seconds to wait before accepting again after such an error; trio's value:
# long enough not to spin, short enough that a freed descriptor is soon used.
ACCEPT_RETRY_SECONDS = 0.1
# Descriptors the process needs besides its connections (stdio, listeners,
# trio's wakeup socket, resolver threads, log files).
SPARE_DESCRIPTORS = 64


async def serve_listeners_limited(
    handler: Handler[StreamT],
    listeners: Sequence[trio.abc.Listener[StreamT]],
    *,
    limiter: trio.Semaphore,
    handler_nursery: trio.Nursery,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept on every listener while ``limiter`` has a slot; serve each stream.

    Resource handling: each accepted stream runs ``handler(stream)`` in
    ``handler_nursery`` and is closed when it returns; its limiter slot is
    released then. Cancelling this closes the listeners, not the handlers.
    """
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, limiter, handler_nursery)
        task_status.started()
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _accept_loop(
    listener: trio.abc.Listener[StreamT],
    handler: Handler[StreamT],
    limiter: trio.Semaphore,
    handler_nursery: trio.Nursery,
) -> None:
    async with listener:
        while True:
            await take_slot(limiter)
            handed_over = False
            try:
                stream = await _accept(listener)
                handler_nursery.start_soon(_run_handler, stream, handler, limiter)
                handed_over = True
            finally:
                if not handed_over:
                    limiter.release()


async def take_slot(limiter: trio.Semaphore) -> None:
    """Take a connection slot; yield only when none is free.

    ``Semaphore.acquire`` always yields, and so does the accept after it: two
    passes of the run loop per accepted connection. Under load each pass
    runs every busy connection's next step, so a burst of new clients (wrk
    opening 50 connections on a busy proxy) was accepted over 330-350 ms,
    and their first requests made the run's p99 (issue #14). The accept's
    own yield is enough to keep this loop fair.
    """
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        await limiter.acquire()


async def _accept(listener: trio.abc.Listener[StreamT]) -> StreamT:
    """Accept one connection, waiting out descriptor or memory exhaustion."""
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                raise
            logger.error(
                "accept failed with %s (%s); retrying in %g s",
                errno.errorcode.get(exc.errno, exc.errno),
                os.strerror(exc.errno),
                ACCEPT_RETRY_SECONDS,
            )
            await trio.sleep(ACCEPT_RETRY_SECONDS)


async def _run_handler(stream: StreamT, handler: Handler[StreamT], limiter: trio.Semaphore) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
        limiter.release()


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit.

    Returns None where the ``resource`` module does not exist (Windows). If
    raising fails, the soft limit stays and is returned.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            # E.g. macOS reports an infinite hard limit it does not grant.
            # Not a warning by itself: the caller warns if the limit is short.
            logger.info("could not raise the open file limit from %d to %d", soft, wanted)
    return soft


def descriptors_needed(max_connections: int) -> int:
    """File descriptors needed to serve ``max_connections`` clients at once.

    Each connection holds two: the client's and its upstream's.
    """
    return 2 * max_connections + SPARE_DESCRIPTORS
