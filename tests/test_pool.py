"""The upstream keep-alive pool: what is reused, what never is, and its bounds.

Protocol tests run ``handle_connection`` on in-memory client streams with the
injected ``UpstreamPort`` connector; where the pool must see an origin close
an idle connection, the upstream pair is a socketpair (still no network).
One loopback test runs the real server against a real origin.
"""

from __future__ import annotations

import http.client
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._cli import build_parser, config_from_args
from trioproxy._endpoint import UpstreamEndpoint
from trioproxy._exchange import may_pool
from trioproxy._http import request_has_body
from trioproxy._pool import PooledUpstream, UpstreamPool, looks_closed, open_upstream_pool
from trioproxy._tls import BoundedTLSStream, client_context, server_context

from .helpers import (
    UpstreamPort,
    read_h11_message,
    send_h11_message,
    serve_one,
    socket_stream_pair,
    start_proxy,
    upstream_endpoint_with,
)
from .tlskit import make_pki

REVERSE = trioproxy.ProxyConfig(upstream="http://origin.test:9000")


@attrs.define
class Client:
    """One client connection to the proxy, speaking h11."""

    stream: trio.abc.Stream
    conn: h11.Connection = attrs.Factory(lambda: h11.Connection(h11.CLIENT))

    async def get(self, target: str = "/", method: str = "GET", body: bytes = b"") -> None:
        fields = [("Host", "public.example")]
        if body:
            fields.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=fields)
        await send_h11_message(self.stream, self.conn, request, body)

    async def response(self) -> tuple[int, bytes]:
        head, body = await read_h11_message(self.stream, self.conn)
        assert isinstance(head, h11.Response)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return head.status_code, body


@attrs.define
class Proxy:
    """Client connections into one proxy that share a pool and an upstream port."""

    nursery: trio.Nursery
    port: UpstreamPort
    pool: UpstreamPool

    def connect(self) -> Client:
        client, proxy_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, REVERSE, open_upstream=self.port.open_upstream, pool=self.pool
            )
        )
        return Client(client)


@asynccontextmanager
async def running_proxy(
    port: UpstreamPort | None = None, max_idle: int = 4, idle_timeout: float = 4.0
) -> AsyncIterator[Proxy]:
    async with (
        open_upstream_pool(max_idle=max_idle, idle_timeout=idle_timeout) as pool,
        trio.open_nursery() as nursery,
    ):
        yield Proxy(nursery, port if port is not None else UpstreamPort(), pool)
        nursery.cancel_scope.cancel()


async def test_sequential_requests_reuse_one_upstream_connection() -> None:
    """Three requests, on one client connection and then on another, travel
    on the same upstream connection: one connect in all."""
    async with running_proxy() as proxy:
        origin_conn = h11.Connection(h11.SERVER)
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        assert (await serve_one(origin, origin_conn)).target == b"/1"
        assert await client.response() == (200, b"ok")
        await client.get("/2")
        assert (await serve_one(origin, origin_conn)).target == b"/2"
        assert await client.response() == (200, b"ok")
        other = proxy.connect()
        await other.get("/3")
        assert (await serve_one(origin, origin_conn)).target == b"/3"
        assert await other.response() == (200, b"ok")
        assert proxy.port.connects == [("origin.test", 9000)]
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.pool.idle_count == 1


async def test_connection_close_from_the_origin_is_not_reused() -> None:
    """A response with ``Connection: close`` ends its upstream connection:
    the proxy closes it, and the next request connects anew."""
    async with running_proxy() as proxy:
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        await serve_one(origin, h11.Connection(h11.SERVER), headers=[("Connection", "close")])
        assert await client.response() == (200, b"ok")
        assert await origin.receive_some() == b""  # the proxy closed it
        await client.get("/2")
        second = await proxy.port.accept()
        await serve_one(second, h11.Connection(h11.SERVER))
        assert await client.response() == (200, b"ok")
        assert len(proxy.port.connects) == 2


async def test_a_cut_response_is_not_reused() -> None:
    """An upstream connection whose response did not arrive whole (the origin
    sent half the body) is never pooled; the next client gets a new one."""
    async with running_proxy() as proxy:
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        await read_h11_message(origin, h11.Connection(h11.SERVER))
        await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await origin.send_eof()  # type: ignore[attr-defined]
        with pytest.raises((EOFError, h11.RemoteProtocolError)):
            await client.response()
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.pool.idle_count == 0
        other = proxy.connect()
        await other.get("/2")
        second = await proxy.port.accept()
        await serve_one(second, h11.Connection(h11.SERVER))
        assert await other.response() == (200, b"ok")
        assert len(proxy.port.connects) == 2


