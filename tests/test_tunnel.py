"""Tunnels: the two-way relay itself, and CONNECT through the proxy.

The relay tests drive ``tunnel`` / ``Tunnel`` on in-memory streams. The
CONNECT tests run ``handle_connection`` with the injected connector; two
loopback tests take real HTTPS clients (http.client, curl) through the real
server to a TLS origin whose certificate comes from trustme.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import ssl
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

import trioproxy
from trioproxy._connection import handle_connection
from trioproxy._errors import BadGateway, BadRequest
from trioproxy._http import connect_target
from trioproxy._metrics import ProxyMeters
from trioproxy._tunnel import Tunnel, TunnelStatistics, tunnel

from .helpers import (
    LOOPBACK_TEST_PORTS,
    UpstreamPort,
    read_h11_message,
    send_h11_message,
    start_proxy,
)

# --- helpers ----------------------------------------------------------------


class Firehose(trio.abc.Stream):
    """A peer that sends as fast as it is read and never reads: the fastest
    source and the most stalled sink in one. Counts the bytes pulled from it."""

    def __init__(self) -> None:
        self.pulled = 0
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = max_bytes or 65536
        self.pulled += size
        return b"x" * size

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some(65536):
        received += data
    return bytes(received)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await stream.receive_some(size - len(received))
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


async def assert_closed_by_peer(stream: trio.abc.Stream) -> None:
    """The far end of a stream the tunnel closed: EOF to read, nowhere to write."""
    assert await stream.receive_some(100) == b""
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"anyone there?")


# --- the relay: data, half-close, early close, bound -------------------------


async def test_tunnel_forwards_half_close_while_the_other_direction_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """EOF from one side reaches the other as send_eof(), the opposite direction
    keeps delivering afterwards, prefixes go first, and the tunnel ends cleanly
    (both streams closed, no error) once both directions have ended."""
    client, a = trio.testing.memory_stream_pair()
    b, origin = trio.testing.memory_stream_pair()
    results: list[TunnelStatistics] = []

    async def run() -> None:
        results.append(
            await tunnel(a, b, read_size=4, buffer_chunks=1, a_prefix=b"early ", b_prefix=b"first ")
        )

    with trio.fail_after(5):  # virtual time: fails at once if anything hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client.send_all(b"request")
            await client.send_eof()
            assert await receive_until_eof(origin) == b"early request"
            await trio.testing.wait_all_tasks_blocked()
            assert not results, "the tunnel must go on while one direction is open"
            await origin.send_all(b"reply after the half-close")
            assert await receive_exactly(client, 32) == b"first reply after the half-close"
            await origin.send_all(b"; more")
            await origin.send_eof()
            assert await receive_until_eof(client) == b"; more"
    [statistics] = results
    assert statistics.error is None
    assert statistics.a_to_b.bytes_relayed == len(b"early request")
    assert statistics.b_to_a.bytes_relayed == len(b"first reply after the half-close; more")
    for own_end in (a, b):
        with pytest.raises(trio.ClosedResourceError):
            await own_end.receive_some(1)


class EofRefused(trio.abc.HalfCloseableStream):
    """A stream whose peer is gone for send_eof() (ENOTCONN after a reset), and
    otherwise the wrapped stream."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("[Errno 107] Transport endpoint is not connected")

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_refused_half_close_is_not_a_broken_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the EOF cannot be passed on because that peer is already gone, the
    direction still delivered everything: the other direction goes on, and
    the tunnel ends without an error once it ends too."""
    client, a = trio.testing.memory_stream_pair()
    b, origin = trio.testing.memory_stream_pair()
    results: list[TunnelStatistics] = []

    async def run() -> None:
        results.append(await tunnel(a, EofRefused(b), read_size=1024, buffer_chunks=2))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client.send_all(b"bye")
            await client.send_eof()
            assert await receive_exactly(origin, 3) == b"bye"
            await trio.testing.wait_all_tasks_blocked()
            await origin.send_all(b"still here")
            await origin.send_eof()
            assert await receive_until_eof(client) == b"still here"
    [statistics] = results
    assert statistics.error is None


@pytest.mark.parametrize("closing_side", ["a", "b"])
async def test_early_close_on_either_side_ends_the_tunnel_and_closes_both(
    closing_side: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that closes its whole connection while the other still sends ends
    the tunnel (the write to it fails), with the error reported, not raised, and
    both streams closed."""
    a_far, a = trio.testing.memory_stream_pair()
    b, b_far = trio.testing.memory_stream_pair()
    closer, other = (a_far, b_far) if closing_side == "a" else (b_far, a_far)
    with trio.fail_after(1):  # virtual time: fails at once if the tunnel hangs
        async with trio.open_nursery() as nursery:
            results: list[TunnelStatistics] = []

            async def run() -> None:
                results.append(await tunnel(a, b, read_size=1024, buffer_chunks=2))

            nursery.start_soon(run)
            await other.send_all(b"before")
            await trio.testing.wait_all_tasks_blocked()
            await closer.aclose()
            await other.send_all(b"after the close")
    [statistics] = results
    assert statistics.error is not None
    assert "BrokenResourceError" in statistics.error
    assert await receive_until_eof(other) == b""
    with pytest.raises(trio.BrokenResourceError):
        await other.send_all(b"x")


