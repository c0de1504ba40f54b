"""An h11 connection bound to a trio stream: the only code that speaks h11.

h11 brings no I/O; this is the small amount we bring. Everything above it
(the connection loop, the exchange, the body paths, tunnels, the pool) asks
an endpoint in trioproxy's own words and never touches h11's ``Connection``:

* reading: ``next_event`` (reads as h11 needs), ``next_event_nowait`` (never
  reads), ``receive_once`` (one read handed to h11);
* writing: ``send_head`` (a head, and the whole small body with its end, in
  one write), ``send_data``, ``finish``, ``frame_bypassed`` and ``send_framed``
  for bodies that bypass h11 (splice, or the pump past h11), ``mark_broken``
  after a failed write;
* state: ``both_done``, ``switched``, ``has_unparsed_data``, ``leftover``,
  ``reuse`` (the next cycle of a keep-alive connection), ``can_respond``.

Failures are translated here, once, as httpcore's ``map_exceptions`` does:
the same failure means different things on the two sides. A protocol error
from the client is the client's fault (400 or 431), the same from the
upstream is a 502; a broken client stream means nobody is left to answer
(``ClientGone``), a broken upstream stream is a 502.

Writing on plain TCP: what h11 framed goes to the socket in one
``writev(2)``, at once, and only what the socket cannot take now goes
through ``send_all``, which waits. trio's ``send_all`` wraps each write in
two context managers and its socket wrapper's try-then-wait helper, which
together cost more than parsing a short head (issue #14). What it does is
kept: an error of the write raises what ``send_all`` would
(``ClosedResourceError`` for a closed socket, ``BrokenResourceError``
otherwise), and a write yields once when it is done, as ``send_all`` does.
That yield is what keeps the connections fair: without it, a task whose
next request was already waiting ran on ahead of tasks that had waited
longer, and at 50 connections the clients' p99 latency went from 1.5 to
12.6 times the median (profile_request.py). Its check that two tasks never
write at once is not kept: an endpoint has one writer at a time, the
exchange's.

Memory: h11's receive buffer holds what one read of ``read_size`` returned
plus what was left unparsed before it; h11 refuses to buffer more than
``max_incomplete_event_size`` while waiting for a head. On plain TCP the read
itself lands in the process-wide scratch buffer (``_scratch``), which h11
copies from, so a read allocates nothing of its own; a write copies nothing.
"""

from __future__ import annotations

import errno
import os
from typing import cast

import attrs
import h11
import trio

from ._errors import (
    STREAM_ERRORS,
    BadGateway,
    BadRequest,
    ClientGone,
    ProxyError,
    error_for_status,
)
from ._framing import HeadLimits, RequestHeadGuard
from ._scratch import read_into_scratch, scratch_socket

Event = h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]
Head = h11.Request | h11.Response | h11.InformationalResponse


@attrs.frozen
class MessageState:
    """Where an endpoint's current request/response cycle stands, as plain values
    for the exchange's decisions (``may_keep_alive``, ``may_pool``).

    Attributes:
        both_done: both messages ended, as h11 sees them (``DONE`` both ways).
        body_bypassed: a body moved past one of this side's h11
            reader or writer.
        unparsed: bytes (or EOF) received that h11 has not turned into events.
    """

    both_done: bool
    body_bypassed: bool
    unparsed: bool


@attrs.frozen
class BypassedBytes:
    """A stand-in for body bytes that go past h11 (by splice, or by the pump
    straight between the streams): h11 only asks its ``len``."""

    size: int

    def __len__(self) -> int:
        return self.size


