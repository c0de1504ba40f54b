"""Deadlines of a client connection: idle, request head, and body stalls.

Three clocks guard a connection, each against a different way of holding it:

* Idle (``idle_timeout``): a keep-alive connection waits for the first byte
  of its next request. Past the deadline it is closed silently, like nginx:
  nobody asked anything, so there is nobody to answer.
* Head (``header_timeout``): from the first byte of a request head (on a new
  connection: from the accept, so a connection that sends nothing is cut as
  soon as one that trickles) to its end. The deadline is fixed when it
  starts; bytes that trickle in never extend it, so a slowloris client holds
  a connection for ``header_timeout`` at most. Past it: 408 with
  ``Connection: close``, or a silent close if not a byte came.
* Stall (``stall_timeout``): while a body is being relayed in either
  direction, some byte must move in either direction within the timeout.
  Counting both directions means a long upload does not time out its own
  early response and vice versa. The watchdog reads the pumps' ``Progress``
  counters (no callback runs inside a pump) and wakes at most once per
  ``stall_timeout``, or at the exact moment the deadline passes.

Waiting for the response head is not a stall: ``upstream_timeout`` covers it,
and the watchdog is idle while no pump runs.

What counts as movement: a chunk read, or a chunk written in full. A read
returns as soon as any byte arrives, but ``send_all`` of one chunk reports
only at its end, so a receiver slower than ``read_size / stall_timeout``
(64 KiB / 120 s, about 550 bytes/s, with the defaults) is judged stalled
even though it still trickles. That is a minimum rate, close to Apache
mod_reqtimeout's ``MinRate=500`` for bodies, and it is deliberate: a client
that slow is more likely a slow-read attack than a download.

Sending the response head runs under the watchdog too (``guard``): a client
that reads nothing at all must not hold the connection by never taking it.

A stalled upload (before the response head) is answered 504, whichever side
stopped: a client that stops sending and an upstream that stops reading look
the same from here without more bookkeeping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import h11
import trio

from ._config import ProxyConfig
from ._errors import RequestTimeout
from ._h11_io import ClientEndpoint
from ._relay import Progress, collapse_single_error
from ._shutdown import Shutdown


async def wait_for_request(
    client: ClientEndpoint, config: ProxyConfig, shutdown: Shutdown, *, first: bool
) -> float | None:
    """Wait for the first byte (or EOF) of the client's next request head.

    Args:
        client: the client endpoint.
        config: gives ``idle_timeout`` and ``header_timeout``.
        shutdown: a draining server cuts the wait at once.
        first: True for the first request of a new connection.

    Returns:
        The deadline (``trio.current_time()`` scale) for the whole head, or
        None when the connection should close silently (idle, or draining).

    Raises:
        ClientGone: if the connection breaks while waiting.
    """
    now = trio.current_time()
    if client.has_unparsed_data:  # a pipelined request, or EOF, is already here
        return now + config.header_timeout
    if first:
        deadline = now + config.header_timeout
        wait = config.header_timeout
    else:
        deadline = None
        wait = config.idle_timeout
    with shutdown.idle_wait(now + wait):  # one scope: shutdown and the wait's timeout
        await client.receive_once()
        return deadline if deadline is not None else trio.current_time() + config.header_timeout
    return None


async def read_request_head(
    client: ClientEndpoint, config: ProxyConfig, deadline: float
) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    """Read events until the request head is complete, by ``deadline``.

    Returns:
        h11's next event: a ``Request``, or ``ConnectionClosed``.

    Raises:
        RequestTimeout: when ``deadline`` passes first.
        ProxyError or ClientGone: as the client endpoint translates them.
    """
    # The usual head came whole with the read that ended the idle wait: parse
    # it without entering a cancel scope, which costs more than the parse of
    # a short head (issue 5, CPU per request). Only a head still arriving
    # waits, under the deadline.
    event = client.next_event_nowait()
    if event is not h11.NEED_DATA:
        return event
    with trio.move_on_at(deadline):
        return await client.next_event()
    raise RequestTimeout(f"the request head took over {config.header_timeout:g} s")


class StallWatchdog:
    """Cancels a scope when no pump has moved a byte for ``timeout`` seconds.

    Only running pumps are watched: between the request body's end and the
    response head no pump runs, so the watchdog waits.

    Args:
        progress: the pumps' counters, e.g. request and response body.
        timeout: seconds without movement while a pump runs.
    """

    def __init__(self, progress: Sequence[Progress], timeout: float) -> None:
        self._progress = progress
        self._timeout = timeout
        self.stalled = False

    async def watch(self, scope: trio.CancelScope) -> None:
        """Run until the stall deadline passes, then cancel ``scope``; else forever."""
        watched = self._progress
        while True:
            now = trio.current_time()
            deadline = max(p.last_moved for p in watched) + self._timeout
            if now >= deadline and any(p.running for p in watched):
                self.stalled = True
                scope.cancel()
                return
            # A pump that starts later sets last_moved to its start, so when
            # the deadline has passed with none running, waiting one full
            # timeout cannot miss a deadline.
            await trio.sleep_until(deadline if deadline > now else now + self._timeout)


async def run_watched(
    progress: Sequence[Progress], stall_seconds: float, work: Callable[[], Awaitable[object]]
) -> bool:
    """Run ``work`` under a ``StallWatchdog``; True if it was cut for stalling.

    Not a deadline for ``work``: it is cut only once nothing in ``progress``
    has moved for ``stall_seconds`` while something runs. The watchdog task
    and ``work`` share one nursery; ``work``'s own exception is raised as
    itself (not in a group).
    """
    watchdog = StallWatchdog(progress, stall_seconds)
    with collapse_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.watch, nursery.cancel_scope)
            await work()
            nursery.cancel_scope.cancel()
    return watchdog.stalled
