# The origin server the stress suite downloads from and uploads to.
#
# It exists to be a fast, predictable upstream: a proxy's memory problem only shows
# when the upstream is much faster than the client, so the origin must push bytes
# as fast as the socket takes them and spend almost no CPU doing it. Bodies are
# memoryview slices of one preallocated 256 KiB block of the payload pattern
# (_stresskit.SEND_BLOCK); h11's send_with_data_passthrough frames them without a
# copy, so serving 1 GiB is ~4096 send_all calls of ready-made data.
#
# Endpoints (HTTP/1.1, keep-alive, h11 does all parsing and framing):
#   GET /bytes/N        N payload bytes with Content-Length
#   GET /chunked/N      the same N bytes, Transfer-Encoding: chunked
#   GET /small          1 KiB of payload (request-rate benchmarks)
#   POST|PUT /upload    reads the body, optionally at ?rate=BYTES_PER_S with a small
#                       receive buffer (so a slow upstream reader backs up into the
#                       proxy; ?rcvbuf=BYTES sets its size), answers
#                       {"bytes": n, "sha256": hex, "pattern_ok": bool}
#
# Content is a function of the byte offset only; verify with
# _stresskit.PatternVerifier or compare a SHA-256 with expected_sha256(n).
#
# With --tls-cert/--tls-key it speaks TLS (trio.SSLStream): an https:// origin for
# runs through a TLS upstream. Its own TLS buffers are not what is measured.

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import ssl
import sys
import traceback
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from _stresskit import (
    SEND_BLOCK,
    Pacer,
    PatternVerifier,
    expected_sha256,
    parse_host_port,
)

from trioproxy._units import parse_size

__all__ = ["expected_sha256", "main", "serve_origin"]

READ_SIZE = 64 * 1024
"""Bytes per receive_some: one default-sized TCP window's worth."""

SLOW_RCVBUF = 16 * 1024
"""Receive buffer for a rate-limited upload: small, so that when we read slowly the
sender's (the proxy's) send buffer fills soon and its backpressure path is exercised.
Below one loopback MSS (~64 KiB) it makes TCP's silly-window avoidance crawl on a
keep-alive connection reused afterwards (the soak asks for ?rcvbuf=128KiB)."""

SMALL_SIZE = 1024
MAX_BODY = 1 << 40
"""Largest N accepted in /bytes/N: 1 TiB, far beyond any run, just a sanity cap."""

_SEND_VIEW = memoryview(SEND_BLOCK)


class _Reply(Exception):
    """Raised by a route to answer with a short error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _send(stream: trio.abc.Stream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _send_body(stream: trio.abc.Stream, conn: h11.Connection, n: int) -> None:
    """Send n payload bytes as Data events, then EndOfMessage, without copying."""
    sent = 0
    while sent < n:
        view = _SEND_VIEW[: min(n - sent, len(_SEND_VIEW))]
        # h11 frames any bytes-like object (it only takes len() and passes it on);
        # its annotation says bytes, hence the cast.
        pieces = conn.send_with_data_passthrough(h11.Data(data=cast(bytes, view)))
        assert pieces is not None  # None only for ConnectionClosed
        for piece in pieces:
            await stream.send_all(piece)
        sent += len(view)
    await _send(stream, conn, h11.EndOfMessage())


async def _next_event(
    stream: trio.abc.Stream, conn: h11.Connection, pacer: Pacer | None = None
) -> h11.Event | type[h11.PAUSED]:
    """Next h11 event, reading (paced, if a pacer is given) while h11 needs data."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]
        data = await stream.receive_some(READ_SIZE if pacer is None else pacer.burst)
        conn.receive_data(bytes(data))
        if pacer is not None and data:
            await pacer.consume(len(data))


def _parse_n(text: str) -> int:
    try:
        n = parse_size(text)
    except ValueError:
        raise _Reply(400, f"bad size {text!r}") from None
    if n > MAX_BODY:
        raise _Reply(400, f"size {n} over the {MAX_BODY} cap")
    return n


async def _serve_download(
    stream: trio.abc.Stream, conn: h11.Connection, n: int, chunked: bool
) -> None:
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(n))
    headers = [("Content-Type", "application/octet-stream"), framing]
    await _send(stream, conn, h11.Response(status_code=200, headers=headers, reason=b"OK"))
    await _send_body(stream, conn, n)


