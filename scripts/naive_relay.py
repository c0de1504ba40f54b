# ============================== WHAT NOT TO DO ==============================
#
# This is the baseline from the story in docs: a trio reverse relay whose reader
# pushes every chunk into an UNBOUNDED channel (trio.open_memory_channel(math.inf))
# and never waits for the writer. With a fast upstream and a slow client, the whole
# download piles up in this process: a 1 GiB download to a 20 MB/s client makes the
# RSS climb toward 1 GiB, and because the allocator rarely returns freed heap pages
# to the kernel, much of it stays after the client has gone.
#
# It is kept only so the stress suite can show that failure next to trioproxy.
# Do not copy it. The fix is one number: a bounded channel (say 4 slots) makes the
# reader block in send() while the client is behind, and that is backpressure.
#
# Otherwise it is a plain, honest relay so curl and the stress clients can use it:
# h11 on both sides, one upstream connection per request (Connection: close
# upstream), keep-alive towards the client, hop-by-hop headers dropped, framing
# left to h11. Both directions (request body and response) use the unbounded
# channel, so uploads to a slow origin balloon too.
# ============================================================================

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Sequence

import h11
import trio
from _stresskit import parse_host_port, parse_http_url

from trioproxy._units import UNITS_HELP, for_argparse, parse_size

__all__ = ["main", "serve_naive_relay"]

DEFAULT_READ_SIZE = 64 * 1024
"""Bytes per upstream receive_some: the same order as trioproxy's default, so the
comparison is about buffering, not about read sizes."""

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
"""RFC 9110 §7.6.1 connection-specific fields. Transfer-Encoding and Content-Length
are kept: h11 reads them to frame the forwarded message (and re-frames for 1.0)."""

# The channel carries h11 events (Request/Response heads, Data, EndOfMessage).
EventSend = trio.MemorySendChannel[h11.Event]
EventReceive = trio.MemoryReceiveChannel[h11.Event]


def _forward_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | named]


async def _pump_events(
    stream: trio.SocketStream, conn: h11.Connection, out: EventSend, read_size: int
) -> None:
    """Read one message's events from `stream` into `out`, until EndOfMessage.

    THE MISTAKE: out is unbounded and send_nowait never blocks, so this reads as
    fast as the peer sends, however far behind the writer is.
    """
    with out:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(read_size))
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                raise h11.RemoteProtocolError("peer closed mid-message")
            assert isinstance(event, h11.Event)
            out.send_nowait(event)
            if isinstance(event, h11.EndOfMessage):
                return


def _without_hop_by_hop(event: h11.Event) -> h11.Event:
    # The upstream answers "Connection: close" (we asked it to); passed on, that
    # would end the client's keep-alive connection too.
    if isinstance(event, h11.Response):
        headers = _forward_headers(event.headers)
        return h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
    return event


async def _write_events(stream: trio.SocketStream, conn: h11.Connection, src: EventReceive) -> None:
    """Send every event from `src` through `conn` to `stream`."""
    async with src:
        async for event in src:
            data = conn.send(_without_hop_by_hop(event))
            if data:
                await stream.send_all(data)


async def _relay_exchange(
    client: trio.SocketStream,
    client_conn: h11.Connection,
    request: h11.Request,
    upstream: tuple[str, int],
    read_size: int,
) -> None:
    """Relay one request (already read head) and its response."""
    upstream_stream = await trio.open_tcp_stream(*upstream)
    async with upstream_stream:
        upstream_conn = h11.Connection(h11.CLIENT)
        headers = [*_forward_headers(request.headers), (b"connection", b"close")]
        head = h11.Request(method=request.method, target=request.target, headers=headers)
        await upstream_stream.send_all(upstream_conn.send(head) or b"")
        request_send, request_receive = trio.open_memory_channel[h11.Event](math.inf)
        response_send, response_receive = trio.open_memory_channel[h11.Event](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_events, client, client_conn, request_send, read_size)
            nursery.start_soon(_write_events, upstream_stream, upstream_conn, request_receive)
            nursery.start_soon(
                _pump_events, upstream_stream, upstream_conn, response_send, read_size
            )
            nursery.start_soon(_write_events, client, client_conn, response_receive)


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(DEFAULT_READ_SIZE))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None  # ConnectionClosed (or garbage): end of this client


async def _send_error(stream: trio.SocketStream, conn: h11.Connection, status: int) -> None:
    body = b"naive_relay: upstream failed\n"
    headers = [("Content-Length", str(len(body))), ("Connection", "close")]
    for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body)):
        await stream.send_all(conn.send(event) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _serve_client(
    stream: trio.SocketStream, upstream: tuple[str, int], read_size: int
) -> None:
    conn = h11.Connection(h11.SERVER)
    while (request := await _read_request(stream, conn)) is not None:
        upstream_failed = False
        try:
            await _relay_exchange(stream, conn, request, upstream, read_size)
        except* OSError:  # connect refused/unreachable (stream errors are not OSError)
            upstream_failed = True
        if upstream_failed:
            if conn.our_state is h11.SEND_RESPONSE:
                await _send_error(stream, conn, 502)
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


def make_handler(upstream: tuple[str, int], read_size: int = DEFAULT_READ_SIZE) -> _Handler:
    """Return a trio.serve_tcp handler relaying to upstream (HOST, PORT)."""
    return _Handler(upstream, read_size)


class _Handler:
    def __init__(self, upstream: tuple[str, int], read_size: int) -> None:
        self.upstream = upstream
        self.read_size = read_size

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await _serve_client(stream, self.upstream, self.read_size)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                pass  # a peer went away or spoke bad HTTP: drop this connection only
            except* Exception:
                traceback.print_exc()


async def serve_naive_relay(
    upstream: tuple[str, int],
    host: str = "127.0.0.1",
    port: int = 0,
    read_size: int = DEFAULT_READ_SIZE,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the naive relay on host:port until cancelled; reports the listeners."""
    handler = make_handler(upstream, read_size)
    await trio.serve_tcp(handler, port, host=host, task_status=task_status)


async def _serve_and_announce(
    upstream: tuple[str, int], host: str, port: int, read_size: int
) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_naive_relay, upstream, host, port, read_size)
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        print(
            f"naive_relay listening on http://{bound_host}:{bound_port}",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Unbounded-buffer reverse relay: the baseline NOT to imitate.",
        epilog=UNITS_HELP,
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the origin")
    parser.add_argument("--read-size", type=for_argparse(parse_size), default=DEFAULT_READ_SIZE)
    args = parser.parse_args(argv)
    host, port = parse_host_port(args.listen)
    upstream = parse_http_url(args.upstream)
    try:
        trio.run(_serve_and_announce, upstream, host, port, args.read_size)
    except* KeyboardInterrupt:  # Ctrl-C is the normal way to stop (trio may wrap it)
        pass


if __name__ == "__main__":
    main()
