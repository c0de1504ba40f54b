"""The zero-copy path: splice(2) for tunnels and large Content-Length bodies.

splice needs real sockets, so besides the plain sync tests of the choices
(``can_splice``, ``response_content_length``, pipe sizing) these run on loopback
(127.0.0.1) TCP connections. Which path ran is checked by the proxy's meters:
the channel relay counts the payload bytes it holds in user space, and the
splice path holds none, so its peak stays 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
import trio.testing
import trustme

import trioproxy
from trioproxy._cli import build_parser, config_from_args
from trioproxy._config import KiB, MiB
from trioproxy._exchange import may_pool
from trioproxy._http import request_content_length, response_content_length
from trioproxy._metrics import ProxyMeters
from trioproxy._relay import Progress
from trioproxy._splice import (
    SPLICE_MIN_BODY,
    SinkBroken,
    SourceBroken,
    SplicePump,
    can_splice,
    pipe_max_size,
    pipe_size_for,
    splice_pipe_size,
    splice_relay,
    splice_supported,
)
from trioproxy._tunnel import tunnel

from .helpers import LOOPBACK_TEST_PORTS, pattern, start_proxy, upstream_endpoint_with
from .streaming_origin import (
    REJECT_BODY,
    OriginLog,
    expected_sha256,
    payload_chunks,
    serve_streaming_origin,
)

needs_splice = pytest.mark.skipif(not splice_supported(), reason="splice(2) is Linux-only")

PAGE = os.sysconf("SC_PAGE_SIZE")
# Big enough to take the splice path and to span many pipe fills, small
# enough to keep the suite fast.
BODY_SIZE = 24 * MiB
# Real sockets and real time: a hang fails the test instead of the suite.
SAFETY_SECONDS = 20


# --- the choices, without I/O ------------------------------------------------


def response(headers: list[tuple[str, str]], status: int = 200) -> h11.Response:
    return h11.Response(status_code=status, headers=headers)


def test_response_content_length_only_for_content_length_framed_bodies() -> None:
    """Only a response framed by one Content-Length, with a body, has a length to splice."""
    assert response_content_length(b"GET", response([("Content-Length", "5000000")])) == 5_000_000
    assert response_content_length(b"HEAD", response([("Content-Length", "5000000")])) is None
    for status in (204, 304):
        assert response_content_length(b"GET", response([("Content-Length", "9")], status)) is None
    assert response_content_length(b"GET", response([("Transfer-Encoding", "chunked")])) is None
    assert response_content_length(b"GET", response([])) is None  # close-delimited


def test_pipe_size_is_the_buffer_bound_in_pages_capped_by_the_system() -> None:
    """The pipe gets the channel relay's bound, rounded down to pages, at least
    one page, never above /proc/sys/fs/pipe-max-size."""
    assert pipe_size_for(3 * PAGE) == 3 * PAGE  # far below pipe-max-size (1 MiB by default)
    assert pipe_size_for(PAGE + 1) == PAGE
    assert pipe_size_for(1) == PAGE
    assert pipe_size_for(1 << 40) == pipe_max_size()


async def test_in_memory_streams_fall_back_to_the_channel_relay() -> None:
    """Streams that are not plain sockets never take the splice path."""
    a, b = trio.testing.memory_stream_pair()
    assert not can_splice(a, b, None)
    assert splice_pipe_size(trioproxy.ProxyConfig(), a, b, 1 << 30) is None


@needs_splice
async def test_splice_is_chosen_only_for_plain_sockets_large_bodies_and_when_enabled() -> None:
    """Plain TCP sockets splice for tunnels and bodies >= SPLICE_MIN_BODY;
    small bodies, a TLS stream and ``splice=False`` fall back."""
    async with tcp_pair() as (a, b):
        assert can_splice(a, b, None)
        assert can_splice(a, b, SPLICE_MIN_BODY)
        assert not can_splice(a, b, SPLICE_MIN_BODY - 1)
        config = trioproxy.ProxyConfig()
        assert splice_pipe_size(config, a, b, None) == pipe_size_for(
            config.max_buffered_per_direction
        )
        assert splice_pipe_size(attrs.evolve(config, splice=False), a, b, None) is None
        tls = trio.SSLStream(a, ssl.create_default_context(), server_hostname="x")
        assert not can_splice(tls, b, None)


def test_no_splice_flag_reaches_the_config() -> None:
    """``--no-splice`` turns the zero-copy path off; it is on by default."""
    assert config_from_args(build_parser().parse_args([])).splice is True
    assert config_from_args(build_parser().parse_args(["--no-splice"])).splice is False


# --- the pump on loopback sockets -----------------------------------------------


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """A connected pair of TCP streams on 127.0.0.1."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listener.accept()
    async with near, far:
        yield near, far


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await stream.receive_some(size - len(received))
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