async def test_cancelling_a_tunnel_closes_both_streams() -> None:
    """Cancellation from outside ends both directions and closes both streams."""
    a_far, a = trio.testing.memory_stream_pair()
    b, b_far = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(tunnel, a, b, read_size=1024, buffer_chunks=2))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    await assert_closed_by_peer(a_far)
    await assert_closed_by_peer(b_far)


async def test_tunnel_memory_is_bounded_when_both_sides_stall() -> None:
    """Two peers that send at full speed and never read: each direction pulls
    exactly (N + 2) x read_size bytes, its channel is full, and the whole tunnel
    holds 2 x (N + 2) x read_size bytes, the documented bound, and no more."""
    read_size, buffer_chunks = 1000, 3
    per_direction = (buffer_chunks + 2) * read_size
    a, b = Firehose(), Firehose()
    relay = Tunnel(read_size=read_size, buffer_chunks=buffer_chunks)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run, a, b)
        await trio.testing.wait_all_tasks_blocked()
        statistics = relay.statistics()
        assert a.pulled == b.pulled == per_direction
        assert relay.gauge.held == a.pulled + b.pulled == 2 * per_direction
        for direction in (statistics.a_to_b, statistics.b_to_a):
            assert direction.buffered_chunks == direction.buffer_capacity == buffer_chunks
            assert direction.bytes_relayed == 0
        nursery.cancel_scope.cancel()
    assert a.closed
    assert b.closed


async def test_a_large_prefix_passes_in_read_size_chunks_within_the_bound() -> None:
    """A prefix larger than the bound is not taken in at once: with a stalled
    sink, the tunnel holds (N + 2) x read_size bytes of it and reads nothing
    from the stream behind it yet."""
    read_size, buffer_chunks = 1000, 2
    a, b = Firehose(), Firehose()
    relay = Tunnel(read_size=read_size, buffer_chunks=buffer_chunks)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(relay.run, a, b, a_prefix=b"p" * (10 * read_size)))
        await trio.testing.wait_all_tasks_blocked()
        assert a.pulled == 0
        assert relay.gauge.held == 2 * (buffer_chunks + 2) * read_size
        nursery.cancel_scope.cancel()


# --- CONNECT targets (sans-I/O) -----------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (b"example.com:443", "example.com", 443),
        (b"127.0.0.1:8443", "127.0.0.1", 8443),
        (b"[::1]:443", "::1", 443),
    ],
)
def test_connect_target_reads_authority_form(target: bytes, host: str, port: int) -> None:
    """host:port (IPv6 in brackets) is the one form CONNECT takes."""
    parsed = connect_target(target)
    assert (parsed.host, parsed.port, parsed.authority) == (host, port, target)


BAD_CONNECT_TARGETS = [
    b"example.com",
    b"example.com:",
    b"example.com:0",
    b"example.com:65536",
    b"example.com:https",
    b"[::1]",
    b"/index.html",
    b"http://example.com:80/",
    b"user@example.com:443",
    b"example.com:443/path",
]


@pytest.mark.parametrize("target", BAD_CONNECT_TARGETS)
def test_connect_target_rejects_other_forms(target: bytes) -> None:
    """A path, an absolute URI, credentials, or a missing or invalid port is a 400."""
    with pytest.raises(BadRequest):
        connect_target(target)


