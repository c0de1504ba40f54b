"""Timeouts on in-memory streams with trio's autojump clock: exact virtual times.

Every test drives ``handle_connection`` through an in-memory client stream and,
where an upstream is needed, the injected ``UpstreamPort`` connector.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import handle_connection
from trioproxy._errors import BadGateway

from .helpers import UpstreamPort, read_h11_message, send_h11_message

CONFIG = trioproxy.ProxyConfig(
    header_timeout=20.0,
    idle_timeout=75.0,
    connect_timeout=10.0,
    upstream_timeout=60.0,
    stall_timeout=120.0,
)
GET = h11.Request(method="GET", target="http://origin.test/file", headers=[("Host", "origin.test")])

# Origins "hang" this long, far beyond every timeout under test, so that a
# broken timeout fails an assertion instead of hanging the test.
NEVER = 10_000.0

Origin = Callable[[trio.abc.Stream, h11.Connection], Awaitable[None]]


async def read_response(
    stream: trio.abc.ReceiveStream, conn: h11.Connection
) -> tuple[h11.Response, bytes]:
    """Read one whole response (head and body) as an h11 client."""
    head, body = await read_h11_message(stream, conn)
    assert isinstance(head, h11.Response)
    return head, body


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def start_proxy(
    nursery: trio.Nursery,
    config: trioproxy.ProxyConfig = CONFIG,
    port: UpstreamPort | None = None,
) -> trio.abc.Stream:
    """Run handle_connection on an in-memory connection; return the client end."""
    client_side, proxy_side = trio.testing.memory_stream_pair()
    connector = (port or UpstreamPort()).open_upstream
    nursery.start_soon(lambda: handle_connection(proxy_side, config, open_upstream=connector))
    return client_side


async def serve_one(port: UpstreamPort, origin: Origin) -> None:
    """Accept one upstream connection and hand it to ``origin`` with an h11 server."""
    stream = await port.accept()
    async with stream:
        await origin(stream, h11.Connection(h11.SERVER))


async def answer_ok(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    await read_h11_message(stream, conn)
    await send_h11_message(
        stream, conn, h11.Response(status_code=200, headers=[("Content-Length", "2")]), b"ok"
    )


async def test_slowloris_head_cut_at_header_deadline(autojump_clock: trio.abc.Clock) -> None:
    """A head trickled one line per second gets 408 + Connection: close exactly
    ``header_timeout`` after its first byte (trickling never extends it), then EOF."""
    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery)
        await trio.sleep(3)  # a new connection's deadline counts from the accept
        started = trio.current_time()

        async def trickle() -> None:
            await client.send_all(b"GET http://origin.test/ HTTP/1.1\r\n")
            for n in range(1000):
                await trio.sleep(1)
                try:
                    await client.send_all(b"X-Slow-%d: y\r\n" % n)
                except trio.BrokenResourceError:
                    return  # the proxy closed the connection
            raise AssertionError("the proxy never closed the connection")

        nursery.start_soon(trickle)
        first = await client.receive_some(65536)
        assert trio.current_time() == 20.0
        assert trio.current_time() - started == 17.0
        response = first + await read_until_eof(client)
        assert response.startswith(b"HTTP/1.1 408 ")
        assert b"\r\nconnection: close\r\n" in response.lower()


async def test_keepalive_head_deadline_counts_from_first_byte(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On a kept-alive connection the head deadline starts at the head's first byte,
    not at the end of the previous exchange (idle time is not head time)."""
    port = UpstreamPort()
    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, port=port)
        nursery.start_soon(serve_one, port, answer_ok)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        response, _ = await read_response(client, conn)
        assert response.status_code == 200
        await trio.sleep(50)  # idle, within idle_timeout
        first_byte_at = trio.current_time()
        await client.send_all(b"G")
        response_bytes = await read_until_eof(client)
        assert trio.current_time() == first_byte_at + 20.0
        assert response_bytes.startswith(b"HTTP/1.1 408 ")