@needs_splice
async def test_splice_relay_stops_exactly_at_max_bytes() -> None:
    """With max_bytes the pump delivers exactly that many bytes, byte-exact,
    and leaves what follows unread in the source."""
    payload = pattern(3 * MiB + 17)
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        progress = Progress()
        received: list[bytes] = []

        async def read_all() -> None:
            received.append(await receive_exactly(reader, len(payload)))

        with trio.fail_after(SAFETY_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.send_all, payload + b"NEXT")
                nursery.start_soon(read_all)
                moved = await splice_relay(
                    source, sink, max_bytes=len(payload), pipe_size=64 * KiB, progress=progress
                )
        assert received == [payload]
        assert moved == progress.bytes_written == progress.bytes_read == len(payload)
        assert await source.receive_some(100) == b"NEXT"


@needs_splice
async def test_splice_relay_returns_at_eof_with_the_count() -> None:
    """Without max_bytes the pump runs to the source's EOF and returns the
    count; with max_bytes, an early EOF returns fewer bytes than asked."""
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        await writer.send_all(b"x" * 1000)
        await writer.send_eof()
        assert await splice_relay(source, sink, max_bytes=5000, pipe_size=PAGE) == 1000
        assert await receive_exactly(reader, 1000) == b"x" * 1000


@needs_splice
async def test_slow_reader_never_gets_more_than_the_pipe_in_the_kernel() -> None:
    """A sink that does not read (small buffers): the pump stops taking from the
    source; the pipe holds at most pipe_size bytes (the kernel's FIONREAD agrees
    with the pump's count); writes are partial and wait; then all of it
    arrives byte-exact once the reader reads."""
    pipe_size = 64 * KiB
    payload = pattern(16 * MiB)
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
        pump = SplicePump(pipe_size=pipe_size)
        digest = hashlib.sha256()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.send_all, payload)
            nursery.start_soon(lambda: pump.run(source, sink, max_bytes=len(payload)))
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(SAFETY_SECONDS):
                while pump.pipe is None or pump.in_pipe == 0:  # until the sink is full
                    await trio.sleep(0.01)  # loopback ACKs are the kernel's, not trio's
                    await trio.testing.wait_all_tasks_blocked()
            assert pump.pipe is not None
            assert 0 < pump.pipe.bytes_held() == pump.in_pipe <= pipe_size
            pulled = pump.progress.bytes_read
            assert pulled < len(payload), "the pump must stop pulling from the source"
            assert pulled - pump.progress.bytes_written == pump.in_pipe
            received = 0
            while received < len(payload):
                data = await reader.receive_some(4096)  # a slow, small-window reader
                digest.update(data)
                received += len(data)
                assert pump.in_pipe <= pipe_size
        assert digest.digest() == hashlib.sha256(payload).digest()
        statistics = pump.statistics()
        assert pump.peak_in_pipe <= pipe_size
        assert statistics.sink_waits > 0  # partial writes met a full socket
        assert statistics.chunks_relayed > len(payload) // pipe_size


@needs_splice
async def test_splice_errors_name_their_side() -> None:
    """A reset sink raises SinkBroken; a reset source raises SourceBroken."""
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await reader.aclose()  # RST: the sink's peer is gone
        await writer.send_all(b"y" * 100_000)
        with pytest.raises(SinkBroken):
            await splice_relay(source, sink, max_bytes=None, pipe_size=PAGE)
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await writer.aclose()  # RST on the source
        with pytest.raises(SourceBroken):
            await splice_relay(source, sink, max_bytes=None, pipe_size=PAGE)