class H11Endpoint:
    """One side of an exchange: a byte stream and h11's state of HTTP on it.

    Args:
        stream: the connection to the peer.
        role: ``h11.SERVER`` facing a client, ``h11.CLIENT`` facing an upstream.
        read_size: bytes asked for per read; it bounds one chunk.
        max_head_size: the most h11 buffers while a head is incomplete.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: type[h11.CLIENT] | type[h11.SERVER],
        *,
        read_size: int,
        max_head_size: int,
    ) -> None:
        self.stream = stream
        self._conn = h11.Connection(role, max_incomplete_event_size=max_head_size)
        self.read_size = read_size
        # Bytes read from the stream so far; tells whether a peer sent anything.
        self.bytes_received = 0
        # Read through the shared scratch buffer when it is a plain TCP socket.
        self._socket = scratch_socket(stream)
        # True once a body moved on this connection past this h11
        # connection's reader or writer (``_body``): never reuse it.
        self.body_bypassed = False

    # --- reading -----------------------------------------------------------

    async def next_event(self) -> Event:
        """Return h11's next event, reading from the stream as h11 needs.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        while True:
            event = self._parse()
            if event is not h11.NEED_DATA:
                return event
            await self.receive_once()

    def next_event_nowait(self) -> Event:
        """h11's next event from the bytes already received; never reads.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        return self._parse()

    def _parse(self) -> Event:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._protocol_error(exc) from exc

    async def receive_once(self) -> None:
        """Read once from the stream and hand the bytes (or EOF) to h11.

        Cancelling it loses no data: a read either returns bytes or,
        cancelled, has taken none (``receive_some`` and ``read_into_scratch``
        alike).

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        try:
            if self._socket is not None:
                # A view of the shared scratch buffer: used up (copied by h11)
                # before the next await, as _scratch requires.
                data: bytes | bytearray | memoryview = await read_into_scratch(
                    self._socket, self.read_size
                )
            else:
                data = await self.stream.receive_some(self.read_size)
        except STREAM_ERRORS as exc:
            raise self.stream_error(exc) from exc
        self._received(data)
        self.bytes_received += len(data)
        try:
            self._conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any buffer
        except h11.RemoteProtocolError as exc:
            raise self._protocol_error(exc) from exc

    # --- writing -----------------------------------------------------------

    async def send_head(self, head: Head, *, body: bytes = b"", end: bool = False) -> None:
        """Send a message head; with ``end``, also ``body`` and the message's end.

        Head, body and end go out in one write: a small message costs one
        syscall. Without ``end``, ``body`` must be empty (the body follows
        with ``send_data``).

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        framed = bytearray(self._frame(head))
        if end:
            if body:
                framed += self._frame(h11.Data(data=body))
            framed += self._frame(h11.EndOfMessage())
        elif body:
            raise ValueError("a body without its end goes with send_data")
        await self.send_framed(framed)

    async def send_data(self, chunk: bytes) -> None:
        """Send one body chunk, framed for this hop.

        The chunk passes through as the very object the caller holds (and the
        budget counts): joining it with its framing would copy it and double
        what a slow client pins in memory. Chunked framing adds two tiny
        pieces around it.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        await self.send_framed(*(self._conn.send_with_data_passthrough(h11.Data(data=chunk)) or []))

    async def finish(self) -> None:
        """Send the end of the message body (the last chunk, if chunked).

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        await self.send_framed(self._frame(h11.EndOfMessage()))

    def frame_bypassed(self, size: int) -> list[bytes | BypassedBytes]:
        """The framing of ``size`` body bytes that will go past h11, in order.

        h11 counts the bytes (so ``finish`` checks a Content-Length as
        always) and returns its framing bytes around a ``BypassedBytes``
        placeholder, h11's documented way to send bodies by sendfile and the
        like ("Support for sendfile()"). The caller writes the framing bytes
        with ``send_framed``, sends the body's bytes at the placeholder
        (splice, or ``send_framed`` chunk by chunk), and calls
        ``mark_broken`` if that fails.
        """
        placeholder = BypassedBytes(size)
        # h11 types Data.data as bytes but documents any object with a len()
        # for send_with_data_passthrough; it returns that very object.
        parts = self._conn.send_with_data_passthrough(h11.Data(data=cast(bytes, placeholder)))
        return cast(list[bytes | BypassedBytes], parts or [])

    async def send_framed(self, *pieces: bytes | bytearray) -> None:
        """Write bytes h11 has framed (one or more events, in one or more pieces).

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        try:
            if self._socket is not None:
                await self._write_socket(self._socket, pieces)
            else:
                for piece in pieces:
                    if piece:
                        await self.stream.send_all(piece)
        except STREAM_ERRORS as exc:
            self.mark_broken()
            raise self.stream_error(exc) from exc
        except BaseException:
            # Cancelled mid-write: the framing on the wire is now unknown.
            self.mark_broken()
            raise

    async def _write_socket(
        self, sock: trio.socket.SocketType, pieces: tuple[bytes | bytearray, ...]
    ) -> None:
        """Write ``pieces`` to the plain socket under ``self.stream``: at once
        what it takes, then the rest through ``send_all``; a schedule point
        either way (see the module comment)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if sock.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        try:
            sent = os.writev(sock.fileno(), pieces)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # as trio's SocketStream translates it
            if exc.errno == errno.EBADF:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        waited = False
        for piece in pieces:
            if sent >= len(piece):
                sent -= len(piece)
                continue
            await self.stream.send_all(memoryview(piece)[sent:])
            sent, waited = 0, True
        if not waited:  # send_all yielded already; else yield as it would have
            await trio.lowlevel.cancel_shielded_checkpoint()

    def mark_broken(self) -> None:
        """Say that a write failed midway: this connection sends no more HTTP."""
        self._conn.send_failed()

    def _frame(self, event: h11.Event) -> bytes:
        return self._conn.send(event) or b""

    # --- state -------------------------------------------------------------

    def state(self) -> MessageState:
        """A snapshot of this cycle's state, for decisions made without I/O."""
        return MessageState(self.both_done, self.body_bypassed, self.has_unparsed_data)

    @property
    def both_done(self) -> bool:
        """True when both messages of the current cycle ended (and may cycle)."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    @property
    def switched(self) -> bool:
        """True once this connection carries raw bytes (after CONNECT's 2xx or a 101)."""
        return self._conn.our_state is h11.SWITCHED_PROTOCOL

    @property
    def has_unparsed_data(self) -> bool:
        """True when h11 holds received bytes (or EOF) it has not turned into events."""
        data, closed = self._conn.trailing_data
        return bool(data) or closed

    @property
    def unparsed_size(self) -> int:
        """How many received bytes h11 holds that it has not turned into events."""
        return len(self._conn.trailing_data[0])

    def leftover(self) -> bytes:
        """The bytes h11 read past the last head of a switched connection.

        At most ``read_size``: the endpoints stop reading as soon as h11 has
        a whole head. They are the tunnel's first bytes (a TLS ClientHello
        sent right after CONNECT, a WebSocket frame right after a 101).
        """
        assert self.switched, "only a switched connection has bytes for a tunnel"
        return bytes(self._conn.trailing_data[0])

    def reuse(self) -> None:
        """Start the next request/response cycle; call only when ``both_done``."""
        self._conn.start_next_cycle()

    # --- hooks for the two sides --------------------------------------------

    def _received(self, data: bytes | bytearray | memoryview) -> None:
        """Look at ``data`` before h11 parses it (a hook; by default nothing).

        ``data`` may be a view of the scratch buffer: copy what you keep.
        """

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> Exception:
        raise NotImplementedError

    def stream_error(self, exc: BaseException) -> Exception:
        """What a broken stream to this peer means, as trioproxy's error."""
        raise NotImplementedError

    def short_body(self, message: str) -> ProxyError:
        """What a body that ended before its declared length means."""
        raise NotImplementedError


class ClientEndpoint(H11Endpoint):
    """The client side: its protocol errors are 4xx, its broken stream ClientGone.

    Args:
        head_limits: if given, every request head is checked byte for byte by
            a ``RequestHeadGuard`` before h11 parses it (see ``_framing``).
        initial: bytes already read from ``stream`` that start its HTTP (at
            most one read's worth).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        read_size: int,
        max_head_size: int,
        head_limits: HeadLimits | None = None,
        initial: bytes = b"",
    ) -> None:
        super().__init__(stream, h11.SERVER, read_size=read_size, max_head_size=max_head_size)
        if initial:  # bytes a caller read first (past a PROXY header): the start of HTTP
            self._conn.receive_data(initial)
            self.bytes_received += len(initial)
        self._head_limits = head_limits
        self._head_guard: RequestHeadGuard | None = None
        # The method of the request being answered: a response to HEAD has no
        # body, so an error response to it must not send one.
        self.request_method: bytes | None = None

    async def next_event(self) -> Event:
        """As ``H11Endpoint.next_event``, with each request head checked first."""
        self._before_event()
        return self._after_event(await super().next_event())

    def next_event_nowait(self) -> Event:
        """As ``H11Endpoint.next_event_nowait``, with each request head checked first."""
        self._before_event()
        return self._after_event(super().next_event_nowait())

    @property
    def can_respond(self) -> bool:
        """True while a response head may still be sent (h11 state IDLE or SEND_RESPONSE)."""
        return self._conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}

    def _before_event(self) -> None:
        if self._conn.their_state is h11.IDLE:
            self.request_method = None
        self._start_head_guard()

    def _after_event(self, event: Event) -> Event:
        if isinstance(event, h11.Request):
            self._head_guard = None
            self.request_method = event.method
        return event

    def _start_head_guard(self) -> None:
        if self._head_limits is None or self._head_guard is not None:
            return
        if self._conn.their_state is not h11.IDLE:
            return
        self._head_guard = RequestHeadGuard(self._head_limits)
        # Pipelined bytes h11 already holds are the start of this head. One
        # copy per request, of at most one read.
        self._head_guard.feed(self._conn.trailing_data[0])

    def _received(self, data: bytes | bytearray | memoryview) -> None:
        if self._head_guard is not None and not self._head_guard.done:
            self._head_guard.feed(bytes(data))  # at most one read, while a head arrives

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> ProxyError:
        return error_for_status(exc.error_status_hint, str(exc))

    def stream_error(self, exc: BaseException) -> ClientGone:
        return ClientGone(f"client connection lost: {exc!r}")

    def short_body(self, message: str) -> ProxyError:
        return BadRequest(f"client {message}")


class UpstreamEndpoint(H11Endpoint):
    """The upstream side: every failure is a 502."""

    def __init__(self, stream: trio.abc.Stream, *, read_size: int, max_head_size: int) -> None:
        super().__init__(stream, h11.CLIENT, read_size=read_size, max_head_size=max_head_size)

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> ProxyError:
        return BadGateway(f"upstream broke HTTP/1.1: {exc}")

    def stream_error(self, exc: BaseException) -> ProxyError:
        return BadGateway(f"upstream connection lost: {exc!r}")

    def short_body(self, message: str) -> ProxyError:
        return BadGateway(f"upstream {message}")