# --- CONNECT through handle_connection ----------------------------------------


def connect_request(target: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> h11.Request:
    return h11.Request(
        method=b"CONNECT", target=target, headers=[(b"Host", target), *(extra or [])]
    )


async def test_connect_opens_a_tunnel_and_keeps_bytes_sent_with_the_head(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """CONNECT host:port connects there, answers 200 without body framing, and
    bytes the client sent right after the head reach the origin first. Its
    access log line has the status the client got and the bytes each way."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    meters = ProxyMeters()
    with trio.fail_after(5):  # virtual time: fails at once if anything hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server,
                    trioproxy.ProxyConfig(),
                    open_upstream=port.open_upstream,
                    meters=meters,
                )
            )
            head = conn.send(connect_request(b"origin.test:443")) or b""
            await client.send_all(head + (conn.send(h11.EndOfMessage()) or b"") + b"\x16hello")
            origin = await port.accept()
            assert isinstance(origin, trio.abc.HalfCloseableStream)
            assert port.connects == [("origin.test", 443)]
            assert await receive_exactly(origin, 6) == b"\x16hello"
            conn.receive_data(bytes(await client.receive_some(65536)))
            response = conn.next_event()
            assert isinstance(response, h11.Response)
            assert (response.status_code, response.reason) == (200, b"Connection established")
            names = {name for name, _ in response.headers.raw_items()}
            assert not names & {b"content-length", b"transfer-encoding"}
            assert conn.our_state is conn.their_state is h11.SWITCHED_PROTOCOL
            await origin.send_all(b"\x16server hello")
            assert await receive_exactly(client, 13) == b"\x16server hello"
            await client.send_eof()
            assert await receive_until_eof(origin) == b""
            await origin.send_all(b"last words")
            await origin.send_eof()
            assert await receive_until_eof(client) == b"last words"
    assert meters.tunnels.held == 0
    assert meters.tunnels.peak > 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert 'method=CONNECT target="origin.test:443" status=200 bytes_in=6 bytes_out=23' in line
    assert line.endswith('ended="client EOF"')  # no reason: a tunnel that ended well
    assert (meters.tunnels_open, meters.tunnel_bytes_up, meters.tunnel_bytes_down) == (0, 6, 23)


async def test_an_idle_connect_tunnel_ends_at_the_stall_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A tunnel in which no byte moves either way (here: half-closed by the
    client, the origin silent) is closed exactly stall_timeout after the last
    byte moved, on both sides, and its log line says so."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    config = trioproxy.ProxyConfig(stall_timeout=42)
    with trio.fail_after(1000):  # virtual time: a missing watchdog fails, not hangs
        await _idle_tunnel_case(port, client, server, conn, config)
    [line] = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert "status=200 bytes_in=4 bytes_out=0" in line
    assert line.endswith('ended="stall timeout"')


async def _idle_tunnel_case(
    port: UpstreamPort,
    client: trio.abc.HalfCloseableStream,
    server: trio.abc.Stream,
    conn: h11.Connection,
    config: trioproxy.ProxyConfig,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(handle_connection, server, config, open_upstream=port.open_upstream)
        )
        head = conn.send(connect_request(b"origin.test:443")) or b""
        await client.send_all(head + (conn.send(h11.EndOfMessage()) or b""))
        origin = await port.accept()
        await client.receive_some(65536)  # 200 Connection established
        await client.send_all(b"ping")
        assert await receive_exactly(origin, 4) == b"ping"
        last_byte_at = trio.current_time()
        await client.send_eof()
        assert await receive_until_eof(origin) == b""
        assert await receive_until_eof(client) == b""  # the proxy gave up and closed
        assert trio.current_time() - last_byte_at == 42
        await trio.testing.wait_all_tasks_blocked()  # the upstream side closes second
        await assert_closed_by_peer(origin)


async def exchange_error(
    request: h11.Request,
    config: trioproxy.ProxyConfig,
    open_upstream: trioproxy.OpenUpstream,
    body: bytes = b"",
) -> h11.Response:
    """Send ``request`` to handle_connection; return the response, which must
    be an error that closes the connection."""
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(handle_connection, server, config, open_upstream=open_upstream))
        await send_h11_message(client, conn, request, body)
        response, _ = await read_h11_message(client, conn)
        assert isinstance(response, h11.Response)
        assert header(response, b"connection") == b"close"
        assert header(response, b"content-length") is not None
        await client.aclose()
    return response


def header(response: h11.Response, name: bytes) -> bytes | None:
    return next((v for n, v in response.headers.raw_items() if n.lower() == name), None)


async def test_connect_to_a_reverse_proxy_is_405_with_allow() -> None:
    """Reverse mode has no tunnels: CONNECT gets 405 with Allow, and nothing is
    connected."""
    port = UpstreamPort()
    config = trioproxy.ProxyConfig(upstream="http://backend.test:8000")
    response = await exchange_error(connect_request(b"origin.test:443"), config, port.open_upstream)
    assert response.status_code == 405
    allow = header(response, b"allow")
    assert allow is not None
    assert b"GET" in allow
    assert b"CONNECT" not in allow
    assert header(response, b"connection") == b"close"
    assert port.connects == []


@pytest.mark.parametrize("target", [b"origin.test", b"/", b"http://origin.test:80/"])
async def test_connect_to_a_target_that_is_not_host_port_is_400(target: bytes) -> None:
    """A CONNECT target that is not authority-form host:port is a 400, never connected."""
    port = UpstreamPort()
    response = await exchange_error(
        connect_request(target), trioproxy.ProxyConfig(), port.open_upstream
    )
    assert response.status_code == 400
    assert header(response, b"connection") == b"close"
    assert port.connects == []


async def test_connect_with_a_body_is_400() -> None:
    """A CONNECT that announces a body is refused: its bytes would be taken for
    the tunnel's."""
    port = UpstreamPort()
    request = connect_request(b"origin.test:443", [(b"Content-Length", b"5")])
    response = await exchange_error(
        request, trioproxy.ProxyConfig(), port.open_upstream, body=b"12345"
    )
    assert response.status_code == 400
    assert port.connects == []


async def test_connect_to_an_unreachable_target_is_502() -> None:
    """A connect failure is a 502, as for ordinary requests."""

    async def refuse(host: str, port: int) -> trio.abc.Stream:
        raise BadGateway(f"cannot connect to {host}:{port}: Connection refused")

    config = trioproxy.ProxyConfig()
    response = await exchange_error(connect_request(b"origin.test:443"), config, refuse)
    assert response.status_code == 502


async def test_connect_timeout_is_504_at_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A target that does not accept within connect_timeout is a 504, sent at
    exactly connect_timeout."""

    async def hang(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    config = trioproxy.ProxyConfig(connect_timeout=7.5)
    started = trio.current_time()
    response = await exchange_error(connect_request(b"origin.test:443"), config, hang)
    assert response.status_code == 504
    assert trio.current_time() - started == 7.5


async def test_tls_handshake_and_https_request_pass_an_in_memory_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A trio.SSLStream client talks TLS to an in-memory origin through CONNECT:
    the tunnel is byte-exact both ways, handshake included."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("origin.test").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()

    async def origin_side() -> None:
        origin = trio.SSLStream(await port.accept(), server_context, server_side=True)
        assert await receive_exactly(origin, 5) == b"ping?"
        await origin.send_all(b"pong!")
        await origin.aclose()

    with trio.fail_after(5):  # virtual time: fails at once if anything hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server,
                    trioproxy.ProxyConfig(),
                    open_upstream=port.open_upstream,
                )
            )
            nursery.start_soon(origin_side)
            await client.send_all(
                b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n"
            )
            head = await client.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200 Connection established\r\n")
            assert head.endswith(b"\r\n\r\n")
            secure = trio.SSLStream(client, client_context, server_hostname="origin.test")
            await secure.send_all(b"ping?")
            assert await receive_exactly(secure, 5) == b"pong!"
            assert await secure.receive_some(100) == b""  # the origin's close_notify
            await secure.aclose()


async def test_connect_tunnel_memory_is_bounded_with_a_stalled_client() -> None:
    """Through handle_connection, a client that stops reading after the 200 and
    an origin that sends without pause: the tunnel holds at most
    (N + 2) x read_size bytes of the download, every byte the origin got rid
    of is among them, and the channel is full (backpressure reached the origin)."""
    config = trioproxy.ProxyConfig(read_size=1024, buffer_chunks=2)
    bound = config.max_buffered_per_direction
    port = UpstreamPort(make_pair=trio.testing.lockstep_stream_pair)
    client, server = trio.testing.lockstep_stream_pair()
    meters = ProxyMeters()
    delivered = 0

    async def firehose_origin() -> None:
        nonlocal delivered
        origin = await port.accept()
        while True:
            await origin.send_all(b"x" * 1024)  # lockstep: returns once the proxy has read it
            delivered += 1024

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                handle_connection, server, config, open_upstream=port.open_upstream, meters=meters
            )
        )
        nursery.start_soon(firehose_origin)
        await client.send_all(b"CONNECT origin.test:443 HTTP/1.1\r\nHost: origin.test:443\r\n\r\n")
        assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        await trio.testing.wait_all_tasks_blocked()
        assert config.buffer_chunks * 1024 <= meters.tunnels.held <= bound
        assert delivered == meters.tunnels.held
        nursery.cancel_scope.cancel()


# --- loopback: real HTTPS clients through the real server ---------------------


async def test_half_close_passes_through_the_real_server() -> None:
    """Over real sockets: the client's shutdown(SHUT_WR) after CONNECT reaches
    the origin as EOF, and the origin's answer, sent only after that EOF, still
    reaches the client, followed by the origin's own EOF."""

    async def reverse_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            data = await receive_until_eof(stream)
            await stream.send_all(data[::-1])

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, reverse_after_eof, listeners)
        origin = b"127.0.0.1:%d" % listeners[0].socket.getsockname()[1]
        proxy_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(connect_ports=LOOPBACK_TEST_PORTS)
        )
        with trio.fail_after(10):  # a guard against a hang, not a timing assertion
            client = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            async with client:
                request = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nhello, " % (origin, origin)
                await client.send_all(request)
                head = bytearray()
                while b"\r\n\r\n" not in head:
                    head += await client.receive_some(65536)
                assert head.startswith(b"HTTP/1.1 200 Connection established\r\n")
                assert head.endswith(b"\r\n\r\n")
                await client.send_all(b"world")
                await client.send_eof()
                assert await receive_until_eof(client) == b"dlrow ,olleh"
        nursery.cancel_scope.cancel()