@needs_splice
async def test_a_spliced_tunnel_ends_quietly_when_a_side_resets() -> None:
    """A reset under a spliced tunnel is contained as a broken stream is on
    the channel path: the tunnel ends, closes both streams and reports the
    failing side in its statistics instead of raising."""
    async with tcp_pair() as (writer, source), tcp_pair() as (sink, reader):
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await writer.aclose()  # RST on the tunnel's side ``a``
        with trio.fail_after(SAFETY_SECONDS):
            statistics = await tunnel(
                source, sink, read_size=KiB, buffer_chunks=1, splice_pipe_size=PAGE
            )
            assert await reader.receive_some(100) == b""  # the tunnel closed ``b``
        assert statistics.error is not None
        assert statistics.error.startswith("SourceBroken")


# --- through the proxy --------------------------------------------------------


@attrs.frozen
class Setup:
    origin_port: int
    proxy_port: int
    log: OriginLog
    meters: ProxyMeters


@asynccontextmanager
async def running(mode: str, *, splice: bool) -> AsyncIterator[Setup]:
    log = OriginLog()
    meters = ProxyMeters()
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_streaming_origin, log)
        upstream = f"http://127.0.0.1:{origin_port}" if mode == "reverse" else None
        config = trioproxy.ProxyConfig(
            upstream=upstream, splice=splice, connect_ports=LOOPBACK_TEST_PORTS
        )
        proxy_port = await start_proxy(nursery, config, meters=meters)
        yield Setup(origin_port, proxy_port, log, meters)
        nursery.cancel_scope.cancel()