async def _serve_upload(
    stream: trio.abc.Stream, conn: h11.Connection, query: dict[str, list[str]]
) -> None:
    rate = _parse_n(query["rate"][0]) if "rate" in query else None
    rcvbuf = _parse_n(query["rcvbuf"][0]) if "rcvbuf" in query else SLOW_RCVBUF
    pacer = None
    if rate:
        # Small reads and a small receive window make slowness visible upstream.
        _socket_stream(stream).setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        pacer = Pacer(rate, burst=min(READ_SIZE, max(1024, rate // 20)))
    if conn.they_are_waiting_for_100_continue:
        await _send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
    digest = hashlib.sha256()
    verifier = PatternVerifier()
    while True:
        event = await _next_event(stream, conn, pacer)
        if isinstance(event, h11.Data):
            digest.update(event.data)
            verifier.feed(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise _Reply(400, f"unexpected {type(event).__name__} in upload")
    result = {"bytes": verifier.offset, "sha256": digest.hexdigest(), "pattern_ok": verifier.ok}
    await _send_json(stream, conn, 200, result)


async def _send_json(
    stream: trio.abc.Stream, conn: h11.Connection, status: int, value: Any
) -> None:
    body = json.dumps(value).encode() + b"\n"
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    reason = HTTPStatus(status).phrase.encode()
    await _send(stream, conn, h11.Response(status_code=status, headers=headers, reason=reason))
    await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


async def _drain_request_body(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    while not isinstance(await _next_event(stream, conn), h11.EndOfMessage):
        pass


async def _route(stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request) -> None:
    url = urlsplit(request.target.decode("ascii", "replace"))
    method = request.method.decode("ascii", "replace")
    parts = url.path.strip("/").split("/")
    if method in ("POST", "PUT") and parts == ["upload"]:
        await _serve_upload(stream, conn, parse_qs(url.query))
        return
    await _drain_request_body(stream, conn)
    if method != "GET":
        raise _Reply(405, f"{method} not allowed on {url.path}")
    if len(parts) == 2 and parts[0] in ("bytes", "chunked"):
        await _serve_download(stream, conn, _parse_n(parts[1]), chunked=parts[0] == "chunked")
    elif parts == ["small"]:
        await _serve_download(stream, conn, SMALL_SIZE, chunked=False)
    else:
        raise _Reply(404, f"no route for {url.path}")


Route = Callable[[trio.abc.Stream, h11.Connection, h11.Request], Awaitable[None]]
"""Answers one request. It may leave h11's state short of DONE (a raw reply, a
switched protocol): the connection then closes after it."""


async def _handle_connection(stream: trio.abc.Stream, route: Route) -> None:
    """Serve requests on one connection until either side closes it."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.ConnectionClosed):
            return
        if not isinstance(event, h11.Request):
            raise _Reply(400, f"expected a request, got {type(event).__name__}")
        try:
            await route(stream, conn, event)
        except _Reply as reply:
            if conn.our_state is not h11.SEND_RESPONSE:
                raise
            await _send_json(stream, conn, reply.status, {"error": reply.message})
            return  # the request body may be unread: do not reuse the connection
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


def _socket_stream(stream: trio.abc.Stream) -> trio.SocketStream:
    """The TCP stream under ``stream`` (itself, or under TLS)."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream


async def handle_connection(stream: trio.abc.Stream, route: Route = _route) -> None:
    """Connection handler for trio.serve_tcp; ``route`` answers each request
    (scripts/chaos_origin.py passes its own).

    Error handling: a client that goes away or speaks bad HTTP ends only its own
    connection, quietly; anything unexpected is printed with its traceback and the
    connection closed, so one bad request never takes the origin down mid-run.
    """
    async with stream:
        try:
            await _handle_connection(stream, route)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except _Reply:
            pass
        except Exception:
            traceback.print_exc()


async def serve_origin(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    route: Route = _route,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the origin on host:port until cancelled (``route`` answers each
    request: this module's routes, or scripts/chaos_origin.py's; over TLS with
    ``ssl_context``).

    Reports the bound listeners through task_status (use port 0 and read
    listeners[0].socket.getsockname() for the port).
    """

    async def handler(stream: trio.SocketStream) -> None:
        if ssl_context is None:
            await handle_connection(stream, route)
        else:
            tls = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
            await handle_connection(tls, route)

    await trio.serve_tcp(handler, port, host=host, task_status=task_status)


async def _serve_and_announce(
    host: str, port: int, route: Route, name: str, ssl_context: ssl.SSLContext | None
) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_origin(
                host, port, route=route, ssl_context=ssl_context, task_status=task_status
            )
        )
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        scheme = "http" if ssl_context is None else "https"
        print(
            f"{name} listening on {scheme}://{bound_host}:{bound_port}", file=sys.stderr, flush=True
        )


def main(
    argv: list[str] | None = None,
    *,
    route: Route = _route,
    name: str = "origin",
    description: str = "stress-suite origin server",
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--tls-cert", help="certificate chain (PEM): serve https://")
    parser.add_argument("--tls-key", help="its private key, if not in --tls-cert")
    args = parser.parse_args(argv)
    host, port = parse_host_port(args.listen)
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    try:
        trio.run(_serve_and_announce, host, port, route, name, context)
    except* KeyboardInterrupt:  # Ctrl-C is the normal way to stop (trio may wrap it)
        pass


if __name__ == "__main__":
    main()
