"""TLS through the whole proxy, on in-memory streams: the bound, the clocks,
the failures, PROXY-then-TLS, tunnels over a TLS leg, a parent proxy.

``handle_connection`` runs with the listener's context (``tls=``) and the
injected ``UpstreamPort`` connector; TLS origins and clients are
``BoundedTLSStream``s (or the hand-driven ``StdlibTLSPeer``) on the other
ends of in-memory pairs, with trustme certificates. No socket is touched.
"""

from __future__ import annotations

import hashlib
import logging
import ssl

import attrs
import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._body import BYPASS_MIN_BODY_FROM_TLS
from trioproxy._metrics import ProxyMeters, render_prometheus
from trioproxy._proxy_protocol import encode_v1
from trioproxy._tls import (
    TLS_RECORD_OVERHEAD,
    TLS_RECORD_SIZE,
    BoundedTLSStream,
    ciphertext_size,
    client_context,
    server_context,
)

from .helpers import (
    UpstreamPort,
    counting_upstream_port,
    pattern,
    read_h11_message,
    send_h11_message,
)
from .tlskit import Pki, StdlibTLSPeer, make_pki, read_exactly

KiB = 1024
SIZE = 2_000_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def reverse_config(pki: Pki, **settings: object) -> trioproxy.ProxyConfig:
    """Reverse mode to ``https://localhost`` trusting our CA, small buffers."""
    return trioproxy.ProxyConfig(
        upstream="https://localhost",
        upstream_ca=str(pki.ca),
        read_size=4096,
        buffer_chunks=3,
        **settings,  # type: ignore[arg-type]
    )


async def tls_origin(port: UpstreamPort, pki: Pki, name: str = "localhost") -> BoundedTLSStream:
    """The next upstream connection, answered as a TLS origin with ``name``'s pair."""
    stream = await port.accept()
    origin = BoundedTLSStream(stream, server_context([pki.pair(name)]), server_side=True)
    await origin.do_handshake()
    return origin


async def tls_client(stream: trio.abc.Stream, pki: Pki) -> BoundedTLSStream:
    client = BoundedTLSStream(stream, client_context(ca_file=pki.ca), server_hostname="localhost")
    await client.do_handshake()
    return client