async def serve_tls_origin(
    ca: trustme.CA, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An HTTPS origin on 127.0.0.1 port 0 answering ``secret <target>``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            request, _ = await read_h11_message(stream, conn)
            assert isinstance(request, h11.Request)
            body = b"secret " + request.target
            headers = [(b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
            await send_h11_message(
                stream, conn, h11.Response(status_code=200, headers=headers), body
            )
        except (EOFError, trio.BrokenResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_ssl_over_tcp_listeners(
        0, context, host="127.0.0.1", https_compatible=True
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        task_status.started(transport.socket.getsockname()[1])


async def test_https_through_the_proxy_with_http_client() -> None:
    """http.client's set_tunnel (CONNECT) reaches a TLS origin through the real
    server and verifies the origin's certificate end to end."""
    ca = trustme.CA()
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_tls_origin, ca)
        proxy_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(connect_ports=LOOPBACK_TEST_PORTS)
        )

        def fetch() -> tuple[int, bytes]:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            connection = http.client.HTTPSConnection(
                "127.0.0.1", proxy_port, context=context, timeout=10
            )
            connection.set_tunnel("127.0.0.1", origin_port)
            try:
                connection.request("GET", "/over/tls?x=1")
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        assert await trio.to_thread.run_sync(fetch) == (200, b"secret /over/tls?x=1")
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_https_through_the_proxy_with_curl(tmp_path: Path) -> None:
    """``curl -p -x`` tunnels to a TLS origin through the real server."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_tls_origin, ca)
        proxy_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(connect_ports=LOOPBACK_TEST_PORTS)
        )
        result = await trio.run_process(
            [
                "curl",
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--noproxy",
                "",
                "-p",
                "-x",
                f"http://127.0.0.1:{proxy_port}",
                "--cacert",
                str(ca_file),
                f"https://127.0.0.1:{origin_port}/via/curl",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"secret /via/curl"
        nursery.cancel_scope.cancel()
