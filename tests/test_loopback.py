"""Loopback tests: a real origin, the real server, real clients (http.client, curl)."""

from __future__ import annotations

import http.client

import h11
import trio

import trioproxy

from .helpers import serve_origin, start_proxy


async def echo_origin(
    request: h11.Request, body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Answers with the request line and the body length, so tests see what arrived."""
    text = b"%s %s %d" % (request.method, request.target, len(body))
    return 200, [(b"Content-Type", b"text/plain")], text


async def test_forward_get_with_http_client() -> None:
    """A forward GET through the real server reaches the origin with the path byte for byte."""
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, echo_origin)
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig())

        def fetch() -> tuple[int, bytes, str | None]:
            connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
            connection.request("GET", f"http://127.0.0.1:{origin_port}/a%2Fb?q=1%20")
            response = connection.getresponse()
            result = response.status, response.read(), response.getheader("Via")
            connection.close()
            return result

        status, body, via = await trio.to_thread.run_sync(fetch)
        assert (status, body) == (200, b"GET /a%2Fb?q=1%20 0")
        assert via == "1.1 trioproxy"
        nursery.cancel_scope.cancel()
