"""``SocketTLSStream``: TLS with OpenSSL on the socket itself, on real sockets.

Each test runs both ends over ``trio.socket.socketpair()`` (TLS does not
care that it is a Unix socket), certificates from trustme (``tlskit``). The
bound is checked against the kernel: ``FIONREAD`` says how many bytes still
wait in a socket's receive queue, so what OpenSSL took out of it is known
exactly.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import ssl
import sys
import termios
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._errors import BadGateway
from trioproxy._metrics import ProxyMeters
from trioproxy._tls import (
    TLS_RECORD_OVERHEAD,
    TLS_RECORD_SIZE,
    BoundedTLSStream,
    SocketTLSStream,
    ciphertext_size,
    client_context,
    describe_tls_failure,
    handshake_failure_reason,
    open_tls_upstream,
    server_context,
    tls_stream,
)
from trioproxy._tls_legs import Replayed

from .tlskit import Pki, make_pki, read_exactly

KiB = 1024
RECORD_CIPHERTEXT = TLS_RECORD_SIZE + TLS_RECORD_OVERHEAD


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def socket_streams() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


@asynccontextmanager
async def tls_pair(
    pki: Pki, *, max_write: int = 64 * KiB, max_read: int = 64 * KiB
) -> AsyncIterator[tuple[SocketTLSStream, SocketTLSStream]]:
    """A client and a server ``SocketTLSStream``, handshake done; closed after."""
    client_transport, server_transport = socket_streams()
    server = SocketTLSStream(
        server_transport,
        server_context([pki.pair("localhost")]),
        server_side=True,
        max_write=max_write,
        max_read=max_read,
    )
    client = SocketTLSStream(
        client_transport,
        client_context(ca_file=pki.ca),
        server_hostname="localhost",
        max_write=max_write,
        max_read=max_read,
    )
    async with client, server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        yield client, server


def queued(stream: SocketTLSStream) -> int:
    """Bytes waiting in the kernel's receive queue of ``stream``'s socket."""
    count = array.array("i", [0])
    fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, count)
    return count[0]


def payload(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


# --- transfers ---------------------------------------------------------------------


async def test_transfers_are_byte_exact_both_ways_at_once(pki: Pki) -> None:
    """Two megabytes each way, sent at once in large and odd-sized calls,
    arrive byte for byte; ALPN is http/1.1 as on ``BoundedTLSStream``."""
    up, down = payload(2_000_000), payload(2_000_001)[::-1]
    got: dict[str, bytes] = {}
    async with tls_pair(pki, max_write=50_000, max_read=30_000) as (client, server):
        assert client.ssl_object.selected_alpn_protocol() == "http/1.1"

        async def receive(name: str, stream: SocketTLSStream, size: int) -> None:
            got[name] = await read_exactly(stream, size)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, up)
            nursery.start_soon(server.send_all, memoryview(down))
            nursery.start_soon(receive, "server", server, len(up))
            nursery.start_soon(receive, "client", client, len(down))
    assert hashlib.sha256(got["server"]).digest() == hashlib.sha256(up).digest()
    assert got["client"] == down


# --- the bound -------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [1, 1000, 20_000, 64 * KiB, None])
async def test_a_receive_takes_at_most_one_record_beyond_what_it_returns(
    pki: Pki, max_bytes: int | None
) -> None:
    """With 120 KB of records waiting in the kernel, each receive returns at
    most ``min(max_bytes, max_read)`` bytes, and the kernel's queue shrinks
    by at most their ciphertext plus one record: OpenSSL reads no further
    ahead. Everything still arrives."""
    max_read = 48 * KiB
    data = payload(120_000)
    async with tls_pair(pki, max_read=max_read) as (client, server):
        await client.send_all(data)  # fits in the socket buffers: all sent
        received = bytearray()
        while len(received) < len(data) and len(received) < 100_000:
            before = queued(server)
            chunk = await server.receive_some(max_bytes)
            taken = before - queued(server)
            assert 1 <= len(chunk) <= min(max_bytes or max_read, max_read)
            assert taken <= ciphertext_size(len(chunk)) + RECORD_CIPHERTEXT
            assert server.ssl_object.pending() < TLS_RECORD_SIZE
            received += chunk
        received += await read_exactly(server, len(data) - len(received))
    assert received == data


async def test_a_receive_that_waits_holds_no_buffer(pki: Pki) -> None:
    """An idle keep-alive connection waits in ``receive_some(read_size)``:
    the read buffer is made when records are there, not while it waits
    (64 KiB per idle connection otherwise)."""
    async with tls_pair(pki, max_read=64 * KiB) as (client, server), trio.open_nursery() as nursery:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            nursery.start_soon(server.receive_some, 64 * KiB)
            await trio.testing.wait_all_tasks_blocked()
            waiting = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert waiting < 16 * KiB
        await client.send_all(b"wake up")


@pytest.mark.parametrize("sent", [100, 40 * KiB, 100 * KiB, 128 * KiB])
async def test_what_a_receive_returns_holds_no_more_than_its_length(pki: Pki, sent: int) -> None:
    """A read that returns less than it asked for (the records there ran
    out) gives back an object of its own length: a pump holds it counted at
    that length, so a larger allocation behind it would be uncounted memory
    (CPython's bytearray keeps its allocation when shrunk by less than
    half). ``sys.getsizeof`` is the object's allocation here."""
    async with tls_pair(pki, max_read=128 * KiB) as (client, server):
        await client.send_all(payload(sent))
        await trio.testing.wait_all_tasks_blocked()
        received = bytearray()
        while len(received) < sent:
            chunk = await server.receive_some(128 * KiB)
            assert sys.getsizeof(chunk) <= len(chunk) + 100
            received += chunk
        assert received == payload(sent)


