"""Protocol tests of handle_connection on in-memory streams (no sockets).

A test plays both the client (an h11 client on one end of a memory stream)
and the origin (an h11 server on the far end of what the injected connector
hands the proxy), so it sees exactly what each hop received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import attrs
import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._metrics import ProxyMeters

from .helpers import UpstreamPort, pattern, read_h11_message, send_h11_message

FORWARD = trioproxy.ProxyConfig()
REVERSE = trioproxy.ProxyConfig(upstream="http://origin.test:9000")


@attrs.define
class Harness:
    """A running proxy connection with the test on both ends."""

    client: trio.abc.Stream
    client_conn: h11.Connection
    port: UpstreamPort
    meters: ProxyMeters
    finished: trio.Event

    async def request(self, head: h11.Request, body: bytes = b"") -> None:
        await send_h11_message(self.client, self.client_conn, head, body)

    async def response(self) -> tuple[h11.Response, bytes]:
        head, body = await read_h11_message(self.client, self.client_conn)
        assert isinstance(head, h11.Response)
        return head, body

    async def origin(self) -> Origin:
        return Origin(await self.port.accept(), h11.Connection(h11.SERVER))


@attrs.define
class Origin:
    """The far end of one upstream connection, speaking h11 as a server."""

    stream: trio.abc.Stream
    conn: h11.Connection

    async def request(self) -> tuple[h11.Request, bytes]:
        head, body = await read_h11_message(self.stream, self.conn)
        assert isinstance(head, h11.Request)
        return head, body

    async def respond(
        self, status: int = 200, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        fields = headers if headers is not None else [("Content-Length", str(len(body)))]
        response = h11.Response(status_code=status, headers=fields)
        await send_h11_message(self.stream, self.conn, response, body)


@asynccontextmanager
async def proxy_connection(
    config: trioproxy.ProxyConfig = FORWARD, port: UpstreamPort | None = None
) -> AsyncIterator[Harness]:
    client, proxy_side = trio.testing.memory_stream_pair()
    port = port if port is not None else UpstreamPort()
    meters = ProxyMeters()
    finished = trio.Event()

    async def run() -> None:
        await trioproxy.handle_connection(
            proxy_side, config, open_upstream=port.open_upstream, meters=meters
        )
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield Harness(client, h11.Connection(h11.CLIENT), port, meters, finished)
        nursery.cancel_scope.cancel()


def get(target: str, *headers: tuple[str, str], method: str = "GET") -> h11.Request:
    fields = list(headers) or [("Host", "example.com")]
    return h11.Request(method=method, target=target, headers=fields)


def fields(head: h11.Request | h11.Response) -> dict[bytes, list[bytes]]:
    result: dict[bytes, list[bytes]] = {}
    for name, value in head.headers:
        result.setdefault(name, []).append(value)
    return result


async def read_raw_until_close(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


# --- forward and reverse requests -------------------------------------------


async def test_forward_request_goes_to_the_absolute_uri_host() -> None:
    """Forward mode connects to the URI's host:port, sends origin-form with
    Host from the URI, and relays the response with Via added."""
    async with proxy_connection() as proxy:
        await proxy.request(get("http://example.com:8081/p/a%2Fb?x=1%202", ("Host", "other")))
        origin = await proxy.origin()
        request, _ = await origin.request()
        assert proxy.port.connects == [("example.com", 8081)]
        assert request.target == b"/p/a%2Fb?x=1%202"
        assert fields(request)[b"host"] == [b"example.com:8081"]
        assert fields(request)[b"via"] == [b"1.1 trioproxy"]
        await origin.respond(body=b"hello")
        response, body = await proxy.response()
        assert (response.status_code, body) == (200, b"hello")
        assert fields(response)[b"via"] == [b"1.1 trioproxy"]


async def test_forward_mode_refuses_origin_form_with_400() -> None:
    """An origin-form target in forward mode gets 400 with a short text body,
    Content-Length and Connection: close, and nothing is forwarded."""
    async with proxy_connection() as proxy:
        await proxy.request(get("/only-a-path"))
        response, body = await proxy.response()
        assert response.status_code == 400
        assert fields(response)[b"connection"] == [b"close"]
        assert fields(response)[b"content-length"] == [str(len(body)).encode()]
        assert b"absolute URI" in body
        assert proxy.port.connects == []
        await proxy.client.aclose()  # as a client does after Connection: close
        await proxy.finished.wait()


async def test_reverse_mode_keeps_path_and_adds_forwarding_fields() -> None:
    """Reverse mode sends the path and query byte for byte to the fixed
    upstream and adds X-Forwarded-For/-Proto/-Host."""
    async with proxy_connection(REVERSE) as proxy:
        await proxy.request(get("/a%20b/%E2%82%AC?q=%2F&r", ("Host", "public.example")))
        origin = await proxy.origin()
        request, _ = await origin.request()
        assert proxy.port.connects == [("origin.test", 9000)]
        assert request.target == b"/a%20b/%E2%82%AC?q=%2F&r"
        headers = fields(request)
        assert headers[b"host"] == [b"origin.test:9000"]
        assert headers[b"x-forwarded-host"] == [b"public.example"]
        assert headers[b"x-forwarded-proto"] == [b"http"]
        assert b"x-forwarded-for" not in headers  # in-memory streams have no peer address
        await origin.respond(body=b"ok")
        assert (await proxy.response())[1] == b"ok"


async def test_hop_by_hop_fields_are_removed_both_ways() -> None:
    """Connection, the fields it names, Keep-Alive, Proxy-*, TE, Trailer and
    Upgrade never cross the proxy, in either direction."""
    hop = [
        ("Connection", "X-Secret, keep-alive"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic dTpw"),
        ("TE", "trailers"),
        ("Trailer", "X-T"),
        ("Upgrade", "websocket"),
    ]
    async with proxy_connection() as proxy:
        await proxy.request(
            get("http://example.com/", ("Host", "example.com"), *hop, ("X-Keep", "y"))
        )
        origin = await proxy.origin()
        request, _ = await origin.request()
        sent = fields(request)
        for name, _ in hop:
            assert name.lower().encode() not in sent
        assert sent[b"x-keep"] == [b"y"]
        response_hop = [
            ("Content-Length", "2"),
            ("Connection", "X-Internal"),
            ("X-Internal", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X-T"),
            ("X-Public", "z"),
        ]
        await origin.respond(headers=response_hop, body=b"ok")
        response, _ = await proxy.response()
        received = fields(response)
        for dropped in (b"x-internal", b"keep-alive", b"proxy-authenticate", b"trailer"):
            assert dropped not in received
        assert received[b"x-public"] == [b"z"]


# --- bodies and framing ------------------------------------------------------


@pytest.mark.parametrize(
    ("origin_headers", "expected_framing"),
    [
        ([("Content-Length", "300000")], (b"content-length", b"300000")),
        ([("Transfer-Encoding", "chunked")], (b"transfer-encoding", b"chunked")),
        ([], (b"transfer-encoding", b"chunked")),  # close-delimited from the origin
    ],
)
async def test_response_bodies_stream_in_every_framing(
    origin_headers: list[tuple[str, str]], expected_framing: tuple[bytes, bytes]
) -> None:
    """Content-Length, chunked and close-delimited responses arrive byte-exact;
    h11 frames the client's hop itself (chunked for an unknown length)."""
    payload = pattern(300_000)
    async with proxy_connection() as proxy:
        await proxy.request(get("http://example.com/big"))
        origin = await proxy.origin()
        await origin.request()
        if origin_headers:
            await origin.respond(headers=origin_headers, body=payload)
        else:
            await origin.stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
            await origin.stream.aclose()
        response, body = await proxy.response()
        assert body == payload
        name, value = expected_framing
        assert fields(response)[name] == [value]


