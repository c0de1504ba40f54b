"""The stall watchdog: a body or a tunnel must keep moving.

While a body is being relayed in either direction, or a tunnel runs, some
byte must move in either direction within ``stall_timeout``. Counting both
directions means a long upload does not time out its own early response and
vice versa. The watchdog reads the pumps' ``Progress`` counters (no callback
runs inside a pump) and wakes at most once per ``stall_timeout``, or at the
exact moment the deadline passes.

Waiting for the response head is not a stall: ``upstream_timeout`` covers it,
and the watchdog is idle while no pump runs.

What counts as movement: a chunk read, or a chunk written in full. A read
returns as soon as any byte arrives, but ``send_all`` of one chunk reports
only at its end, so a receiver slower than ``read_size / stall_timeout``
(64 KiB / 120 s, about 550 bytes/s, with the defaults) is judged stalled
even though it still trickles. That is a minimum rate, close to Apache
mod_reqtimeout's ``MinRate=500`` for bodies, and it is deliberate: a client
that slow is more likely a slow-read attack than a download.

Sending the response head runs under the watchdog too: a client that reads
nothing at all must not hold the connection by never taking it.

A stalled upload (before the response head) is answered 504, whichever side
stopped: a client that stops sending and an upstream that stops reading look
the same from here without more bookkeeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from ._errors import collapse_single_error
from ._relay import Progress


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


@asynccontextmanager
async def watch_stalls(
    progress: Sequence[Progress], stall_seconds: float
) -> AsyncIterator[StallWatchdog]:
    """Run the block under a ``StallWatchdog``; afterwards its ``stalled`` says
    whether the block was cut for stalling.

    Not a deadline for the block: it is cut only once nothing in ``progress``
    has moved for ``stall_seconds`` while something runs. The watchdog is a
    task in a nursery around the block; the block's own exception is raised
    as itself (not in a group).
    """
    watchdog = StallWatchdog(progress, stall_seconds)
    with collapse_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.watch, nursery.cancel_scope)
            yield watchdog
            nursery.cancel_scope.cancel()