async def test_idle_keepalive_closed_silently(autojump_clock: trio.abc.Clock) -> None:
    """A keep-alive connection with no byte of a new request is closed, without a
    response, exactly ``idle_timeout`` after the previous exchange ended."""
    port = UpstreamPort()
    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, port=port)
        nursery.start_soon(serve_one, port, answer_ok)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        await read_h11_message(client, conn)
        ended = trio.current_time()
        assert await read_until_eof(client) == b""
        assert trio.current_time() == ended + 75.0


async def test_silent_new_connection_closed_at_header_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A new connection that never sends a byte is closed silently after
    ``header_timeout`` (not the longer idle timeout)."""
    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery)
        assert await read_until_eof(client) == b""
        assert trio.current_time() == 20.0


async def test_connect_timeout_gives_504(autojump_clock: trio.abc.Clock) -> None:
    """An upstream that never connects gives 504 exactly ``connect_timeout`` after
    the request head."""

    async def never_connects(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep(NEVER)
        raise BadGateway("gave up")

    async with trio.open_nursery() as nursery:
        client_side, proxy_side = trio.testing.memory_stream_pair()
        nursery.start_soon(
            lambda: handle_connection(proxy_side, CONFIG, open_upstream=never_connects)
        )
        conn = h11.Connection(h11.CLIENT)
        await trio.sleep(1)
        await send_h11_message(client_side, conn, GET)
        response, body = await read_response(client_side, conn)
        assert response.status_code == 504
        assert trio.current_time() == 11.0
        assert b"connecting to origin.test:80" in body


async def test_upstream_head_timeout_counts_from_end_of_request_body(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An origin that reads the request but never answers gives 504 exactly
    ``upstream_timeout`` after the request body's last byte; a slow upload
    (30 s here) does not use up that time."""
    port = UpstreamPort()
    body_done = trio.Event()

    async def silent(stream: trio.abc.Stream, conn: h11.Connection) -> None:
        await read_h11_message(stream, conn)
        body_done.set()
        await trio.sleep(NEVER)

    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, port=port)
        nursery.start_soon(serve_one, port, silent)
        conn = h11.Connection(h11.CLIENT)
        post = h11.Request(
            method="POST",
            target="http://origin.test/up",
            headers=[("Host", "origin.test"), ("Content-Length", "3")],
        )
        await client.send_all(conn.send(post) or b"")
        for _ in range(3):
            await trio.sleep(10)
            await client.send_all(conn.send(h11.Data(data=b"x")) or b"")
        await client.send_all(conn.send(h11.EndOfMessage()) or b"")
        await body_done.wait()
        body_ended = trio.current_time()
        assert body_ended == 30.0
        response, _ = await read_response(client, conn)
        assert response.status_code == 504
        assert trio.current_time() == body_ended + 60.0
        nursery.cancel_scope.cancel()


async def test_stalled_upload_gives_504(autojump_clock: trio.abc.Clock) -> None:
    """A request body that stops moving ends the exchange with 504 exactly
    ``stall_timeout`` after its last byte, before any response head."""
    port = UpstreamPort()

    async def waits(stream: trio.abc.Stream, conn: h11.Connection) -> None:
        await trio.sleep(NEVER)

    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, port=port)
        nursery.start_soon(serve_one, port, waits)
        conn = h11.Connection(h11.CLIENT)
        post = h11.Request(
            method="POST",
            target="http://origin.test/up",
            headers=[("Host", "origin.test"), ("Content-Length", "10")],
        )
        await client.send_all(conn.send(post) or b"")
        await trio.sleep(5)
        await client.send_all(conn.send(h11.Data(data=b"12345")) or b"")
        last_byte = trio.current_time()
        response, body = await read_response(client, conn)
        assert response.status_code == 504
        assert trio.current_time() == last_byte + 120.0
        assert b"no byte moved for 120 s" in body
        nursery.cancel_scope.cancel()