@pytest.mark.parametrize(
    "framing", [("Content-Length", str(500_000)), ("Transfer-Encoding", "chunked")]
)
async def test_request_bodies_stream_to_the_upstream(framing: tuple[str, str]) -> None:
    """Content-Length and chunked uploads reach the origin byte-exact."""
    payload = pattern(500_000)
    async with proxy_connection(REVERSE) as proxy:
        head = get("/upload", ("Host", "x"), framing, method="POST")
        await proxy.request(head, payload)
        origin = await proxy.origin()
        request, body = await origin.request()
        assert request.method == b"POST"
        assert body == payload
        await origin.respond(body=b"stored")
        assert (await proxy.response())[1] == b"stored"


async def test_keep_alive_after_head_204_and_304() -> None:
    """HEAD, 204 and 304 responses carry no body, and the client connection
    stays usable for the next request."""
    async with proxy_connection(REVERSE) as proxy:
        await proxy.request(get("/h", method="HEAD"))
        origin = await proxy.origin()
        await origin.request()
        await origin.respond(headers=[("Content-Length", "1000")])
        response, body = await proxy.response()
        assert (response.status_code, body) == (200, b"")
        assert fields(response)[b"content-length"] == [b"1000"]
        for status in (204, 304):
            proxy.client_conn.start_next_cycle()
            await proxy.request(get(f"/{status}"))
            origin = await proxy.origin()
            await origin.request()
            await origin.respond(status, headers=[])
            response, body = await proxy.response()
            assert (response.status_code, body) == (status, b"")
        proxy.client_conn.start_next_cycle()
        await proxy.request(get("/last"))
        origin = await proxy.origin()
        await origin.request()
        await origin.respond(body=b"still here")
        assert (await proxy.response())[1] == b"still here"
        assert len(proxy.port.connects) == 4


