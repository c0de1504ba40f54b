"""Graceful shutdown: stop accepting, let in-flight exchanges end, then cancel.

The shape of hypercorn's ``trio/run.py``: the accept loops and the connection
handlers live in two nurseries. When the trigger fires (the CLI's first
SIGTERM or SIGINT), the accept nursery is cancelled, which closes the
listening sockets at once, so new connections are refused by the kernel
rather than accepted and dropped. Then the server drains:

* connections waiting idle for their next request are closed now; nothing is
  in flight on them (``Shutdown.idle_wait`` scopes are cancelled, and new
  ones start cancelled);
* exchanges in flight run on; after their response the connection closes
  instead of waiting for another request;
* after ``shutdown_timeout`` seconds the handler nursery is cancelled, which
  aborts whatever is still running (clients see an incomplete body).

``serve_until_shutdown`` then returns normally.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import attrs
import trio

from ._config import ProxyConfig
from ._limits import Handler, ListenerT, serve_listeners_limited

logger = logging.getLogger("trioproxy")

ShutdownTrigger = Callable[[], Awaitable[object]]


@attrs.frozen
class DrainReport:
    """How a drain went: busy connections (not idle ones) that finished their
    exchange within ``shutdown_timeout``, and those cut at its end."""

    drained: int
    cut: int

    def __str__(self) -> str:
        return f"{self.drained} busy connections drained, {self.cut} cut at the deadline"


class Shutdown:
    """The draining state shared by a server's connections.

    Memory: one cancel scope per connection that is waiting idle, at most;
    the set's table shrinks back whenever none is waiting.
    """

    def __init__(self) -> None:
        self.draining = False
        # Connections the drain's deadline cut (``handle_connection`` counts
        # itself here when it is cancelled while draining).
        self.cut = 0
        self._idle_scopes: set[trio.CancelScope] = set()

    @property
    def idle_count(self) -> int:
        """Connections waiting idle for their next request now."""
        return len(self._idle_scopes)

    def begin(self) -> None:
        """Start draining: cut every idle wait, now and from now on."""
        self.draining = True
        for scope in self._idle_scopes:
            scope.cancel()

    def idle_wait(self, deadline: float = math.inf) -> IdleWait:
        """A cancel scope around a wait that shutdown may cut short, and
        that ends by itself at ``deadline`` (trio's clock)."""
        scope = trio.CancelScope(deadline=deadline)
        if self.draining:
            scope.cancel()
        return IdleWait(self._idle_scopes, scope)


class IdleWait:
    """The context manager of ``Shutdown.idle_wait``: registers the scope
    while it runs. A plain class rather than a ``@contextmanager`` generator,
    as it is entered once per request (the generator showed in profiles)."""

    __slots__ = ("_scope", "_scopes")

    def __init__(self, scopes: set[trio.CancelScope], scope: trio.CancelScope) -> None:
        self._scopes = scopes
        self._scope = scope

    def __enter__(self) -> trio.CancelScope:
        self._scopes.add(self._scope)
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        try:
            return self._scope.__exit__(exc_type, exc, traceback)
        finally:
            self._scopes.discard(self._scope)
            if not self._scopes:
                # A set keeps the table of its peak size (256 KiB after 5,000
                # idle connections); clear() gives an empty one back.
                self._scopes.clear()


async def serve_until_shutdown(
    handler: Handler[Any],
    listeners: Sequence[ListenerT],
    *,
    config: ProxyConfig,
    shutdown: Shutdown,
    trigger: ShutdownTrigger | None,
    task_status: trio.TaskStatus[list[ListenerT]] = trio.TASK_STATUS_IGNORED,
) -> DrainReport:
    """Serve ``listeners`` (at most ``config.max_connections`` at once) until
    ``trigger()`` returns; then drain for ``config.shutdown_timeout`` seconds.

    Without a trigger it serves until cancelled. Cancelling it at any time
    closes the listeners and every connection at once.

    Returns:
        How many connections busy at the trigger finished, and how many the
        deadline cut.
    """
    limiter = trio.Semaphore(config.max_connections)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as accepting:
            serve_all = functools.partial(
                serve_listeners_limited,
                handler,
                listeners,
                limiter=limiter,
                handler_nursery=handlers,
            )
            await accepting.start(serve_all)
            task_status.started(list(listeners))
            await (trigger or trio.sleep_forever)()
            accepting.cancel_scope.cancel()
        busy = config.max_connections - limiter.value - shutdown.idle_count
        logger.info(
            "shutting down: stopped accepting; waiting up to %g s for %d busy connections",
            config.shutdown_timeout,
            busy,
        )
        shutdown.begin()
        handlers.cancel_scope.deadline = trio.current_time() + config.shutdown_timeout
    report = DrainReport(drained=max(0, busy - shutdown.cut), cut=shutdown.cut)
    logger.info("shutdown complete: %s", report)
    return report