async def test_a_connection_the_origin_closed_while_idle_is_not_reused() -> None:
    """An idle socket that became readable (the origin closed it) is dropped
    at checkout: the next request (a POST, which is never retried) connects
    anew and succeeds, no 502."""
    async with running_proxy(UpstreamPort(make_pair=socket_stream_pair)) as proxy:
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        await serve_one(origin, h11.Connection(h11.SERVER))
        assert await client.response() == (200, b"ok")
        await trio.testing.wait_all_tasks_blocked()
        assert proxy.pool.idle_count == 1
        await origin.aclose()
        await client.get("/2", method="POST", body=b"data")  # never retried
        with trio.fail_after(10):  # a guard: without the check, no connect comes
            second = await proxy.port.accept()
        assert (await serve_one(second, h11.Connection(h11.SERVER))).target == b"/2"
        assert await client.response() == (200, b"ok")
        assert len(proxy.port.connects) == 2
        await second.aclose()


async def test_a_get_that_loses_the_race_is_retried_once_on_a_new_connection() -> None:
    """When a reused connection turns out closed only after the request was
    sent (the check cannot see it on in-memory streams), a GET without a
    body is sent again on a new connection; the client sees one 200."""
    async with running_proxy() as proxy:
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        await serve_one(origin, h11.Connection(h11.SERVER))
        assert await client.response() == (200, b"ok")
        await origin.aclose()
        await client.get("/2")
        second = await proxy.port.accept()
        assert (await serve_one(second, h11.Connection(h11.SERVER))).target == b"/2"
        assert await client.response() == (200, b"ok")
        assert len(proxy.port.connects) == 2


async def test_a_post_that_loses_the_race_is_not_retried() -> None:
    """A POST (not idempotent, and its body is gone) on a reused connection
    that the origin closed gets a 502 rather than being sent twice."""
    async with running_proxy() as proxy:
        client = proxy.connect()
        await client.get("/1")
        origin = await proxy.port.accept()
        await serve_one(origin, h11.Connection(h11.SERVER))
        assert await client.response() == (200, b"ok")
        await origin.aclose()
        await client.get("/2", method="POST", body=b"data")
        status, _ = await client.response()
        assert status == 502
        assert len(proxy.port.connects) == 1


async def test_the_pool_keeps_at_most_max_idle_connections() -> None:
    """Three exchanges in flight at once return three connections to a pool
    of two: two stay idle, the oldest returned is closed."""
    async with running_proxy(max_idle=2) as proxy:
        clients = [proxy.connect() for _ in range(3)]
        origins = []
        for client in clients:
            await client.get()
            origins.append(await proxy.port.accept())
        conns = [h11.Connection(h11.SERVER) for _ in origins]
        for origin, conn, client in zip(origins, conns, clients, strict=True):
            await serve_one(origin, conn)
            assert await client.response() == (200, b"ok")
            await trio.testing.wait_all_tasks_blocked()
        assert proxy.pool.idle_count == 2
        assert await origins[0].receive_some() == b""  # evicted: closed by the proxy


