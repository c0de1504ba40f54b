# The soak's HTTP client: what one exchange saw, and the checks of what it should see.
#
# A soak is only as good as its verdicts. Every exchange ends in a Reply that
# says exactly what arrived: the status, the body bytes and whether each one was
# the payload pattern at its offset, whether the message ended as framed, and if
# not, how the connection ended (EOF before the end, or a reset). The expect_*
# functions then compare that with the one outcome the scenario allows and
# raise Unexpected otherwise, with a message that says both.
#
# A cut body must be visible: h11 reports a Content-Length body that ends early
# and a chunked body without its last chunk as a RemoteProtocolError once it has
# seen EOF; that is a "cut", which some scenarios expect. A RemoteProtocolError
# on bytes that did arrive is a malformed response, never expected.
#
# Every client connection records its local port in its Exchange, so that the
# soak can tell, after a worker was killed, which exchanges that worker was
# serving (their failures are counted apart, as the kill's).

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable

import attrs
import h11
import trio
from _stresskit import SEND_BLOCK, Pacer, PatternVerifier

READ_SIZE = 64 * 1024
"""Bytes per receive_some, and a paced reader's burst."""

SLOW_RCVBUF = 64 * 1024
"""SO_RCVBUF of a paced or stalling client, set before connect, so that its
slowness reaches the proxy as a closed TCP window within a few reads (as in
stress.py)."""

KEPT_BODY = 64 * 1024
"""Most body bytes a Reply keeps (JSON answers, error texts); longer bodies are
only verified and counted."""

_SEND_VIEW = memoryview(SEND_BLOCK)


