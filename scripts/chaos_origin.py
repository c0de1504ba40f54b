# The origin the soak (scripts/soak.py) runs against: origin.py's verifiable
# payload, plus every way an upstream can misbehave.
#
# Why a separate origin: a proxy is trusted when what it passes on is exactly
# what the origin sent and, when the origin breaks, the client can tell. So
# each route below has one outcome the soak expects at the client (a verified
# body, a status, or a visibly cut body), and the faults are made the way real
# origins fail: a FIN or a RST at the wrong moment, silence past a timeout, a
# Content-Length or chunk size that lies. Faults are written as raw bytes after
# h11 has parsed the request; the connection then closes (origin.py's loop
# closes any connection whose h11 state did not reach DONE).
#
# Routes (N is a size such as 4096 or 1MiB; bodies are the payload pattern):
#   GET|HEAD /bytes/N, /chunked/N   N bytes, Content-Length or chunked
#   GET /close/N                    N bytes, no length: the body ends at our FIN
#   GET /status/204, /status/304    a response without a body
#   POST|PUT /upload[?rate=R]       origin.py's upload check (100-continue too)
#   GET /ws + Upgrade               101, then echo every byte until the peer's
#                                   EOF; bytes that are not the pattern: RST
#   GET /fault/close                FIN before any response
#   GET /fault/reset                RST before any response
#   GET /fault/reset-mid/N?framing=length|chunked|close
#                                   head and N/2 bytes, then RST
#   GET /fault/short/N              Content-Length N, N/2 bytes, then FIN
#   GET /fault/chunk-lie/N          a chunk of size N with N/2 bytes, then FIN
#   GET /fault/long/N               Content-Length N, then N bytes and a whole
#                                   second response nobody asked for, in one
#                                   write (a proxy that reuses this connection
#                                   hands it on)
#   GET /fault/stall-head           no response; wait for the peer to give up
#   GET /fault/stall-body/N         head and N/4 bytes, then silence
#   GET /smuggled                   418, and counted: only a request hidden in
#                                   another's body gets here (soak's smuggling)
#   GET /stats                      {"smuggled": count} as JSON
#
# Every wait is bounded (PEER_WAIT_SECONDS), so a proxy that never gives up on
# a stalled origin costs a task for a while, not for ever.

from __future__ import annotations

import socket
import struct
from urllib.parse import parse_qs, urlsplit

import h11
import origin
import trio
from _stresskit import SEND_BLOCK, PatternVerifier, payload
from origin import (
    READ_SIZE,
    _drain_request_body,
    _next_event,
    _parse_n,
    _Reply,
    _route,
    _send,
    _send_json,
)

PEER_WAIT_SECONDS = 120.0
"""How long a stalled route waits for the proxy to give up and close: far longer
than any proxy timeout the soak sets, short enough to bound a stuck run."""

SMUGGLED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nSMUGGLED RESPONSE"
"""What /fault/long/N sends after its body: a whole response, which a client that
gets it instead of its own sees as a wrong status or a body that is not the pattern."""

_SEND_VIEW = memoryview(SEND_BLOCK)


class Counters:
    """What the soak asks for at the end (one trio thread: no locks)."""

    smuggled = 0


async def _send_pattern(stream: trio.SocketStream, n: int) -> None:
    """Send the first n payload bytes raw (no framing)."""
    sent = 0
    while sent < n:
        view = _SEND_VIEW[: min(n - sent, len(_SEND_VIEW))]
        await stream.send_all(view)
        sent += len(view)