async def receive_head(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> object:
    """Read only until h11 has a head (nothing of the body is asked for)."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(bytes(await stream.receive_some(1024)))
    return event


async def body_digest(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> bytes:
    digest = hashlib.sha256()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Data):
            digest.update(event.data)
        else:
            assert isinstance(event, h11.EndOfMessage)
            return digest.digest()


# --- the bound -------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [SIZE, BYPASS_MIN_BODY_FROM_TLS + SIZE], ids=["through-h11", "past-h11"]
)
@pytest.mark.parametrize("client_tls", [False, True], ids=["plain-client", "tls-client"])
async def test_a_client_that_reads_nothing_bounds_what_a_tls_upstream_gives(
    pki: Pki, client_tls: bool, size: int
) -> None:
    """A fast TLS upstream and a client that reads the head and then
    nothing: the proxy pulls at most the stated bound of ciphertext, the
    pump's (N + 2) x read_size plus less than two records and one transport
    read held by TLS; then everything arrives byte-exact. On both body
    paths: a body of 4 MiB or more goes past h11."""
    config = reverse_config(pki)
    pump_bound = (config.buffer_chunks + 2) * config.read_size
    port, counted = counting_upstream_port()
    meters = ProxyMeters()
    client_side, proxy_side = trio.testing.lockstep_stream_pair()
    listener = server_context([pki.pair("localhost")]) if client_tls else None
    payload = pattern(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, config, open_upstream=port.open_upstream, meters=meters, tls=listener
            )
        )
        client: trio.abc.Stream = client_side
        if client_tls:
            client = await tls_client(client_side, pki)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(
            client, conn, h11.Request(method="GET", target="/big", headers=[("Host", "x")])
        )
        origin = await tls_origin(port, pki)
        origin_conn = h11.Connection(h11.SERVER)
        await read_h11_message(origin, origin_conn)
        before = counted[0].received  # the handshake and the request's answer so far
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        await origin.send_all(head + payload)  # all of it, encrypted, buffered in memory
        assert isinstance(await receive_head(client, conn), h11.Response)

        await trio.testing.wait_all_tasks_blocked()
        pulled = counted[0].received - before
        records = (pump_bound + len(head)) // TLS_RECORD_SIZE + 2
        tls_terms = (
            records * TLS_RECORD_OVERHEAD + TLS_RECORD_SIZE + ciphertext_size(config.read_size)
        )
        assert pump_bound <= pulled <= pump_bound + len(head) + tls_terms
        assert meters.response_bodies.held <= pump_bound

        assert await body_digest(client, conn) == hashlib.sha256(payload).digest()
        nursery.cancel_scope.cancel()
    assert meters.tls_handshakes == (
        {"client": 1, "upstream": 1} if client_tls else {"upstream": 1}
    )


# --- failures and clocks --------------------------------------------------------------


async def get_through(
    config: trioproxy.ProxyConfig,
    port: UpstreamPort,
    meters: ProxyMeters,
    origin: object,
) -> tuple[int, bytes]:
    """One GET through the proxy while ``origin`` (an async callable) runs."""
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, config, open_upstream=port.open_upstream, meters=meters
            )
        )
        nursery.start_soon(origin)  # type: ignore[arg-type]
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(
            client, conn, h11.Request(method="GET", target="/", headers=[("Host", "x")])
        )
        response, body = await read_h11_message(client, conn)
        assert isinstance(response, h11.Response)
        nursery.cancel_scope.cancel()
    return response.status_code, body


async def test_an_upstream_handshake_past_the_connect_timeout_is_504(
    pki: Pki, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that accepts TCP and never answers the ClientHello: 504 at
    exactly connect_timeout after the connect, counted as a timeout."""
    config = reverse_config(pki, connect_timeout=7.0)
    port, meters = UpstreamPort(), ProxyMeters()
    started = trio.current_time()

    async def silent_origin() -> None:
        await port.accept()
        await trio.sleep_forever()

    with caplog.at_level(logging.INFO, logger="trioproxy.access"):
        status, body = await get_through(config, port, meters, silent_origin)
    assert status == 504
    assert b"the TLS handshake with localhost:443 took over 7 s" in body
    assert trio.current_time() - started == 7.0
    assert meters.tls_handshake_failures == {("upstream", "timeout"): 1}
    assert 'tls=upstream reason="the TLS handshake with localhost:443 took over 7 s"' in caplog.text


async def test_an_upstream_certificate_that_does_not_verify_is_502(pki: Pki) -> None:
    """The stranger CA's view of our origin: 502 with OpenSSL's reason in
    the body (and the log line), counted as verify_failed."""
    config = reverse_config(pki).__class__(
        upstream="https://localhost", upstream_ca=str(pki.other_ca)
    )
    port, meters = UpstreamPort(), ProxyMeters()

    async def origin() -> None:
        stream = await port.accept()
        peer = BoundedTLSStream(stream, server_context([pki.pair("localhost")]), server_side=True)
        with pytest.raises(trio.BrokenResourceError):
            await peer.do_handshake()

    status, body = await get_through(config, port, meters, origin)
    assert (status, body) == (
        502,
        b"502 Bad Gateway: TLS to localhost:443 failed: certificate verify failed: "
        b"unable to get local issuer certificate\n",
    )
    assert meters.tls_handshake_failures == {("upstream", "verify_failed"): 1}
    text = render_prometheus(meters, rss=1)
    assert 'trioproxy_tls_handshake_failures_total{leg="upstream",reason="verify_failed"} 1' in text
    assert 'trioproxy_tls_handshakes_total{leg="client"} 0' in text


async def test_a_stalled_client_handshake_ends_its_connection_at_the_timeout(
    pki: Pki, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that connects to the TLS listener and says nothing: closed
    at exactly tls_handshake_timeout, one access line, counted as timeout."""
    config = trioproxy.ProxyConfig(upstream="http://origin.test", tls_handshake_timeout=4.0)
    meters = ProxyMeters()
    client, proxy_side = trio.testing.memory_stream_pair()
    context = server_context([pki.pair("localhost")])
    with caplog.at_level(logging.INFO, logger="trioproxy.access"):
        await trioproxy.handle_connection(proxy_side, config, meters=meters, tls=context)
    assert trio.current_time() == 4.0
    assert await client.receive_some() == b""  # closed
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert line == (
        "client=- method=- target=- status=- bytes_in=0 bytes_out=0 duration=4.0 upstream=- "
        'tls=client reason="TLS handshake failed: no handshake within 4 s"'
    )
    assert meters.tls_handshake_failures == {("client", "timeout"): 1}
    assert meters.client_connections == 0


# --- PROXY protocol, then TLS -------------------------------------------------------------


async def test_the_proxy_header_comes_before_the_handshake(pki: Pki) -> None:
    """With --proxy-protocol on a TLS listener, the PROXY header is read in
    plain first; the ClientHello that came in the same read is not lost, and
    the header's address reaches the upstream."""
    config = trioproxy.ProxyConfig(
        upstream="http://origin.test", proxy_protocol=True, allow=["0.0.0.0/0"]
    )
    port = UpstreamPort()
    client_side, proxy_side = trio.testing.memory_stream_pair()
    header = encode_v1(("203.0.113.7", 5555), ("192.0.2.1", 443))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side,
                config,
                open_upstream=port.open_upstream,
                client_address="127.0.0.1",
                tls=server_context([pki.pair("localhost")]),
            )
        )
        client = BoundedTLSStream(
            GluedFirstWrite(client_side, header),
            client_context(ca_file=pki.ca),
            server_hostname="localhost",
        )
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(
            client, conn, h11.Request(method="GET", target="/", headers=[("Host", "x")])
        )
        origin = await port.accept()
        request, _ = await read_h11_message(origin, h11.Connection(h11.SERVER))
        fields = dict(request.headers)
        assert fields[b"x-forwarded-for"] == b"203.0.113.7"
        assert fields[b"x-forwarded-proto"] == b"https"
        nursery.cancel_scope.cancel()


