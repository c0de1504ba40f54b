"""An h11 connection bound to a trio stream: read events, write events.

h11 brings no I/O; this is the small amount we bring. The two subclasses
differ only in how they translate failures, because the same failure means
different things on the two sides: a protocol error from the client is the
client's fault (400 or 431), the same from the upstream is a 502; a broken
client stream means nobody is left to answer.

Memory: h11's receive buffer holds what one read of ``read_size`` returned
plus what was left unparsed before it; h11 refuses to buffer more than
``max_incomplete_event_size`` while waiting for a head. On plain TCP the read
itself lands in the process-wide scratch buffer (``_scratch``), which h11
copies from, so a read allocates nothing of its own.
"""

from __future__ import annotations

import h11
import trio

from ._errors import BadGateway, ClientGone, ProxyError, error_for_status
from ._framing import HeadLimits, RequestHeadGuard
from ._scratch import read_into_scratch, scratch_socket

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class H11Endpoint:
    """One side of an exchange: a byte stream and h11's state of HTTP on it.

    Args:
        stream: the connection to the peer.
        conn: h11's protocol state for it (``h11.SERVER`` facing a client,
            ``h11.CLIENT`` facing an upstream).
        read_size: bytes asked for per ``receive_some``; it bounds one chunk.
    """

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection, *, read_size: int) -> None:
        self.stream = stream
        self.conn = conn
        self.read_size = read_size
        # Bytes read from the stream so far; tells whether a peer sent anything.
        self.bytes_received = 0
        # Read through the shared scratch buffer when it is a plain TCP socket.
        self._socket = scratch_socket(stream)
        # True once a body moved on this connection by splice (_body_splice),
        # past this h11 connection's reader or writer: never reuse it.
        self.body_spliced = False

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """Return h11's next event, reading from the stream as h11 needs.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._protocol_error(exc) from exc
            if event is not h11.NEED_DATA:
                return event
            await self.receive_once()

    def next_event_nowait(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """h11's next event from the bytes already received; never reads.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        try:
            return self.conn.next_event()
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
        except _STREAM_ERRORS as exc:
            raise self._stream_error(exc) from exc
        self._received(data)
        self.bytes_received += len(data)
        try:
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 takes any buffer
        except h11.RemoteProtocolError as exc:
            raise self._protocol_error(exc) from exc

    @property
    def has_unparsed_data(self) -> bool:
        """True when h11 holds received bytes (or EOF) it has not turned into events."""
        data, closed = self.conn.trailing_data
        return bool(data) or closed

    async def send(self, event: h11.Event) -> None:
        """Frame ``event`` with h11 and write it to the stream.

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        await self.send_framed(*self._frame(event))

    async def send_framed(self, *pieces: bytes | bytearray) -> None:
        """Write bytes h11 has framed (one or more events, in one or more pieces).

        Raises:
            ProxyError or ClientGone: as translated by the subclass.
        """
        try:
            for piece in pieces:
                if piece:
                    await self.stream.send_all(piece)
        except _STREAM_ERRORS as exc:
            self.conn.send_failed()
            raise self._stream_error(exc) from exc
        except BaseException:
            # Cancelled mid-write: the framing on the wire is now unknown.
            self.conn.send_failed()
            raise

    def _frame(self, event: h11.Event) -> list[bytes]:
        """The bytes to write for ``event``.

        A body chunk passes through as the very object the pump's writer holds
        (and the budget counts): joining it with its framing would copy it and
        double what a slow client pins in memory. Chunked framing adds two tiny
        pieces around it. Anything else (a head, the last chunk) is joined.
        """
        if isinstance(event, h11.Data):
            return self.conn.send_with_data_passthrough(event) or []
        data = self.conn.send(event)
        return [data] if data else []

    def _received(self, data: bytes | bytearray | memoryview) -> None:
        """Look at ``data`` before h11 parses it (a hook; by default nothing).

        ``data`` may be a view of the scratch buffer: copy what you keep.
        """

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> Exception:
        raise NotImplementedError

    def _stream_error(self, exc: Exception) -> Exception:
        raise NotImplementedError


class ClientEndpoint(H11Endpoint):
    """The client side: its protocol errors are 4xx, its broken stream ClientGone.

    Args:
        head_limits: if given, every request head is checked byte for byte by
            a ``RequestHeadGuard`` before h11 parses it (see ``_framing``).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: h11.Connection,
        *,
        read_size: int,
        head_limits: HeadLimits | None = None,
    ) -> None:
        super().__init__(stream, conn, read_size=read_size)
        self._head_limits = head_limits
        self._head_guard: RequestHeadGuard | None = None
        # The method of the request being answered: a response to HEAD has no
        # body, so an error response to it must not send one.
        self.request_method: bytes | None = None

    async def next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """As ``H11Endpoint.next_event``, with each request head checked first."""
        self._before_event()
        return self._after_event(await super().next_event())

    def next_event_nowait(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        """As ``H11Endpoint.next_event_nowait``, with each request head checked first."""
        self._before_event()
        return self._after_event(super().next_event_nowait())

    def _before_event(self) -> None:
        if self.conn.their_state is h11.IDLE:
            self.request_method = None
        self._start_head_guard()

    def _after_event(
        self, event: h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]
    ) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        if isinstance(event, h11.Request):
            self._head_guard = None
            self.request_method = event.method
        return event

    def _start_head_guard(self) -> None:
        if self._head_limits is None or self._head_guard is not None:
            return
        if self.conn.their_state is not h11.IDLE:
            return
        self._head_guard = RequestHeadGuard(self._head_limits)
        # Pipelined bytes h11 already holds are the start of this head. One
        # copy per request, of at most one read.
        self._head_guard.feed(self.conn.trailing_data[0])

    def _received(self, data: bytes | bytearray | memoryview) -> None:
        if self._head_guard is not None and not self._head_guard.done:
            self._head_guard.feed(bytes(data))  # at most one read, while a head arrives

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> ProxyError:
        return error_for_status(exc.error_status_hint, str(exc))

    def _stream_error(self, exc: Exception) -> ClientGone:
        return ClientGone(f"client connection lost: {exc!r}")

    @property
    def can_respond(self) -> bool:
        """True while a response head may still be sent (h11 state IDLE or SEND_RESPONSE)."""
        return self.conn.our_state in {h11.IDLE, h11.SEND_RESPONSE}


class UpstreamEndpoint(H11Endpoint):
    """The upstream side: every failure is a 502."""

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> ProxyError:
        return BadGateway(f"upstream broke HTTP/1.1: {exc}")

    def _stream_error(self, exc: Exception) -> ProxyError:
        return BadGateway(f"upstream connection lost: {exc!r}")