class Unexpected(Exception):
    """An exchange ended other than its scenario expects.

    Attributes:
        status: the final status received, if any.
        lost: the connection broke or closed before the exchange ended (what
            a killed worker does to the exchanges it serves).
    """

    def __init__(self, message: str, *, status: int | None = None, lost: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.lost = lost


@attrs.define
class Exchange:
    """The record of one scenario run: its client connections and requests.

    Attributes:
        kind: the scenario's name.
        ports: local ports of the client connections it opened.
        first_connect: trio time of its first connection.
        on_request: called once per request sent (the soak's exchange count).
    """

    kind: str
    on_request: Callable[[], None] = lambda: None
    ports: list[int] = attrs.Factory(list)
    first_connect: float | None = None
    requests: int = 0

    def connected(self, port: int) -> None:
        self.ports.append(port)
        if self.first_connect is None:
            self.first_connect = trio.current_time()

    def request_sent(self) -> None:
        self.requests += 1
        self.on_request()


async def open_client(
    address: tuple[str, int], exchange: Exchange, *, rcvbuf: int | None = None
) -> trio.SocketStream:
    """A TCP connection to ``address`` (the proxy), recorded in ``exchange``.

    Raises:
        Unexpected: the connection could not be made (lost=True).
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(address)
    except OSError as exc:
        sock.close()
        raise Unexpected(f"connect to the proxy failed: {exc}", lost=True) from exc
    except BaseException:
        sock.close()
        raise
    exchange.connected(sock.getsockname()[1])
    return trio.SocketStream(sock)


def abort(stream: trio.SocketStream) -> None:
    """Make the coming close a RST (SO_LINGER 0): a client that vanishes."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class HttpClient:
    """An h11 client on one stream; knows whether it has seen EOF.

    Memory: h11's receive buffer (at most one read past what was consumed).
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.eof = False

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def request(
        self,
        exchange: Exchange,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        *,
        end: bool = True,
    ) -> None:
        """Send a request head (and its end, if ``end``: no body)."""
        exchange.request_sent()
        await self.send(h11.Request(method=method, target=target, headers=list(headers)))
        if end:
            await self.send(h11.EndOfMessage())

    async def send_body(self, size: int, piece: int = len(SEND_BLOCK)) -> None:
        """Send ``size`` payload bytes in pieces of at most ``piece``, then the end."""
        sent = 0
        while sent < size:
            block = _SEND_VIEW[: min(size - sent, piece)]
            # h11 frames any bytes-like object; its annotation says bytes.
            for data in self.conn.send_with_data_passthrough(h11.Data(data=block)) or ():  # type: ignore[arg-type]
                await self.stream.send_all(data)
            sent += len(block)
        await self.send(h11.EndOfMessage())

    async def next_event(self, pacer: Pacer | None = None) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, reading (paced) while h11 needs data."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self.stream.receive_some(READ_SIZE)
            self.eof = not data
            self.conn.receive_data(data)
            if data and pacer is not None:
                await pacer.consume(len(data))

    def next_cycle(self) -> None:
        """Get ready for the next request on this connection.

        Raises:
            Unexpected: the proxy did not keep the connection open.
        """
        if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            raise Unexpected(
                f"the proxy ended a keep-alive connection (h11: {self.conn.their_state})",
                lost=True,
            )
        self.conn.start_next_cycle()


@attrs.define
class Reply:
    """What arrived in answer to one request."""

    status: int | None = None
    informational: list[int] = attrs.Factory(list)
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    length: int = 0
    verifier: PatternVerifier | None = None
    body: bytearray = attrs.Factory(bytearray)
    complete: bool = False
    ended: str = ""  # how the connection ended before the message did, if it did

    @property
    def verified(self) -> bool:
        return self.verifier is None or self.verifier.ok

    def describe(self) -> str:
        if self.status is None:
            return f"no response ({self.ended or 'nothing'})"
        text = f"status {self.status}, {self.length} body bytes"
        if self.verifier is not None and not self.verifier.ok:
            text += f", NOT the pattern from offset {self.verifier.first_mismatch}"
        if not self.complete:
            text += f", cut ({self.ended or 'left unread'})"
        if self.body and self.status >= 300:
            text += f": {bytes(self.body[:200])!r}"
        return text


async def read_reply(
    client: HttpClient,
    *,
    verify: bool = True,
    pacer: Pacer | None = None,
    stop_after: int | None = None,
    reply: Reply | None = None,
) -> Reply:
    """Read one response (1xx skipped; a 101, or a 2xx to CONNECT, ends it).

    Args:
        verify: check the body against the payload pattern.
        pacer: read at its rate.
        stop_after: return once this many body bytes came (a client that
            leaves or pauses); the Reply is then not complete.
        reply: go on reading into this one (after a ``stop_after``).

    Raises:
        Unexpected: the response was malformed.
    """
    if reply is None:
        reply = Reply(verifier=PatternVerifier() if verify else None)
    try:
        await _read_into(client, reply, pacer, stop_after)
    except h11.RemoteProtocolError as exc:
        if not client.eof:
            raise Unexpected(f"malformed response: {exc}", status=reply.status) from exc
        reply.ended = "EOF before the end of the message"
    except (trio.BrokenResourceError, OSError) as exc:
        reply.ended = f"connection broke: {exc!r}"
    return reply


async def _read_into(
    client: HttpClient, reply: Reply, pacer: Pacer | None, stop_after: int | None
) -> None:
    while True:
        event = await client.next_event(pacer)
        if isinstance(event, h11.InformationalResponse):
            reply.informational.append(event.status_code)
            if event.status_code == 101:
                reply.status, reply.complete = 101, True
                return
        elif isinstance(event, h11.Response):
            reply.status = event.status_code
            reply.headers = dict(event.headers)
            if client.conn.their_state is h11.SWITCHED_PROTOCOL:  # CONNECT's 2xx
                reply.complete = True
                return
        elif isinstance(event, h11.Data):
            reply.length += len(event.data)
            if reply.verifier is not None:
                reply.verifier.feed(event.data)
            if len(reply.body) < KEPT_BODY:
                reply.body += event.data[: KEPT_BODY - len(reply.body)]
            if stop_after is not None and reply.length >= stop_after:
                return
        elif isinstance(event, h11.EndOfMessage):
            reply.complete = True
            return
        else:  # ConnectionClosed before a response, or PAUSED
            reply.ended = "closed before a response"
            return


def expect_body(reply: Reply, size: int) -> None:
    """A 200 whose body is ``size`` bytes of the pattern, ended as framed."""
    if reply.status == 200 and reply.complete and reply.verified and reply.length == size:
        return
    raise _unexpected(reply, f"200 with {size} pattern bytes")


def expect_status(reply: Reply, *statuses: int) -> None:
    """One of ``statuses``, the message ended as framed."""
    if reply.status in statuses and reply.complete:
        return
    raise _unexpected(reply, f"status {' or '.join(map(str, statuses))}")


def expect_cut(reply: Reply, *or_statuses: int) -> None:
    """A 200 whose body ends before its framing says (every byte that came
    being the pattern), or, had the fault come before the head, one of
    ``or_statuses``."""
    if reply.status == 200 and not reply.complete and reply.verified:
        return
    if reply.status in or_statuses and reply.complete:
        return
    alternatives = "".join(f" or status {status}" for status in or_statuses)
    raise _unexpected(reply, f"a visibly cut 200{alternatives}")


def _unexpected(reply: Reply, wanted: str) -> Unexpected:
    lost = reply.status is None or (not reply.complete and bool(reply.ended))
    return Unexpected(f"expected {wanted}; got {reply.describe()}", status=reply.status, lost=lost)