async def test_send_all_hands_openssl_at_most_max_write_per_call(pki: Pki) -> None:
    """``send_all`` of a megabyte gives OpenSSL slices of at most
    ``max_write``, so a stalled peer holds one slice besides the kernel's
    buffers; the slices add up to the whole."""
    max_write = 40_000
    sizes: list[int] = []
    async with tls_pair(pki, max_write=max_write) as (client, server):
        send = client.ssl_object.send

        def recording_send(data: Any, flags: int = 0) -> int:
            sizes.append(len(data))
            return send(data, flags)

        client.ssl_object.send = recording_send  # type: ignore[method-assign]
        data = payload(1_000_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, data)
            assert await read_exactly(server, len(data)) == data
    assert max(sizes) <= max_write
    assert sum(size for size in sizes) >= len(data)  # retries after a full buffer repeat a slice


async def test_a_peer_that_reads_nothing_stops_send_all(pki: Pki) -> None:
    """A peer that reads nothing: ``send_all`` of 16 MB stops once the
    kernel's buffers are full (what they hold, no more), then finishes
    byte-exact when the peer reads."""
    data = payload(1_000_000) * 16
    async with tls_pair(pki) as (client, server):
        done = trio.Event()

        async def send() -> None:
            await client.send_all(data)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            kernel = client.socket.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF)
            kernel += server.socket.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF)
            assert queued(server) <= kernel
            digest = hashlib.sha256(await read_exactly(server, len(data))).digest()
        assert done.is_set()
    assert digest == hashlib.sha256(data).digest()


# --- EOF, closing, concurrency, cancellation ---------------------------------------------


async def test_eof_without_close_notify_is_eof_and_breaks_sends(pki: Pki) -> None:
    """A peer that closes TCP without close_notify (as ``aclose`` does):
    ``b""``, again ``b""``, and a send fails with BrokenResourceError."""
    async with tls_pair(pki) as (client, server):
        await client.send_all(b"last words")
        await client.aclose()
        assert await read_exactly(server, 10) == b"last words"
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await server.send_all(b"anyone?")


async def test_after_close_notify_the_stream_still_sends(pki: Pki) -> None:
    """A peer's close_notify is EOF, and the other direction still flows
    (a TLS half-close from the peer)."""
    async with tls_pair(pki) as (client, server):
        with suppress(ssl.SSLWantReadError):  # close_notify sent; ours not awaited
            client.ssl_object.unwrap()
        assert await server.receive_some() == b""
        await server.send_all(b"late answer")
        assert await read_exactly(client, 11) == b"late answer"


async def test_calls_after_aclose_raise_closed_resource_error(pki: Pki) -> None:
    async with tls_pair(pki) as (client, _):
        await client.aclose()
        await client.aclose()  # twice is fine
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await client.receive_some()


async def test_concurrent_calls_raise_busy_resource_error(pki: Pki) -> None:
    """A second receiver, or a second sender, while the first waits."""
    async with tls_pair(pki) as (client, server), trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        nursery.start_soon(client.send_all, payload(1_000_000) * 16)
        await trio.testing.wait_all_tasks_blocked()  # the server took one chunk
        with pytest.raises(trio.BusyResourceError):
            await client.send_all(b"x")
        nursery.cancel_scope.cancel()


async def test_a_cancelled_receive_leaves_the_stream_usable_a_cancelled_send_not(
    pki: Pki, autojump_clock: trio.abc.Clock
) -> None:
    """A receive cancelled while it waits took nothing: the next one gets
    the data. A send cancelled half-way may have written part of a record:
    the stream is broken for sends."""
    async with tls_pair(pki) as (client, server):
        with trio.move_on_after(1):
            await server.receive_some()
        await client.send_all(b"after the timeout")
        assert await read_exactly(server, 17) == b"after the timeout"
        with trio.move_on_after(1):
            await client.send_all(payload(1_000_000) * 16)
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")


# --- failures, described as before ---------------------------------------------------------


async def _failed_upstream(pki: Pki, server_pair: tuple[Path, Path], ca: Path) -> BadGateway:
    proxy_side, origin_side = socket_streams()
    origin = SocketTLSStream(origin_side, server_context([server_pair]), server_side=True)
    async with origin, trio.open_nursery() as nursery:
        nursery.start_soon(_ignore_failure, origin.do_handshake)
        with pytest.raises(BadGateway) as caught:
            await open_tls_upstream(
                proxy_side, client_context(ca_file=ca), host="localhost", port=443
            )
    return caught.value


