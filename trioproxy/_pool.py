"""Idle upstream keep-alive connections, kept for the next request.

Opening a TCP connection per request costs a handshake, a socket and, on the
origin, a TIME_WAIT entry; a reverse proxy under keep-alive load spends more
time connecting than relaying. So an upstream connection whose exchange ended
cleanly goes back to a pool, and the next request to the same host and port
takes it instead of connecting.

Whether a connection may go back is the exchange's decision
(``_exchange.may_pool``): both messages ended, no body went by splice,
nothing was received past the response, and the exchange raised nothing.
The pool adds one check of its own, at checkout: the socket is not readable.
An idle connection that is readable has EOF (the origin closed it), a reset,
or junk. The check is one ``poll(2)`` with a zero timeout. It applies to
``trio.SocketStream``, and to TLS over one (its socket is polled: an idle
TLS connection has nothing to say either, its session tickets came before
the response it carried); other streams (in-memory) cannot be checked
without reading and are taken as alive.

A connection is found by host, port, owner and TLS-ness: an ``https://``
upstream and a plain one on the same host and port never share a connection.

The check and the request cannot be atomic: an origin may close an idle
connection just after we looked. Such a request fails before a byte of the
response came; the server retries it once on a new connection when that is
safe (a reused connection, an idempotent method without a body, see
``_exchange.may_retry``), as nginx's ``proxy_next_upstream error`` does. The idle
timeout, shorter than the origins' keep-alive timeouts, keeps that race rare.

Bounds: at most ``max_idle_per_server`` idle connections to one server
(host and port) and ``max_idle`` in all; a returned connection past either
cap closes the oldest idle one it competes with. A reload that removes a
server closes its idle connections (``close_idle_except``); its connections
in use are closed when their exchanges end (the exchange does not offer them
back).

Idle connections are closed after ``idle_timeout`` seconds by a reaper task
(``open_upstream_pool``), so nothing is held against the origin during a
lull; checkout takes the most recently returned connection (the least likely
to have been closed by the origin, and it lets the older ones expire when the
load drops).
"""

from __future__ import annotations

import logging
import select
import socket
from collections import deque
from collections.abc import AsyncIterator, Container
from contextlib import asynccontextmanager

import attrs
import trio

from ._endpoint import UpstreamEndpoint

logger = logging.getLogger("trioproxy")

# The most time closing the idle connections may take when the pool closes.
# ``aclose_forcefully`` never waits for a peer, so this only bounds a stream
# type whose close misbehaves; 1 s is far above what closing sockets takes.
CLOSE_ALL_SECONDS = 1.0


@attrs.define(eq=False)
class PooledUpstream:
    """An upstream connection and where it came from.

    Attributes:
        endpoint: the stream and its h11 client state.
        host: the host it is connected to.
        port: the port it is connected to.
        reused: True when it came out of the pool rather than a new connect.
        bytes_before: ``endpoint.bytes_received`` when it was handed out, so
            that ``may_retry`` can tell whether the current response sent any.
        idle_since: ``trio.current_time()`` when it went back to the pool.
        owner: None for a connection any exchange may reuse; else the only
            owner whose exchanges may (a connection that began with one
            client's PROXY protocol header carries that client's address).
        tls: the connection speaks TLS (to an ``https://`` upstream).
    """

    endpoint: UpstreamEndpoint
    host: str
    port: int
    owner: object = None
    reused: bool = False
    bytes_before: int = 0
    idle_since: float = 0.0
    tls: bool = attrs.field(default=False, kw_only=True)


