"""Shared test helpers: in-memory proxy wiring, a loopback origin, an h11 client.

Protocol tests run the proxy's ``handle_connection`` on in-memory streams and
inject an ``open_upstream`` that hands out the other end of an in-memory pair,
so no socket is touched. Loopback tests start a real origin on 127.0.0.1 port 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio
import trio.testing

import trioproxy
from trioproxy._endpoint import UpstreamEndpoint
from trioproxy._server import serve

Handler = Callable[[trio.abc.Stream, h11.Request, h11.Connection, list[bytes]], Awaitable[None]]


@attrs.define
class UpstreamPort:
    """An injected connector: every ``open_upstream`` call yields a new
    in-memory connection whose far end the test receives on ``accepted``.

    ``make_pair`` picks the stream pair type: ``memory_stream_pair`` (buffers
    without limit, for tests that do not care about backpressure) or
    ``lockstep_stream_pair`` (``send_all`` blocks until the peer reads).
    """

    make_pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
        trio.testing.memory_stream_pair
    )
    connects: list[tuple[str, int]] = attrs.Factory(list)
    _send: Any = None
    _receive: Any = None

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](16)

    async def open_upstream(self, host: str, port: int) -> trio.abc.Stream:
        self.connects.append((host, port))
        proxy_side, origin_side = self.make_pair()
        await self._send.send(origin_side)
        return proxy_side

    async def accept(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await self._receive.receive()
        return stream


async def read_h11_message(
    stream: trio.abc.ReceiveStream, conn: h11.Connection, read_size: int = 65536
) -> tuple[h11.Request | h11.Response, bytes]:
    """Read one whole message (head and body) with h11; returns (head, body)."""
    head: h11.Request | h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(read_size)))
            continue
        if isinstance(event, h11.Request | h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise EOFError("connection closed before a whole message")


async def send_h11_message(
    stream: trio.abc.SendStream,
    conn: h11.Connection,
    head: h11.Request | h11.Response,
    body: bytes = b"",
) -> None:
    """Write one whole message with h11."""
    await stream.send_all(conn.send(head) or b"")
    if body:
        await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def serve_one(
    origin: trio.abc.Stream,
    conn: h11.Connection,
    body: bytes = b"ok",
    headers: list[tuple[str, str]] | None = None,
) -> h11.Request:
    """Read one request on ``origin`` and answer it; returns the request."""
    request, _ = await read_h11_message(origin, conn)
    assert isinstance(request, h11.Request)
    fields = [("Content-Length", str(len(body))), *(headers or [])]
    await send_h11_message(origin, conn, h11.Response(status_code=200, headers=fields), body)
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return request


async def serve_origin(
    respond: Callable[
        [h11.Request, bytes], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]
    ],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A loopback origin on 127.0.0.1 port 0: ``respond(request, body)`` gives
    ``(status, headers, body)``. Keep-alive is supported. Reports its port."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                try:
                    request, body = await read_h11_message(stream, conn)
                except (EOFError, h11.RemoteProtocolError, trio.BrokenResourceError):
                    return
                assert isinstance(request, h11.Request)
                status, headers, payload = await respond(request, body)
                headers = [*headers, (b"Content-Length", str(len(payload)).encode())]
                response = h11.Response(status_code=status, headers=headers)
                try:
                    await send_h11_message(stream, conn, response, payload)
                except trio.BrokenResourceError:
                    return
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def start_proxy(nursery: trio.Nursery, config: trioproxy.ProxyConfig, **kwargs: Any) -> int:
    """Start ``serve`` on 127.0.0.1 port 0 in ``nursery``; return its port."""
    config = attrs.evolve(config, listen_host="127.0.0.1", listen_port=0)
    listeners = await nursery.start(
        lambda task_status: serve(config, task_status=task_status, **kwargs)
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


class CountingStream(trio.abc.Stream):
    """Wraps a stream and counts the bytes that pass each way.

    ``received`` is what the proxy pulled out of this stream; ``sent`` what it
    wrote into it. ``closed`` turns true when the proxy closes it.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0
        self.sent = 0
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        assert isinstance(self.inner, trio.abc.HalfCloseableStream)
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking payload of ``size`` bytes."""
    block = bytes((i * 7 + i // 251) % 256 for i in range(65521))  # prime-sized block
    return (block * (size // len(block) + 1))[:size]


# Loopback origins listen on ephemeral ports, which the default
# --connect-ports (443 only) refuses; CONNECT tests through the real server
# allow every port.
LOOPBACK_TEST_PORTS = "1-65535"


GET = h11.Request(method="GET", target="/", headers=[("Host", "origin")])


async def upstream_endpoint_with(
    response: bytes,
    *,
    stream: trio.abc.Stream | None = None,
    read_size: int = 1024,
    request: h11.Request = GET,
    read_all: bool = False,
    eof: bool = False,
) -> UpstreamEndpoint:
    """An upstream endpoint that sent ``request`` whole and received ``response``.

    On ``stream`` if given (the caller delivers the response), else on an
    in-memory pair whose far end sends ``response`` (then EOF if ``eof``).
    Reads up to the response head; with ``read_all``, every event h11 can make
    of one more read, without reading again (as after a complete exchange).
    """
    if stream is None:
        stream, origin = trio.testing.memory_stream_pair()
        await origin.send_all(response)
        if eof:
            await origin.send_eof()
    endpoint = UpstreamEndpoint(stream, read_size=read_size, max_head_size=64 * 1024)
    await endpoint.send_head(request, end=True)
    if read_all:
        await endpoint.receive_once()
        while endpoint.next_event_nowait() not in (h11.NEED_DATA, h11.PAUSED):
            pass
    else:
        assert isinstance(await endpoint.next_event(), h11.Response)
    return endpoint


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected ``trio.SocketStream`` (a socketpair: real sockets, no network)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)