class HashingClient:
    """An h11 client on a TCP stream that hashes bodies instead of keeping them."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body: list[memoryview] | None = None
    ) -> tuple[int, int, str]:
        """Send one request; return (status, body length, body SHA-256)."""
        headers = [("Host", "origin")]
        if body is not None:
            headers.append(("Content-Length", str(sum(len(c) for c in body))))
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        )
        for chunk in body or []:
            await self.stream.send_all(self.conn.send(h11.Data(data=bytes(chunk))) or b"")
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
        status, length, digest = 0, 0, hashlib.sha256()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(256 * KiB))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                length += len(event.data)
                digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, length, digest.hexdigest()
            else:
                raise AssertionError(f"unexpected {event!r}")


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_large_download_is_byte_exact_and_keeps_the_client_connection(
    splice: bool,
) -> None:
    """A large Content-Length download arrives byte-exact on both paths; the
    splice path holds in user space at most the body bytes that came with the
    head (one read) and pumps none, the channel relay pumps them all; either
    way the client connection serves the next request (h11's framing stayed
    exact)."""
    async with running("reverse", splice=splice) as setup:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with stream:
            client = HashingClient(stream)
            for _ in range(2):
                result = await client.request("GET", f"/bytes/{BODY_SIZE}")
                assert result == (200, BODY_SIZE, expected_sha256(BODY_SIZE))
            gauge = setup.meters.response_bodies
            await trio.testing.wait_all_tasks_blocked()  # the writer resumes after the client read
            if splice:
                assert gauge.peak <= trioproxy.ProxyConfig().read_size
                assert gauge.relayed == 0  # no chunk went through a pump
            else:
                assert gauge.relayed == 2 * BODY_SIZE
            # A small body on the same connection takes the channel relay.
            assert await client.request("GET", "/bytes/5000") == (
                200,
                5000,
                expected_sha256(5000),
            )
        assert len(setup.log.requests) == 3


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_connect_tunnel_is_byte_exact_both_ways_with_half_close(splice: bool) -> None:
    """Through a CONNECT tunnel an upload and a download arrive byte-exact,
    the client's half-close reaches the origin and the origin's close comes
    back as EOF; the splice path holds no payload byte in user space."""
    async with running("forward", splice=splice) as setup:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with stream:
            connect = h11.Connection(h11.CLIENT)
            authority = f"127.0.0.1:{setup.origin_port}"
            await stream.send_all(
                connect.send(
                    h11.Request(method="CONNECT", target=authority, headers=[("Host", authority)])
                )
                or b""
            )
            await stream.send_all(connect.send(h11.EndOfMessage()) or b"")
            while not isinstance(event := connect.next_event(), h11.Response):
                connect.receive_data(await stream.receive_some(4096))
            assert event.status_code == 200
            client = HashingClient(stream)
            upload = payload_chunks(8 * MiB)
            answer = f"{8 * MiB} {expected_sha256(8 * MiB)}".encode()
            assert await client.request("POST", "/upload", upload) == (
                200,
                len(answer),
                hashlib.sha256(answer).hexdigest(),
            )
            assert await client.request("GET", f"/bytes/{BODY_SIZE}") == (
                200,
                BODY_SIZE,
                expected_sha256(BODY_SIZE),
            )
            await stream.send_eof()
            assert await stream.receive_some(100) == b""  # the origin closed after our EOF
        assert setup.log.requests[-1].target == f"/bytes/{BODY_SIZE}".encode()
        assert setup.log.broken == 0
        peak = setup.meters.tunnels.peak
        assert (peak == 0) if splice else (peak > 0)


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_client_leaving_mid_body_closes_the_upstream(splice: bool) -> None:
    """A client that leaves in the middle of a large body: the origin's
    connection breaks, on both paths (cancellation reaches the upstream; that
    it does so with no time passing is test_exchange's, on a virtual clock)."""
    async with running("reverse", splice=splice) as setup:
        client = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with client:
            await client.send_all(b"GET /bytes/1000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await receive_exactly(client, 2 * MiB)
        # A bound on a hang, not on speed: nothing but the client's leaving
        # ends the origin's connection before the stall timeout (120 s).
        with trio.fail_after(SAFETY_SECONDS):
            await setup.log.broken_event.wait()


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_upstream_dying_mid_body_leaves_the_client_body_incomplete(splice: bool) -> None:
    """An origin that closes after 3 of 10 declared MB: the client gets at most
    those bytes and then EOF, never a complete message (h11 reports the short
    body), on both paths; the proxy closes the client connection."""
    async with running("reverse", splice=splice) as setup:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with stream:
            client = HashingClient(stream)
            with pytest.raises(h11.RemoteProtocolError, match="expected 10000000"):
                await client.request("GET", "/die/10000000/3000000")


@needs_splice
async def test_curl_sees_a_spliced_body_cut_short_as_exit_18() -> None:
    """curl reports a spliced body that the upstream cut short as a partial
    transfer (exit status 18)."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    async with running("reverse", splice=True) as setup:
        result = await trio.run_process(
            [
                curl,
                "-s",
                "-o",
                "/dev/null",
                f"http://127.0.0.1:{setup.proxy_port}/die/9000000/2000000",
            ],
            check=False,
        )
        assert result.returncode == 18
        assert setup.meters.response_bodies.relayed == 0  # spliced, not pumped


@needs_splice
async def test_tls_tunnel_through_connect_stays_byte_exact() -> None:
    """A TLS session inside a spliced CONNECT tunnel works end to end (the
    proxy's streams are plain sockets; the TLS is the client's)."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    payload = pattern(2 * MiB)

    async def tls_origin(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        async with tls:
            await tls.send_all(payload)

    meters = ProxyMeters()
    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        origin_port = listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, tls_origin, [listener])
        proxy_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(connect_ports=LOOPBACK_TEST_PORTS), meters=meters
        )
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        await stream.send_all(
            f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1)
        tls = trio.SSLStream(stream, client_context, server_hostname="localhost")
        async with tls:
            assert await receive_exactly(tls, len(payload)) == payload
        nursery.cancel_scope.cancel()
    assert meters.tunnels.peak == 0


# --- uploads: large Content-Length request bodies -----------------------------


def request(headers: list[tuple[str, str]]) -> h11.Request:
    return h11.Request(method="POST", target="/", headers=[("Host", "x"), *headers])


def test_request_content_length_only_for_content_length_framed_requests() -> None:
    """Only a request framed by one Content-Length, and not asking for an
    Upgrade (a 101 needs h11 to have seen the whole request), has a length
    to splice."""
    assert request_content_length(request([("Content-Length", "5000000")])) == 5_000_000
    assert request_content_length(request([("Transfer-Encoding", "chunked")])) is None
    assert request_content_length(request([])) is None
    upgrade = [("Content-Length", "5000000"), ("Connection", "upgrade"), ("Upgrade", "x")]
    assert request_content_length(request(upgrade)) is None


async def test_pool_refuses_a_connection_whose_body_was_spliced() -> None:
    """An upstream connection on which both messages ended (h11 DONE both
    ways, as after a spliced upload: the passthrough counted the bytes) is
    reusable, unless a body went by splice on it."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    endpoint = await upstream_endpoint_with(response, read_all=True)
    assert may_pool(endpoint.state())
    endpoint.body_bypassed = True
    assert not may_pool(endpoint.state())


async def send_upload(
    stream: trio.SocketStream, target: str, size: int, *, chunked: bool = False
) -> h11.Connection:
    """Send a POST of the test payload (Content-Length, or chunked); return the
    client's h11 connection, ready to read the response."""
    conn = h11.Connection(h11.CLIENT)
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
    head = h11.Request(method="POST", target=target, headers=[("Host", "origin"), framing])
    await stream.send_all(conn.send(head) or b"")
    for chunk in payload_chunks(size):
        await stream.send_all(conn.send(h11.Data(data=bytes(chunk))) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    return conn


async def read_response(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, bytes]:
    """Read one whole response with ``conn``; return its status and body."""
    status, body = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(64 * KiB))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def upload_target(mode: str, setup: Setup) -> str:
    if mode == "reverse":
        return "/upload"
    return f"http://127.0.0.1:{setup.origin_port}/upload"


UPLOAD_ANSWER = f"{BODY_SIZE} {expected_sha256(BODY_SIZE)}".encode()


@needs_splice
@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("splice", [True, False])
async def test_large_upload_is_byte_exact_and_spliced_uploads_close_the_client(
    mode: str, splice: bool
) -> None:
    """A large Content-Length upload reaches the origin byte-exact on both
    paths and in both modes. By splice no chunk goes through the request-body
    pump; without splice every byte is pumped, past h11 (``bypass_body``).
    Either way the client's h11 never saw the body, so the response says
    Connection: close, and then the connection ends."""
    async with running(mode, splice=splice) as setup:
        with trio.fail_after(SAFETY_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
            async with stream:
                conn = await send_upload(stream, upload_target(mode, setup), BODY_SIZE)
                assert await read_response(stream, conn) == (200, UPLOAD_ANSWER)
                await trio.testing.wait_all_tasks_blocked()
                gauge = setup.meters.request_bodies
                assert gauge.relayed == (0 if splice else BODY_SIZE)
                assert conn.their_state is h11.MUST_CLOSE  # Connection: close
                assert await stream.receive_some(100) == b""
        assert setup.log.broken == 0


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_upstream_connection_of_a_spliced_upload_is_not_pooled(splice: bool) -> None:
    """After a spliced upload the next request (on a new client connection)
    gets a new upstream connection; after a pumped one it reuses the pooled
    connection."""
    async with running("reverse", splice=splice) as setup:
        with trio.fail_after(SAFETY_SECONDS):
            for _ in range(2):
                stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
                async with stream:
                    conn = await send_upload(stream, "/upload", BODY_SIZE)
                    assert await read_response(stream, conn) == (200, UPLOAD_ANSWER)
                    await trio.testing.wait_all_tasks_blocked()  # the pool got it back
        assert setup.log.connections == (2 if splice else 1)
        assert setup.log.broken == 0


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_client_leaving_mid_upload_closes_the_upstream(splice: bool) -> None:
    """A client that closes after 2 of 24 declared MiB: the exchange ends and
    the origin's connection closes with the request body cut short (the
    origin's h11 reports it), on both paths."""
    async with running("reverse", splice=splice) as setup:
        stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with stream:
            head = f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY_SIZE}\r\n\r\n"
            await stream.send_all(head.encode())
            for chunk in payload_chunks(2 * MiB):
                await stream.send_all(chunk)
        # A bound on a hang, not on speed: nothing but the client's leaving
        # ends the origin's connection before the stall timeout (120 s).
        with trio.fail_after(SAFETY_SECONDS):
            await setup.log.broken_event.wait()
        relayed = setup.meters.request_bodies.relayed
        assert (relayed == 0) if splice else (relayed > 0)


@needs_splice
async def test_chunked_upload_takes_the_channel_relay_and_keeps_the_connection() -> None:
    """A chunked upload, however large, is pumped (no length to splice) and
    the client connection stays keep-alive, with splice on."""
    size = 4 * MiB
    async with running("reverse", splice=True) as setup:
        with trio.fail_after(SAFETY_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
            async with stream:
                conn = await send_upload(stream, "/upload", size, chunked=True)
                answer = f"{size} {expected_sha256(size)}".encode()
                assert await read_response(stream, conn) == (200, answer)
                await trio.testing.wait_all_tasks_blocked()
                assert setup.meters.request_bodies.relayed == size
                assert conn.their_state is h11.DONE


@needs_splice
@pytest.mark.parametrize("splice", [True, False])
async def test_upload_cut_short_by_a_half_close_is_answered_400(splice: bool) -> None:
    """A client that half-closes after 2 of 24 declared MiB gets a 400 with
    Connection: close on both paths (a short body is the client's fault), and
    the origin sees its request cut short."""
    async with running("reverse", splice=splice) as setup:
        with trio.fail_after(SAFETY_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                framing = [("Host", "x"), ("Content-Length", str(BODY_SIZE))]
                head = h11.Request(method="POST", target="/upload", headers=framing)
                await stream.send_all(conn.send(head) or b"")
                for chunk in payload_chunks(2 * MiB):
                    await stream.send_all(conn.send(h11.Data(data=bytes(chunk))) or b"")
                await stream.send_eof()
                status, _ = await read_response(stream, conn)
                assert status == 400
                assert conn.their_state is h11.MUST_CLOSE
            await setup.log.broken_event.wait()


@needs_splice
@pytest.mark.parametrize("target", ["/reject", "/reject-hold"])
@pytest.mark.parametrize("splice", [True, False])
async def test_upstream_answering_before_the_upload_ends_reaches_the_client(
    target: str, splice: bool
) -> None:
    """An origin that answers 413 at once to a 24 MiB upload, then drains it
    or stops reading: the client gets that 413 byte-exact on both paths (an
    upload the upstream will not take is not turned into a 502 or a hang),
    and then the client connection closes, since the rest of its upload was
    abandoned."""
    async with running("reverse", splice=splice) as setup:
        with trio.fail_after(SAFETY_SECONDS):
            stream = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                framing = [("Host", "x"), ("Content-Length", str(BODY_SIZE))]
                head = h11.Request(method="POST", target=target, headers=framing)
                await stream.send_all(conn.send(head) or b"")

                async def upload() -> None:
                    # The proxy may close while we still send: that is the end
                    # of the upload, not a failure of the test.
                    with contextlib.suppress(trio.BrokenResourceError):
                        for chunk in payload_chunks(BODY_SIZE):
                            await stream.send_all(conn.send(h11.Data(data=bytes(chunk))) or b"")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload)
                    assert await read_response(stream, conn) == (413, REJECT_BODY)
                    await _read_until_closed(stream)  # within SAFETY_SECONDS
                    nursery.cancel_scope.cancel()
        assert len(setup.log.requests) == 1


async def _read_until_closed(stream: trio.SocketStream) -> None:
    """Read until the peer closes (EOF or reset)."""
    with contextlib.suppress(trio.BrokenResourceError):
        while await stream.receive_some(64 * KiB):
            pass