@attrs.define
class GluedFirstWrite(trio.abc.Stream):
    """A client transport whose first write (the ClientHello) goes out glued
    behind ``prefix``, in one piece, as a balancer's would."""

    inner: trio.abc.Stream
    prefix: bytes

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(self.prefix + bytes(data))
        self.prefix = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- tunnels over a TLS leg ------------------------------------------------------------------


async def test_connect_over_the_tls_listener_passes_the_clients_close_notify(pki: Pki) -> None:
    """CONNECT through the HTTPS proxy to a plain upstream: bytes flow both
    ways; the client's close_notify reaches the upstream as EOF while the
    other direction keeps flowing; the upstream's close closes the client's
    connection (TCP only: no close_notify is ever sent, see ``_tls``). (The
    other way round, docs: an EOF towards a TLS leg is not
    passed on; ``tests/test_tls.py`` checks it on the tunnel itself.)"""
    config = trioproxy.ProxyConfig(connect_ports="1-65535")
    port = UpstreamPort()
    client_side, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side,
                config,
                open_upstream=port.open_upstream,
                tls=server_context([pki.pair("localhost")]),
            )
        )
        client = StdlibTLSPeer(client_side, client_context(ca_file=pki.ca), "localhost")
        await client.handshake()
        await client.send_all(b"CONNECT origin.test:9 HTTP/1.1\r\nHost: origin.test:9\r\n\r\n")
        answer = await client.receive_some()
        assert answer.startswith(b"HTTP/1.1 200 ")
        upstream = await port.accept()
        await client.send_all(b"ping")
        assert await read_exactly(upstream, 4) == b"ping"
        await client.send_close_notify()
        assert await upstream.receive_some() == b""  # the half-close, passed on
        await upstream.send_all(b"pong after EOF")
        assert await client.receive_some() == b"pong after EOF"
        await upstream.aclose()
        with pytest.raises(ssl.SSLEOFError):  # closed, without close_notify (https_compatible)
            await client.receive_some()
        nursery.cancel_scope.cancel()


# --- an https:// target through a parent proxy ------------------------------------------------


async def test_an_https_target_through_a_parent_goes_in_a_connect_tunnel(pki: Pki) -> None:
    """Forward mode with a parent: ``GET https://localhost/p`` becomes a
    CONNECT to the parent, then our own verified TLS inside the tunnel and
    an origin-form request; the parent never sees the request in clear."""
    config = trioproxy.ProxyConfig(parent_proxy="http://parent.test:3128", upstream_ca=str(pki.ca))
    port = UpstreamPort()
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, config, open_upstream=port.open_upstream
            )
        )
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target="https://localhost/p?q", headers=[("Host", "localhost")]
        )
        await send_h11_message(client, conn, request)
        parent = await port.accept()
        assert port.connects == [("parent.test", 3128)]
        parent_conn = h11.Connection(h11.SERVER)
        connect, _ = await read_h11_message(parent, parent_conn)
        assert isinstance(connect, h11.Request)
        assert (connect.method, connect.target) == (b"CONNECT", b"localhost:443")
        await parent.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        origin = BoundedTLSStream(parent, server_context([pki.pair("localhost")]), server_side=True)
        origin_conn = h11.Connection(h11.SERVER)
        inner, _ = await read_h11_message(origin, origin_conn)
        assert isinstance(inner, h11.Request)
        assert inner.target == b"/p?q"
        response = h11.Response(status_code=200, headers=[("Content-Length", "2")])
        await send_h11_message(origin, origin_conn, response, b"ok")
        head, body = await read_h11_message(client, conn)
        assert isinstance(head, h11.Response)
        assert (head.status_code, body) == (200, b"ok")
        nursery.cancel_scope.cancel()
