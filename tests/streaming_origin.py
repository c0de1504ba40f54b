"""A loopback origin that streams large deterministic bodies and hashes uploads.

Paths (N and M in bytes):
  GET /bytes/N        N bytes, Content-Length
  GET /chunked/N      N bytes, chunked
  GET /close/N        N bytes, close-delimited (HTTP/1.0 style)
  GET /die/N/M        declares Content-Length N, sends M < N bytes, closes
  GET /hang           reads the request, never answers
  POST|PUT /upload    reads the body; answers "LENGTH SHA256HEX"
  POST /reject        answers 413 at once, without reading the body; then
                      half-closes and drains what comes (a lingering close)
  POST /reject-hold   answers 413 at once, then never reads (nor closes)
  anything else       "METHOD TARGET" and the request's fields, one per line

The payload is a 1 MiB block of seeded random bytes, repeated, so serving a
GiB costs memoryview slices, and the client can verify with ``expected_sha256``.
With an ``ssl_context`` the origin speaks TLS (an ``https://`` origin).
"""

from __future__ import annotations

import hashlib
import random
import ssl
from functools import cache

import attrs
import h11
import trio

BLOCK = random.Random(20261125).randbytes(1 << 20)
SEND_SIZE = 256 * 1024


def payload_chunks(size: int) -> list[memoryview]:
    """The payload of ``size`` bytes as slices of BLOCK (no copies)."""
    view = memoryview(BLOCK)
    chunks = []
    offset = 0
    while offset < size:
        start = offset % len(BLOCK)
        length = min(SEND_SIZE, len(BLOCK) - start, size - offset)
        chunks.append(view[start : start + length])
        offset += length
    return chunks


@cache
def expected_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in payload_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


@attrs.define
class OriginLog:
    """What the origin saw: request heads, connections accepted, connections
    that broke, and whether a /hang request is being held."""

    requests: list[h11.Request] = attrs.Factory(list)
    connections: int = 0
    broken: int = 0
    broken_event: trio.Event = attrs.Factory(trio.Event)
    hanging: trio.Event = attrs.Factory(trio.Event)


async def _read_body(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Data):
            digest.update(event.data)
            length += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return length, digest.hexdigest()
        else:
            raise EOFError(repr(event))


async def _respond(
    stream: trio.abc.Stream, conn: h11.Connection, request: h11.Request, log: OriginLog
) -> bool:
    """Answer one request; return False when the connection must end."""
    if request.target in (b"/reject", b"/reject-hold"):
        await _reject_early(stream, conn, drain=request.target == b"/reject")
        return False
    length, digest = await _read_body(stream, conn)
    parts = request.target.decode("ascii", "replace").strip("/").split("/")
    if parts[0] in ("bytes", "chunked", "close", "die"):
        size = int(parts[1])
        sent = int(parts[2]) if parts[0] == "die" else size
        if parts[0] == "close":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for chunk in payload_chunks(sent):
                await stream.send_all(chunk)
            return False
        headers = [("Transfer-Encoding", "chunked")] if parts[0] == "chunked" else []
        headers = headers or [("Content-Length", str(size))]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        if request.method == b"HEAD":
            sent = 0
        for chunk in payload_chunks(sent):
            # Passthrough keeps the memoryview uncopied; h11 only frames it.
            data = h11.Data(data=chunk)  # type: ignore[arg-type]
            for piece in conn.send_with_data_passthrough(data) or []:
                await stream.send_all(piece)
        if parts[0] == "die":
            return False
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        return True
    if parts[0] == "hang":
        log.hanging.set()
        await trio.sleep_forever()
    if parts[0] == "upload":
        body = f"{length} {digest}".encode()
    else:
        lines = [request.method + b" " + request.target]
        lines += [name + b": " + value for name, value in request.headers.raw_items()]
        body = b"\n".join(lines)
    headers = [("Content-Length", str(len(body)))]
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    return True


REJECT_BODY = b"request body too large"


async def _reject_early(stream: trio.abc.Stream, conn: h11.Connection, *, drain: bool) -> None:
    """Answer 413 before reading the body, as servers with a size limit do.

    Then, with ``drain``, half-close and read to the end (closing with unread
    bytes would send a reset, which may destroy the response before the peer
    reads it); without, stop reading and wait, the connection left open.
    """
    headers = [("Content-Length", str(len(REJECT_BODY))), ("Connection", "close")]
    await stream.send_all(conn.send(h11.Response(status_code=413, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=REJECT_BODY)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    if not drain:
        await trio.sleep_forever()
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    await stream.send_eof()
    while await stream.receive_some(65536):
        pass


async def _serve_one(
    raw: trio.SocketStream, log: OriginLog, ssl_context: ssl.SSLContext | None
) -> None:
    conn = h11.Connection(h11.SERVER)
    log.connections += 1
    stream: trio.abc.Stream = raw
    if ssl_context is not None:
        stream = trio.SSLStream(raw, ssl_context, server_side=True, https_compatible=True)
    async with stream:
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                if not isinstance(event, h11.Request):
                    return
                log.requests.append(event)
                if not await _respond(stream, conn, event, log):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError, EOFError):
            log.broken += 1
            log.broken_event.set()


async def serve_streaming_origin(
    log: OriginLog,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on 127.0.0.1 port 0 until cancelled (over TLS with
    ``ssl_context``); reports the port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(
            trio.serve_listeners, lambda s: _serve_one(s, log, ssl_context), listeners
        )
        task_status.started(listeners[0].socket.getsockname()[1])