async def test_http10_client_gets_a_close() -> None:
    """An HTTP/1.0 client is answered and then the connection closes."""
    async with proxy_connection(REVERSE) as proxy:
        await proxy.client.send_all(b"GET /old HTTP/1.0\r\n\r\n")
        origin = await proxy.origin()
        await origin.request()
        await origin.respond(headers=[("Transfer-Encoding", "chunked")], body=b"legacy")
        raw = await read_raw_until_close(proxy.client)
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b"\r\n\r\nlegacy")  # close-delimited for 1.0
        assert b"connection: close" in raw.lower()
        await proxy.finished.wait()


async def test_interim_100_continue_is_forwarded() -> None:
    """A 100 Continue from the upstream reaches an HTTP/1.1 client before the
    final response."""
    async with proxy_connection(REVERSE) as proxy:
        head = get("/u", ("Host", "x"), ("Content-Length", "3"), ("Expect", "100-continue"))
        await proxy.client.send_all(proxy.client_conn.send(head) or b"")
        origin = await proxy.origin()
        await origin.stream.receive_some()  # the head, with Expect
        await origin.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        data = await proxy.client.receive_some()
        assert data.startswith(b"HTTP/1.1 100 ")


# --- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"NOT A REQUEST\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_get_4xx_and_close(raw: bytes, status: int) -> None:
    """h11's error_status_hint decides: 400 for malformed, 431 for an
    oversized head; the response closes the connection and nothing is forwarded."""
    async with proxy_connection() as proxy:
        await proxy.client.send_all(raw)
        response, body = await proxy.response()
        assert response.status_code == status
        assert fields(response)[b"connection"] == [b"close"]
        assert body.startswith(str(status).encode())
        assert proxy.port.connects == []
        await proxy.client.aclose()  # as a client does after Connection: close
        await proxy.finished.wait()


