"""Shared test helpers: in-memory proxy wiring, a loopback origin, an h11 client,
a connection under a small budget, and what the real-process tests share.

Protocol tests run the proxy's ``handle_connection`` on in-memory streams and
inject an ``open_upstream`` that hands out the other end of an in-memory pair,
so no socket is touched. Loopback tests start a real origin on 127.0.0.1 port 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
import trio.testing

import trioproxy
from trioproxy._config import KiB
from trioproxy._endpoint import UpstreamEndpoint
from trioproxy._limits import SPARE_DESCRIPTORS, descriptors_needed
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


def counting_upstream_port() -> tuple[UpstreamPort, list[CountingStream]]:
    """An ``UpstreamPort`` whose connections count what the proxy pulls from
    them (and writes into them): one ``CountingStream`` per connection, in
    the list, in order."""
    counted: list[CountingStream] = []

    def counting_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        proxy_side, origin_side = trio.testing.memory_stream_pair()
        counted.append(CountingStream(proxy_side))
        return counted[-1], origin_side

    return UpstreamPort(make_pair=counting_pair), counted


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking payload of ``size`` bytes."""
    block = bytes((i * 7 + i // 251) % 256 for i in range(65521))  # prime-sized block
    return (block * (size // len(block) + 1))[:size]


# --- A proxy connection under a small shared budget ---------------------------
# (test_memory_budget, test_metrics) In-memory streams; the client's side is a
# lockstep stream, so a client that stops reading stops the proxy's writes.

BUDGETED_READ_SIZE = KiB  # small chunks keep the tests fast; the bounds scale with them
BUDGETED_BUFFER_CHUNKS = 4
BUDGETED_MEMORY = 48 * KiB  # below what 20 stalled connections' channels could hold
BUDGETED_CONFIG = trioproxy.ProxyConfig(
    read_size=BUDGETED_READ_SIZE,
    buffer_chunks=BUDGETED_BUFFER_CHUNKS,
    max_buffer_memory=BUDGETED_MEMORY,
)
PATTERN_BODY = bytes(range(256)) * 256  # 64 KiB, a recognisable pattern


async def serve_body(port: UpstreamPort, body: bytes) -> None:
    """Answer every upstream connection's request with ``body``, then close."""
    async with trio.open_nursery() as nursery:
        while True:
            stream = await port.accept()
            nursery.start_soon(_answer, stream, body)


async def _answer(stream: trio.abc.Stream, body: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    await read_h11_message(stream, conn)
    headers = [(b"Content-Length", str(len(body)).encode())]
    with contextlib.suppress(trio.BrokenResourceError):
        await send_h11_message(stream, conn, h11.Response(status_code=200, headers=headers), body)


def _request_bytes() -> bytes:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target="http://origin.test/x", headers=[("Host", "o")])
    return (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def stalled_client(
    stream: trio.abc.Stream, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Send a GET, read the response head, then never read again."""
    await stream.send_all(_request_bytes())
    head = await stream.receive_some(64 * KiB)
    assert head.startswith(b"HTTP/1.1 200")
    task_status.started()
    await trio.sleep_forever()


async def start_budgeted_connection(
    nursery: trio.Nursery, meters: trioproxy.ProxyMeters, port: UpstreamPort
) -> trio.abc.Stream:
    """Run ``handle_connection`` with ``BUDGETED_CONFIG`` and ``meters`` in
    ``nursery``, upstreams from ``port``; return the client's end."""
    client_side, proxy_side = trio.testing.lockstep_stream_pair()
    nursery.start_soon(
        lambda: trioproxy.handle_connection(
            proxy_side, BUDGETED_CONFIG, open_upstream=port.open_upstream, meters=meters
        )
    )
    return client_side


# --- The real program in a subprocess ----------------------------------------
# (test_process, test_workers)

ROOT = Path(__file__).resolve().parent.parent
# Real seconds within which a prompt action (startup, exit) must happen; far
# above what it takes, so a loaded machine does not make the tests flaky.
PROMPTLY = 20.0
CHUNK = b"d" * 10_000
CHUNKS = 20


class LineReader:
    """Lines from a byte stream (a process's stderr)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def line(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(4096)
            if not chunk:
                raise EOFError(f"no more lines; unfinished: {bytes(self._buffer)!r}")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()

    async def until(self, text: str) -> list[str]:
        """Read lines up to and including the first containing ``text``."""
        lines = []
        while True:
            lines.append(await self.line())
            if text in lines[-1]:
                return lines

    async def rest(self) -> str:
        data = bytes(self._buffer)
        while chunk := await self._stream.receive_some(4096):
            data += chunk
        return data.decode()


@attrs.define
class GatedOrigin:
    """An origin whose download sends half, then waits for ``release``."""

    release: trio.Event = attrs.Factory(trio.Event)
    half_sent: trio.Event = attrs.Factory(trio.Event)
    port: int = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            await read_h11_message(stream, conn)
            length = str(len(CHUNK) * CHUNKS)
            head = h11.Response(status_code=200, headers=[("Content-Length", length)])
            await stream.send_all(conn.send(head) or b"")
            for n in range(CHUNKS):
                if n == CHUNKS // 2:
                    self.half_sent.set()
                    await self.release.wait()
                await stream.send_all(conn.send(h11.Data(data=CHUNK)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except trio.BrokenResourceError:
            return


async def download(proxy_port: int, origin_port: int, received: list[int]) -> int:
    """GET the origin's file through the proxy; returns the body length.

    Appends each chunk's size to ``received`` as it arrives. Raises
    ``h11.RemoteProtocolError`` if the connection ends before the body does.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=f"http://127.0.0.1:{origin_port}/file",
            headers=[("Host", f"127.0.0.1:{origin_port}")],
        )
        await stream.send_all(conn.send(request) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        total = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                total += len(event.data)
                received.append(len(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return total


def args_for_a_quiet_start() -> list[str]:
    """No flags, unless this machine's descriptor limit is too low for the
    default --max-connections (then the proxy rightly warns at startup)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = descriptors_needed(trioproxy.ProxyConfig().max_connections)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return []
    return ["--max-connections", str(max(1, (hard - SPARE_DESCRIPTORS) // 2))]


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


async def stdout_sha256(argv: Sequence[str]) -> tuple[int, str, int]:
    """Run ``argv`` (curl, say) hashing its stdout as it comes; returns
    (exit status, sha256 hex digest, bytes)."""
    digest = hashlib.sha256()
    size = 0
    process = await trio.lowlevel.open_process(list(argv), stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        while chunk := await process.stdout.receive_some(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        status = await process.wait()
    finally:
        process.kill()  # no-op once it has exited
        await process.wait()
    return status, digest.hexdigest(), size


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected ``trio.SocketStream`` (a socketpair: real sockets, no network)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


@attrs.define
class Proxy:
    process: trio.Process
    stderr: LineReader
    port: int
    startup_line: str


@asynccontextmanager
async def proxy_process(*args: str, unset: Sequence[str] = ()) -> AsyncIterator[Proxy]:
    """Start the proxy, read its startup line; kill it at the end if still alive.

    ``unset``: environment variables the proxy must not inherit.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in unset:
        env.pop(name, None)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioproxy", "--listen", "127.0.0.1:0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stderr is not None
        stderr = LineReader(process.stderr)
        with trio.fail_after(PROMPTLY):
            line = await stderr.until("trioproxy listening on ")
        startup = line[-1]
        port = int(startup.rsplit(":", 1)[1])
        yield Proxy(process, stderr, port, startup)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