async def _ignore_failure(operation: Callable[[], Any]) -> None:
    with suppress(trio.BrokenResourceError):
        await operation()


async def test_a_certificate_that_does_not_verify_is_described(pki: Pki) -> None:
    """Over a socket the failure reads as over memory BIOs."""
    expired = await _failed_upstream(pki, pki.pair("expired"), pki.ca)
    assert str(expired) == (
        "TLS to localhost:443 failed: certificate verify failed: certificate has expired"
    )
    assert handshake_failure_reason(expired) == "verify_failed"
    stranger = await _failed_upstream(pki, pki.pair("localhost"), pki.other_ca)
    assert "certificate verify failed: unable to get local issuer" in str(stranger)


async def test_plain_http_to_the_tls_side_is_not_tls(pki: Pki) -> None:
    client, server_transport = socket_streams()
    server = SocketTLSStream(
        server_transport, server_context([pki.pair("localhost")]), server_side=True
    )
    async with client, server:
        await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
    assert handshake_failure_reason(caught.value) == "not_tls"
    assert describe_tls_failure(caught.value) == "http request"


async def test_a_peer_that_leaves_during_the_handshake_is_eof(pki: Pki) -> None:
    client, server_transport = socket_streams()
    server = SocketTLSStream(
        server_transport, server_context([pki.pair("localhost")]), server_side=True
    )
    await client.aclose()
    async with server:
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
    assert handshake_failure_reason(caught.value) == "eof"


async def test_an_invalid_server_name_closes_the_socket(pki: Pki) -> None:
    proxy_side, origin_side = socket_streams()
    async with origin_side:
        with pytest.raises(BadGateway, match="invalid server name"):
            await open_tls_upstream(
                proxy_side, client_context(ca_file=pki.ca), host="x" * 64 + ".test", port=443
            )
        assert await origin_side.receive_some() == b""  # closed, not leaked


# --- which class ------------------------------------------------------------------------------


async def test_tls_stream_takes_the_socket_only_from_a_bare_socket_stream(pki: Pki) -> None:
    """A bare ``trio.SocketStream`` gets the socket-backed stream; one with
    bytes put back (``Replayed``) or an in-memory stream gets the BIO one."""
    context = client_context(ca_file=pki.ca)
    left, right = socket_streams()
    async with left, right:
        taken = tls_stream(left, context, server_hostname="a")
        assert isinstance(taken, SocketTLSStream)
        await taken.aclose()
        replayed = Replayed(right, b"\x16\x03")
        assert isinstance(tls_stream(replayed, context, server_hostname="a"), BoundedTLSStream)
    memory, _ = trio.testing.memory_stream_pair()
    assert isinstance(tls_stream(memory, context, server_hostname="a"), BoundedTLSStream)


# --- through the proxy ---------------------------------------------------------------------------


async def test_a_client_that_reads_nothing_bounds_what_a_socket_tls_upstream_gives(
    pki: Pki,
) -> None:
    """Issue #11 point 7 over a real TLS upstream socket (so the upstream
    leg is a ``SocketTLSStream``): a client that reads the head and then
    nothing leaves at most the pump's (N + 2) x read_size held, the origin
    cannot finish, and then everything arrives byte-exact. (So large a body
    goes past h11, in chunks of a third of that bound.)"""
    size = 48_000_000  # more than loopback's socket buffers can hide
    sent = [0]

    async def origin(stream: trio.SocketStream) -> None:
        tls = SocketTLSStream(stream, server_context([pki.pair("localhost")]), server_side=True)
        async with tls:
            conn = h11.Connection(h11.SERVER)
            while conn.next_event() is h11.NEED_DATA:
                conn.receive_data(bytes(await tls.receive_some()))
            await tls.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for start in range(0, size, 1_000_000):
                await tls.send_all(payload(1_000_000))
                sent[0] = start + 1_000_000

    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, origin, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        config = trioproxy.ProxyConfig(
            upstream=f"https://127.0.0.1:{port}", upstream_ca=str(pki.ca), buffer_chunks=3
        )
        meters = ProxyMeters()
        client, proxy_side = trio.testing.lockstep_stream_pair()
        nursery.start_soon(partial(trioproxy.handle_connection, proxy_side, config, meters=meters))
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/", headers=[("Host", "x")])
        await client.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(bytes(await client.receive_some(1024)))
        assert isinstance(event, h11.Response)

        await trio.testing.wait_all_tasks_blocked()
        assert meters.response_bodies.held <= (config.buffer_chunks + 2) * config.read_size
        assert sent[0] < size
        digest = hashlib.sha256()
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await client.receive_some(1 << 20)))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
        assert digest.digest() == hashlib.sha256(payload(1_000_000) * (size // 1_000_000)).digest()
        nursery.cancel_scope.cancel()