async def test_connect_timeout_is_504_at_the_configured_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream that never connects gets 504 exactly at connect_timeout."""

    async def never_connects(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    config = trioproxy.ProxyConfig(connect_timeout=7.5)
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trioproxy.handle_connection, proxy_side, config, open_upstream=never_connects)
        )
        conn = h11.Connection(h11.CLIENT)
        start = trio.current_time()
        await send_h11_message(client, conn, get("http://slow.example/"))
        response, body = await read_h11_message(client, conn)
        assert isinstance(response, h11.Response)
        assert response.status_code == 504
        assert trio.current_time() - start == 7.5
        assert b"took over 7.5 s" in body


async def test_response_head_timeout_is_504_after_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream that accepts but never answers gets 504 exactly
    upstream_timeout after the request ended."""
    config = trioproxy.ProxyConfig(upstream_timeout=30)
    async with proxy_connection(config) as proxy:
        await proxy.request(get("http://quiet.example/"))
        origin = await proxy.origin()
        await origin.request()
        start = trio.current_time()
        response, _ = await proxy.response()
        assert response.status_code == 504
        assert trio.current_time() - start == 30


async def test_upstream_refusing_or_unresolvable_is_502() -> None:
    """A refused connection (a closed loopback port) and a name that cannot
    resolve (a 70-octet label fails locally) both give 502 with a reason."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    closed_port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    for target in (f"http://127.0.0.1:{closed_port}/", f"http://{'a' * 70}.invalid/"):
        client, proxy_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trioproxy.handle_connection, proxy_side, FORWARD)
            conn = h11.Connection(h11.CLIENT)
            await send_h11_message(client, conn, get(target))
            response, body = await read_h11_message(client, conn)
            assert isinstance(response, h11.Response)
            assert response.status_code == 502
            assert body.startswith(b"502 Bad Gateway: cannot connect")
            await client.aclose()


async def test_upstream_dying_mid_body_aborts_the_client() -> None:
    """When the upstream closes before its Content-Length is complete, the
    client's connection closes with the body short: never framed as complete."""
    async with proxy_connection() as proxy:
        await proxy.request(get("http://example.com/"))
        origin = await proxy.origin()
        await origin.request()
        await origin.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        await origin.stream.send_all(b"x" * 40_000)
        await origin.stream.aclose()
        with pytest.raises(h11.RemoteProtocolError, match=r"incomplete|closed"):
            await proxy.response()
        await proxy.finished.wait()


async def test_chunked_upstream_dying_leaves_the_chunked_body_unterminated() -> None:
    """A chunked response cut by the upstream reaches the client without its
    last chunk, so the client sees the truncation."""
    async with proxy_connection() as proxy:
        await proxy.request(get("http://example.com/"))
        origin = await proxy.origin()
        await origin.request()
        await origin.stream.send_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await origin.stream.aclose()
        with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked"):
            await proxy.response()


async def test_client_leaving_mid_download_closes_the_upstream_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the client goes away mid-body, the origin sees its connection
    closed with no virtual time passing: cancellation reaches the upstream."""
    async with proxy_connection() as proxy:
        await proxy.request(get("http://example.com/"))
        origin = await proxy.origin()
        await origin.request()
        await origin.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
        await origin.stream.send_all(b"x" * 100_000)
        await proxy.client.receive_some(1000)
        left_at = trio.current_time()
        await proxy.client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await origin.stream.send_all(b"y")  # the proxy closed its end
        assert trio.current_time() == left_at
        await proxy.finished.wait()


async def test_a_bug_in_the_connector_never_escapes(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception inside the handler is logged with its
    traceback and ends only that connection; handle_connection returns."""

    async def buggy(host: str, port: int) -> trio.abc.Stream:
        raise RuntimeError("boom")

    client, proxy_side = trio.testing.memory_stream_pair()
    await client.send_all(b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")
    await trioproxy.handle_connection(proxy_side, FORWARD, open_upstream=buggy)
    assert "bug: unexpected error" in caplog.text
    assert await read_raw_until_close(client) == b""