def looks_closed(stream: trio.abc.Stream) -> bool:
    """True when an idle socket is readable: EOF, a reset, or junk is waiting.

    A stream over another (TLS: ``transport_stream``) is checked on the
    socket underneath, as is one that owns a stdlib socket as ``socket``
    (``_tls.SocketTLSStream``). Streams without a socket cannot be checked
    without reading from them, and are reported open.
    """
    sock = socket_under(stream)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def socket_under(stream: trio.abc.Stream) -> trio.socket.SocketType | socket.socket | None:
    """The socket under ``stream``: its own ``socket`` (a ``trio.SocketStream``'s,
    or the stdlib one a ``_tls.SocketTLSStream`` owns), else the one under its
    ``transport_stream`` (TLS over a memory BIO), else None."""
    while not isinstance(sock := getattr(stream, "socket", None), _SOCKETS):
        inner = getattr(stream, "transport_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner
    return sock


_SOCKETS = (trio.socket.SocketType, socket.socket)


class UpstreamPool:
    """Idle keep-alive connections to upstreams, most recent last.

    Use ``open_upstream_pool`` to get one whose idle connections expire;
    ``UpstreamPool(max_idle=0)`` pools nothing (each connection is closed
    when released).

    Memory: at most ``max_idle`` idle connections, each one socket and one
    ``h11.Connection`` whose receive buffer is empty (``_exchange.may_pool``
    requires it), so a few KiB of Python objects and one file descriptor
    each, plus the kernel's socket buffers; and one count per server that
    has idle connections.

    Args:
        max_idle: the most idle connections kept in all; when a returned
            connection would exceed it, the oldest idle one is closed.
        idle_timeout: seconds an idle connection is kept (by the reaper).
        max_idle_per_server: the most idle connections kept to one host and
            port (the oldest of them is closed first); by default
            ``max_idle``.
    """

    def __init__(
        self, *, max_idle: int, idle_timeout: float = 4.0, max_idle_per_server: int | None = None
    ) -> None:
        self.max_idle = max_idle
        self.max_idle_per_server = max_idle if max_idle_per_server is None else max_idle_per_server
        self.idle_timeout = idle_timeout
        self._idle: deque[PooledUpstream] = deque()
        self._per_server: dict[tuple[str, int], int] = {}
        self._returned = trio.Event()
        self._closed = False

    @property
    def idle_count(self) -> int:
        """How many idle connections the pool holds now."""
        return len(self._idle)

    async def checkout(
        self, host: str, port: int, owner: object = None, *, tls: bool = False
    ) -> PooledUpstream | None:
        """Take the most recently returned live connection to ``host:port`` of
        ``owner`` (None: a connection any exchange may reuse) that speaks TLS
        if ``tls``, else plain HTTP.

        Idle connections to it that the upstream closed meanwhile
        (``looks_closed``) are closed and dropped on the way.
        """
        while (candidate := self._take_newest(host, port, owner, tls)) is not None:
            if looks_closed(candidate.endpoint.stream):
                logger.debug("pooled upstream connection was closed by %s:%d", host, port)
                await trio.aclose_forcefully(candidate.endpoint.stream)
                continue  # the deque may have changed meanwhile: search again
            candidate.reused = True
            candidate.bytes_before = candidate.endpoint.bytes_received
            return candidate
        return None

    def idle_to(self, host: str, port: int) -> int:
        """How many idle connections to ``host:port`` the pool holds now."""
        return self._per_server.get((host, port), 0)

    def _take_newest(self, host: str, port: int, owner: object, tls: bool) -> PooledUpstream | None:
        """Remove and return the most recently returned idle connection to
        ``host:port`` of ``owner`` and TLS-ness ``tls``."""
        for index in range(len(self._idle) - 1, -1, -1):
            candidate = self._idle[index]
            if (
                candidate.host == host
                and candidate.port == port
                and candidate.owner is owner
                and candidate.tls == tls
            ):
                return self._remove(index)
        return None

    def _remove(self, index: int) -> PooledUpstream:
        """Remove and return the idle connection at ``index`` (0: the oldest)."""
        upstream = self._idle[index]
        del self._idle[index]
        key = (upstream.host, upstream.port)
        left = self._per_server[key] - 1
        if left:
            self._per_server[key] = left
        else:
            del self._per_server[key]
        return upstream

    def _oldest_to(self, host: str, port: int) -> int:
        """The index of the oldest idle connection to ``host:port`` (one exists)."""
        return next(
            index
            for index, upstream in enumerate(self._idle)
            if upstream.host == host and upstream.port == port
        )

    async def release(self, upstream: PooledUpstream, *, reusable: bool) -> None:
        """Keep ``upstream`` for the next request if ``reusable``, else close it.

        The exchange decides ``reusable`` (``_exchange.may_pool``); the pool
        only adds its own reasons to close: it is closed, or pools nothing.
        """
        if self._closed or self.max_idle == 0 or not reusable:
            await trio.aclose_forcefully(upstream.endpoint.stream)
            return
        upstream.endpoint.reuse()
        upstream.idle_since = trio.current_time()
        key = (upstream.host, upstream.port)
        self._idle.append(upstream)
        self._per_server[key] = self._per_server.get(key, 0) + 1
        if self._per_server[key] > self.max_idle_per_server:
            await trio.aclose_forcefully(self._remove(self._oldest_to(*key)).endpoint.stream)
        elif len(self._idle) > self.max_idle:
            await trio.aclose_forcefully(self._remove(0).endpoint.stream)
        self._returned.set()

    async def close_idle_except(self, servers: Container[tuple[str, int]]) -> int:
        """Close the idle connections to every ``(host, port)`` not in
        ``servers`` (after a reload removed them); returns how many."""
        closed = 0
        index = 0
        while index < len(self._idle):
            upstream = self._idle[index]
            if (upstream.host, upstream.port) in servers:
                index += 1
                continue
            await trio.aclose_forcefully(self._remove(index).endpoint.stream)
            closed += 1
            index = 0  # the deque may have changed meanwhile: search again
        return closed

    async def close_expired_forever(self) -> None:
        """Close each idle connection ``idle_timeout`` seconds after its return.

        Runs until cancelled. The deque is ordered by return time, so the
        first one is always the next to expire.
        """
        while True:
            if not self._idle:
                self._returned = trio.Event()
                await self._returned.wait()
                continue
            expires = self._idle[0].idle_since + self.idle_timeout
            if trio.current_time() < expires:
                await trio.sleep_until(expires)
                continue
            await trio.aclose_forcefully(self._remove(0).endpoint.stream)

    async def aclose(self) -> None:
        """Close every idle connection; from now on released ones are closed too.

        Works when cancelled too: closing is shielded (``aclose_forcefully``
        raises the outer cancellation after each close, which would otherwise
        stop the loop at the first one).
        """
        self._closed = True
        with trio.move_on_after(CLOSE_ALL_SECONDS, shield=True):
            while self._idle:
                await trio.aclose_forcefully(self._remove(0).endpoint.stream)


@asynccontextmanager
async def open_upstream_pool(
    *, max_idle: int, idle_timeout: float, max_idle_per_server: int | None = None
) -> AsyncIterator[UpstreamPool]:
    """A pool whose idle connections close after ``idle_timeout`` seconds
    (``UpstreamPool`` has the arguments).

    Resource handling: the reaper runs in a nursery of its own while the
    block runs; on exit, however it exits (cancellation included), every
    idle connection is closed.
    """
    pool = UpstreamPool(
        max_idle=max_idle, idle_timeout=idle_timeout, max_idle_per_server=max_idle_per_server
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.close_expired_forever)
            yield pool
            nursery.cancel_scope.cancel()
    finally:
        await pool.aclose()