async def test_stalled_download_aborts_client_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A response body that stops moving aborts the client connection (EOF before
    the declared length) exactly ``stall_timeout`` after the last byte moved."""
    port = UpstreamPort()

    async def half_then_silence(stream: trio.abc.Stream, conn: h11.Connection) -> None:
        await read_h11_message(stream, conn)
        head = h11.Response(status_code=200, headers=[("Content-Length", "100")])
        await stream.send_all(conn.send(head) or b"")
        await trio.sleep(7)
        await stream.send_all(conn.send(h11.Data(data=b"a" * 50)) or b"")
        await trio.sleep(NEVER)

    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, port=port)
        nursery.start_soon(serve_one, port, half_then_silence)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        with pytest.raises(h11.RemoteProtocolError):  # EOF inside a Content-Length body
            await read_h11_message(client, conn)
        assert trio.current_time() == 7.0 + 120.0
        nursery.cancel_scope.cancel()


async def test_trickling_body_is_not_a_stall(autojump_clock: trio.abc.Clock) -> None:
    """A body that moves a byte just inside every ``stall_timeout`` completes,
    however long it takes in total (the watchdog sees each byte)."""
    port = UpstreamPort()
    config = attrs.evolve(CONFIG, stall_timeout=10.0)

    async def trickles(stream: trio.abc.Stream, conn: h11.Connection) -> None:
        await read_h11_message(stream, conn)
        head = h11.Response(status_code=200, headers=[("Content-Length", "30")])
        await stream.send_all(conn.send(head) or b"")
        for _ in range(30):
            await trio.sleep(9.5)
            await stream.send_all(conn.send(h11.Data(data=b"z")) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, config, port=port)
        nursery.start_soon(serve_one, port, trickles)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        response, body = await read_response(client, conn)
        assert (response.status_code, body) == (200, b"z" * 30)
        assert trio.current_time() == 30 * 9.5
        nursery.cancel_scope.cancel()


async def test_waiting_for_response_head_is_not_a_stall(autojump_clock: trio.abc.Clock) -> None:
    """Between the request's end and the response head only ``upstream_timeout``
    applies: an origin thinking for 50 s is not cut by a 10 s stall timeout."""
    port = UpstreamPort()
    config = attrs.evolve(CONFIG, stall_timeout=10.0)

    async def thinks(stream: trio.abc.Stream, conn: h11.Connection) -> None:
        await read_h11_message(stream, conn)
        await trio.sleep(50)
        await send_h11_message(
            stream, conn, h11.Response(status_code=200, headers=[("Content-Length", "2")]), b"ok"
        )

    async with trio.open_nursery() as nursery:
        client = start_proxy(nursery, config, port=port)
        nursery.start_soon(serve_one, port, thinks)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        response, body = await read_response(client, conn)
        assert (response.status_code, body) == (200, b"ok")
        assert trio.current_time() == 50.0
        nursery.cancel_scope.cancel()


def test_timeouts_must_be_positive() -> None:
    """Each new timeout rejects zero with a message naming the field."""
    for name in ("header_timeout", "idle_timeout", "stall_timeout"):
        zero: dict[str, Any] = {name: 0.0}
        with pytest.raises(ValueError, match=name):
            trioproxy.ProxyConfig(**zero)


async def test_client_that_reads_nothing_is_cut_at_stall_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client that sends a request and then never reads (slow-read attack)
    cannot hold the connection: even the response head's send is watched,
    and the connection is closed exactly ``stall_timeout`` after the request."""
    port = UpstreamPort()
    async with trio.open_nursery() as nursery:
        client, proxy_side = trio.testing.lockstep_stream_pair()
        connection_done = trio.Event()

        async def proxy() -> None:
            await handle_connection(proxy_side, CONFIG, open_upstream=port.open_upstream)
            connection_done.set()

        async def big_origin(stream: trio.abc.Stream, conn: h11.Connection) -> None:
            await read_h11_message(stream, conn)
            big = h11.Response(status_code=200, headers=[("Content-Length", "10000000")])
            with contextlib.suppress(trio.BrokenResourceError):
                await send_h11_message(stream, conn, big, b"x" * 10_000_000)

        nursery.start_soon(proxy)
        nursery.start_soon(serve_one, port, big_origin)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        request_sent = trio.current_time()
        with trio.move_on_after(NEVER):
            await connection_done.wait()
        assert trio.current_time() == request_sent + 120.0
        nursery.cancel_scope.cancel()