async def test_idle_connections_close_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle pooled connection is closed exactly ``idle_timeout`` seconds
    after it went back to the pool, by the reaper, with no request needed."""
    async with running_proxy(idle_timeout=4.0) as proxy:
        client = proxy.connect()
        await client.get()
        origin = await proxy.port.accept()
        await serve_one(origin, h11.Connection(h11.SERVER))
        await client.response()
        await trio.testing.wait_all_tasks_blocked()
        returned = trio.current_time()
        assert proxy.pool.idle_count == 1
        assert await origin.receive_some() == b""
        assert trio.current_time() == returned + 4.0
        assert proxy.pool.idle_count == 0


async def test_cancelling_the_server_closes_every_pooled_connection() -> None:
    """Leaving the pool's block (here by cancellation) closes its idle
    connections and ends its reaper: no descriptor or task is left."""
    port = UpstreamPort()
    with trio.CancelScope() as scope:
        async with running_proxy(port) as proxy:
            clients = [proxy.connect() for _ in range(2)]
            origins = []
            for client in clients:
                await client.get()
                origins.append(await port.accept())
            for origin, client in zip(origins, clients, strict=True):
                await serve_one(origin, h11.Connection(h11.SERVER))
                await client.response()
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.pool.idle_count == 2
            scope.cancel()
    assert proxy.pool.idle_count == 0
    for origin in origins:
        assert await origin.receive_some() == b""
    await proxy.pool.release(
        PooledUpstream(endpoint_on(trio.testing.memory_stream_pair()), "h", 1), reusable=True
    )
    assert proxy.pool.idle_count == 0  # a closed pool keeps nothing


def endpoint_on(pair: tuple[trio.abc.Stream, trio.abc.Stream]) -> UpstreamEndpoint:
    """A fresh upstream endpoint on the first stream of ``pair``."""
    return UpstreamEndpoint(pair[0], read_size=1024, max_head_size=64 * 1024)


async def done_endpoint(
    response_headers: list[tuple[str, str]],
    pair: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> UpstreamEndpoint:
    """An endpoint (on ``pair``'s first stream, else an in-memory one) that went
    through one GET and one response (whose body is "ok")."""
    response = (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(f"{name}: {value}\r\n".encode() for name, value in response_headers)
        + b"\r\nok"
    )
    if pair is None:
        return await upstream_endpoint_with(response, read_all=True)
    await pair[1].send_all(response)
    return await upstream_endpoint_with(b"", stream=pair[0], read_all=True)


async def release(pool: UpstreamPool, endpoint: UpstreamEndpoint, port: int = 1) -> None:
    """Give ``endpoint`` back as an exchange that raised nothing does."""
    await pool.release(PooledUpstream(endpoint, "h", port), reusable=may_pool(endpoint.state()))


def test_request_has_body_follows_the_framing_fields() -> None:
    """No Content-Length nor Transfer-Encoding, or Content-Length 0: no body."""

    def request(*fields: tuple[str, str]) -> h11.Request:
        return h11.Request(method="POST", target="/", headers=[("Host", "a"), *fields])

    assert not request_has_body(request())
    assert not request_has_body(request(("Content-Length", "0")))
    assert request_has_body(request(("Content-Length", "1")))
    assert request_has_body(request(("Transfer-Encoding", "chunked")))


async def test_pool_size_zero_keeps_nothing() -> None:
    """``max_idle=0`` turns pooling off: a released connection is closed."""
    pool = UpstreamPool(max_idle=0)
    await release(pool, await done_endpoint([("Content-Length", "2")]))
    assert pool.idle_count == 0
    assert await pool.checkout("h", 1) is None


async def test_release_checks_h11_states_and_leftover_bytes() -> None:
    """Only DONE/DONE with nothing received past the response is pooled;
    MUST_CLOSE and trailing junk are closed. Checkout matches host and port."""
    pool = UpstreamPool(max_idle=4)
    await release(pool, await done_endpoint([("Connection", "close")]))
    junk = await done_endpoint([("Content-Length", "1")])  # "k" is left over
    await release(pool, junk)
    assert pool.idle_count == 0
    await release(pool, await done_endpoint([("Content-Length", "2")]))
    assert pool.idle_count == 1
    assert await pool.checkout("h", 2) is None
    taken = await pool.checkout("h", 1)
    assert taken is not None
    assert taken.reused
    assert not taken.endpoint.both_done  # a new cycle: h11 IDLE again


async def test_checkout_skips_every_closed_idle_connection() -> None:
    """Checkout closes and drops each idle connection whose origin closed it,
    newest first, and returns the newest live one."""
    pool = UpstreamPool(max_idle=4)
    pairs = [socket_stream_pair() for _ in range(3)]
    for pair in pairs:
        await release(pool, await done_endpoint([("Content-Length", "2")], pair))
    await pairs[1][1].aclose()
    await pairs[2][1].aclose()
    taken = await pool.checkout("h", 1)
    assert taken is not None
    assert taken.endpoint.stream is pairs[0][0]
    assert pool.idle_count == 0
    for proxy_side, _ in pairs[1:]:
        assert isinstance(proxy_side, trio.SocketStream)
        assert proxy_side.socket.fileno() == -1  # closed by the pool
    for stream in (pairs[0][0], pairs[0][1]):
        await stream.aclose()


async def test_tls_and_plain_connections_to_one_address_are_kept_apart() -> None:
    """An https:// and an http:// upstream on the same host and port never
    share a pooled connection: checkout matches TLS-ness too."""
    pool = UpstreamPool(max_idle=4)
    endpoint = await done_endpoint([("Content-Length", "2")])
    await pool.release(PooledUpstream(endpoint, "h", 1, tls=True), reusable=True)
    assert await pool.checkout("h", 1) is None
    assert pool.idle_count == 1
    taken = await pool.checkout("h", 1, tls=True)
    assert taken is not None
    assert taken.tls


async def test_an_idle_tls_connection_the_origin_closed_is_dropped(tmp_path: Path) -> None:
    """The closed check sees through TLS to the socket underneath: an idle
    TLS connection whose origin closed it is not handed out."""
    pki = make_pki(tmp_path)
    pool = UpstreamPool(max_idle=4)
    proxy_side, origin_side = socket_stream_pair()
    origin = BoundedTLSStream(
        origin_side, server_context([pki.pair("localhost")]), server_side=True
    )
    client = BoundedTLSStream(
        proxy_side, client_context(ca_file=pki.ca), server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(origin.do_handshake)
        nursery.start_soon(client.do_handshake)
    await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    endpoint = await upstream_endpoint_with(b"", stream=client, read_all=True)
    await pool.release(PooledUpstream(endpoint, "h", 1, tls=True), reusable=True)
    assert pool.idle_count == 1
    assert not looks_closed(client)
    await origin.aclose()
    assert looks_closed(client)
    assert await pool.checkout("h", 1, tls=True) is None
    assert proxy_side.socket.fileno() == -1  # closed by the pool


def test_cli_pool_flags() -> None:
    """The CLI passes --upstream-pool-size and --upstream-idle-timeout on;
    defaults come from ProxyConfig (32 and 4 s)."""
    parser = build_parser()
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.upstream_pool_size, defaults.upstream_idle_timeout) == (32, 4.0)
    args = ["--upstream-pool-size", "0", "--upstream-idle-timeout", "1.5"]
    config = config_from_args(parser.parse_args(args))
    assert (config.upstream_pool_size, config.upstream_idle_timeout) == (0, 1.5)
    with pytest.raises(ValueError, match="upstream_idle_timeout"):
        trioproxy.ProxyConfig(upstream_idle_timeout=0)


async def test_loopback_keep_alive_requests_share_one_upstream_connection() -> None:
    """With the real server and origin, sequential keep-alive requests use
    one upstream connection; stopping the server closes it."""
    accepted: list[trio.SocketStream] = []
    origin_done = trio.Event()

    async def origin(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                await serve_one(stream, conn, body=b"small")
        except EOFError:
            origin_done.set()

    def three_requests(port: int) -> list[bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        bodies = []
        for _ in range(3):
            connection.request("GET", "/small")
            bodies.append(connection.getresponse().read())
        connection.close()
        return bodies

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, origin, 0, host="127.0.0.1"))
        origin_port = listeners[0].socket.getsockname()[1]
        config = trioproxy.ProxyConfig(upstream=f"http://127.0.0.1:{origin_port}")
        async with trio.open_nursery() as proxy_nursery:
            proxy_port = await start_proxy(proxy_nursery, config)
            bodies = await trio.to_thread.run_sync(three_requests, proxy_port)
            assert bodies == [b"small"] * 3
            assert len(accepted) == 1
            proxy_nursery.cancel_scope.cancel()
        with trio.fail_after(30):  # a bound on a hang, not a timing check
            await origin_done.wait()  # the pooled connection was closed
        nursery.cancel_scope.cancel()


async def closed(origin: trio.abc.ReceiveStream) -> bool:
    """Whether the proxy closed its end: EOF after the request it sent."""
    await origin.receive_some()  # the GET
    return await origin.receive_some() == b""


async def test_each_server_keeps_at_most_max_idle_per_server() -> None:
    """Per server at most ``max_idle_per_server`` idle connections (its
    oldest is closed first), and at most ``max_idle`` over all servers (the
    oldest of all is closed)."""
    pool = UpstreamPool(max_idle=4, max_idle_per_server=2)
    origins = {}
    for name, port in (("a1", 1), ("a2", 1), ("b1", 2), ("a3", 1)):
        pair = trio.testing.memory_stream_pair()
        origins[name] = pair[1]
        await release(pool, await done_endpoint([("Content-Length", "2")], pair), port)
    assert (pool.idle_count, pool.idle_to("h", 1), pool.idle_to("h", 2)) == (3, 2, 1)
    assert await closed(origins["a1"])  # the oldest to server 1
    for name, port in (("c1", 3), ("c2", 3)):
        pair = trio.testing.memory_stream_pair()
        origins[name] = pair[1]
        await release(pool, await done_endpoint([("Content-Length", "2")], pair), port)
    assert pool.idle_count == 4  # the cap over all: the oldest of all (a2) went
    assert await closed(origins["a2"])
    assert (pool.idle_to("h", 1), pool.idle_to("h", 2), pool.idle_to("h", 3)) == (1, 1, 2)


async def test_a_reload_closes_idle_connections_to_removed_servers() -> None:
    """``close_idle_except`` closes the idle connections to servers not in
    the new set, and keeps the others."""
    pool = UpstreamPool(max_idle=8, max_idle_per_server=4)
    far_ends = []
    for port in (1, 2, 2, 3):
        pair = trio.testing.memory_stream_pair()
        far_ends.append(pair[1])
        await release(pool, await done_endpoint([("Content-Length", "2")], pair), port)
    assert await pool.close_idle_except({("h", 1), ("h", 3)}) == 2
    assert (pool.idle_count, pool.idle_to("h", 2)) == (2, 0)
    assert await closed(far_ends[1])
    assert await closed(far_ends[2])
    assert await pool.checkout("h", 1) is not None