async def _reset(stream: trio.SocketStream) -> None:
    """Close with a RST rather than a FIN (SO_LINGER with a zero timeout)."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _wait_for_peer_to_leave(stream: trio.SocketStream) -> None:
    """Read and discard until the peer closes, for at most PEER_WAIT_SECONDS."""
    with trio.move_on_after(PEER_WAIT_SECONDS):
        try:
            while await stream.receive_some(READ_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _head(framing: str, n: int) -> bytes:
    fields = {
        "length": f"Content-Length: {n}\r\n",
        "chunked": "Transfer-Encoding: chunked\r\n",
        "close": "Connection: close\r\n",
    }
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{fields[framing]}\r\n"
    return head.encode()


async def _fault(stream: trio.SocketStream, kind: str, n: int, query: dict[str, list[str]]) -> None:
    """The faults of the module comment; each leaves h11 short of DONE."""
    if kind == "close":
        await trio.aclose_forcefully(stream)
    elif kind == "reset":
        await _reset(stream)
    elif kind == "reset-mid":
        framing = query.get("framing", ["length"])[0]
        if framing not in ("length", "chunked", "close"):
            raise _Reply(400, f"unknown framing {framing!r}")
        await stream.send_all(_head(framing, n))
        half = n // 2
        if framing == "chunked":
            await stream.send_all(f"{half:x}\r\n".encode())
        await _send_pattern(stream, half)
        await _reset(stream)
    elif kind == "short":
        await stream.send_all(_head("length", n))
        await _send_pattern(stream, n // 2)
        await trio.aclose_forcefully(stream)
    elif kind == "chunk-lie":
        await stream.send_all(_head("chunked", n) + f"{n:x}\r\n".encode())
        await _send_pattern(stream, n // 2)
        await trio.aclose_forcefully(stream)
    elif kind == "stall-head":
        await _wait_for_peer_to_leave(stream)
    elif kind == "stall-body":
        await stream.send_all(_head("length", n))
        await _send_pattern(stream, n // 4)
        await _wait_for_peer_to_leave(stream)
    else:
        raise _Reply(404, f"no fault {kind!r}")


async def _send_too_long(stream: trio.SocketStream, conn: h11.Connection, n: int) -> None:
    """A response of n bytes, then SMUGGLED_RESPONSE, in one write; the
    connection stays open for more requests.

    One write, because then the extra bytes are in the proxy's receive queue
    by the time it can read the body's last byte, and a proxy can tell that
    this connection must not be reused. Written later, they could arrive after
    the proxy has reused it for the next request, and no proxy could tell them
    from that request's response (a soak that sent them in a second write saw
    that happen, now and then, with trioproxy's pool).
    """
    head = conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(n))]))
    body = conn.send(h11.Data(data=payload(0, n)))
    end = conn.send(h11.EndOfMessage())
    await stream.send_all(b"".join([head or b"", body or b"", end or b"", SMUGGLED_RESPONSE]))


async def _serve_echo(stream: trio.SocketStream, conn: h11.Connection) -> None:
    """Switch protocols, then echo until EOF; RST if a byte is not the pattern."""
    if not isinstance(await _next_event(stream, conn), h11.EndOfMessage):
        raise _Reply(400, "an upgrade request must not have a body")
    if conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:  # type: ignore[attr-defined]
        raise _Reply(400, "GET /ws needs Connection: upgrade and Upgrade")
    headers = [("Connection", "upgrade"), ("Upgrade", "websocket")]
    await _send(stream, conn, h11.InformationalResponse(status_code=101, headers=headers))
    verifier = PatternVerifier()
    data = conn.trailing_data[0]
    try:
        while True:
            if data:
                if not verifier.feed(data):
                    await _reset(stream)
                    return
                await stream.send_all(data)
            data = await stream.receive_some(READ_SIZE)
            if not data:
                break
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    await _wait_for_peer_to_leave(stream)


async def chaos_route(
    any_stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request
) -> None:
    """Answer one request (see the module comment); origin.py's routes otherwise.

    Plain TCP only: the faults reset and half-close the socket itself.
    """
    assert isinstance(any_stream, trio.SocketStream), "the chaos origin speaks plain TCP"
    stream = any_stream
    url = urlsplit(request.target.decode("ascii", "replace"))
    parts = url.path.strip("/").split("/")
    method = request.method
    if parts == ["ws"] and method == b"GET":
        await _serve_echo(stream, conn)
        return
    if parts[0] not in ("fault", "close", "status", "smuggled", "stats") and not (
        method == b"HEAD" and parts[0] in ("bytes", "chunked")
    ):
        await _route(stream, conn, request)  # downloads, uploads, 404s
        return
    await _drain_request_body(stream, conn)
    if method not in (b"GET", b"HEAD"):
        raise _Reply(405, f"{method!r} not allowed on {url.path}")
    if method == b"HEAD":
        length = ("Content-Length", str(_parse_n(parts[1]) if len(parts) == 2 else 0))
        await _send(stream, conn, h11.Response(status_code=200, headers=[length]))
        await _send(stream, conn, h11.EndOfMessage())
    elif parts[0] == "fault" and len(parts) in (2, 3):
        n = _parse_n(parts[2]) if len(parts) == 3 else 0
        if parts[1] == "long":
            await _send_too_long(stream, conn, n)
        else:
            await _fault(stream, parts[1], n, parse_qs(url.query))
    elif parts[0] == "close" and len(parts) == 2:
        n = _parse_n(parts[1])
        await stream.send_all(_head("close", n))
        await _send_pattern(stream, n)
        await stream.send_eof()
    elif parts[0] == "status" and parts[1:] in (["204"], ["304"]):
        await _send(stream, conn, h11.Response(status_code=int(parts[1]), headers=[]))
        await _send(stream, conn, h11.EndOfMessage())
    elif parts == ["smuggled"]:
        Counters.smuggled += 1
        raise _Reply(418, "a request that came hidden in another one's body")
    elif parts == ["stats"]:
        await _send_json(stream, conn, 200, {"smuggled": Counters.smuggled})
    else:
        raise _Reply(404, f"no route for {url.path}")


def main(argv: list[str] | None = None) -> None:
    origin.main(
        argv, route=chaos_route, name="chaos origin", description="the soak's misbehaving origin"
    )


__all__ = ["SMUGGLED_RESPONSE", "chaos_route", "main"]

if __name__ == "__main__":
    main()
