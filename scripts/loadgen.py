# A small trio HTTP/1.1 load generator, downloader and origin, for machines
# without wrk, curl or nginx.
#
# bench.py prefers the real tools (wrk measures in C and does not share a GIL
# with anything; nginx serves files with sendfile). When they are missing it
# runs this file as a separate process, so the client's CPU shows up as its own
# process and never inside the sampler's or the proxy's.
#
#   load      N keep-alive connections, each sending GET after GET for
#             --duration seconds; prints one JSON line: requests, req/s, p50
#             and p99 latency (ms), errors, connections opened. A connection
#             the server closes (Connection: close) is reopened and counted.
#   download  one GET, body read and discarded; prints bytes, seconds, bytes/s.
#   origin    serves /small (1 KiB) and /bytes/N (N bytes, streamed) with
#             keep-alive; prints "origin listening on http://HOST:PORT".
#
# Requests are parsed with h11, so a malformed response is an error, not a
# silently miscounted request. Latency is the time from writing the request
# to reading the end of the response, per request, on one connection: with N
# connections it includes queueing in the server, as wrk's does.
#
# --via HOST:PORT sends absolute-form requests ("GET http://origin/small") to
# a forward proxy such as tinyproxy.

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import attrs
import h11
import trio

from trioproxy._units import UNITS_HELP, for_argparse, parse_duration

# Bytes asked of the socket per receive. 64 KiB matches the kernel's default
# socket buffer granularity and keeps h11's buffer small.
RECEIVE_SIZE = 64 * 1024

# The origin's chunk for /bytes/N: large enough that per-chunk Python overhead
# is small next to the copy, small enough to stream (never the whole body).
ORIGIN_CHUNK = 256 * 1024

# Size of /small, the request-rate test's response body.
SMALL_SIZE = 1024

# After a failed connect, wait this long before retrying, so a dead server
# costs errors counted, not a busy loop that steals the server's CPU.
RECONNECT_PAUSE = 0.01


@attrs.define
class LoadStats:
    latencies: list[float] = attrs.field(factory=list)
    errors: int = 0
    non_2xx: int = 0
    connections: int = 0
    closed_by_server: int = 0


@attrs.frozen
class Target:
    """Where to connect and what to put in the request line."""

    host: str
    port: int
    request_target: str
    host_header: str


def parse_target(url: str, via: str | None) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"loadgen: need an http:// URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_header = parts.netloc
    if via is None:
        return Target(parts.hostname, parts.port or 80, path, host_header)
    via_host, _, via_port = via.rpartition(":")
    return Target(via_host, int(via_port), url, host_header)


def _request(target: Target) -> h11.Request:
    return h11.Request(
        method="GET",
        target=target.request_target,
        headers=[("Host", target.host_header), ("User-Agent", "trioproxy-loadgen")],
    )


class ClosedBeforeResponse(Exception):
    """The server closed the connection before a byte of the response arrived."""


async def _read_response(stream: trio.SocketStream, conn: h11.Connection) -> tuple[int, int]:
    """Read one response to its end; return (status, body bytes)."""
    status = 0
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data and status == 0:
                raise ClosedBeforeResponse
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return status, body
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before the response ended")


async def _requests_on_one_connection(target: Target, stats: LoadStats) -> None:
    stream = await trio.open_tcp_stream(target.host, target.port)
    stats.connections += 1
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        completed = 0
        while True:
            started = time.perf_counter()
            try:
                await stream.send_all(conn.send(_request(target)) + conn.send(h11.EndOfMessage()))
                status, _ = await _read_response(stream, conn)
            except (ClosedBeforeResponse, trio.BrokenResourceError):
                if conn.their_state is h11.SEND_RESPONSE and completed:
                    # A server without keep-alive that does not say "Connection:
                    # close" (tinyproxy) closes after each response; like curl,
                    # reopen without calling it an error.
                    stats.closed_by_server += 1
                    return
                raise
            stats.latencies.append(time.perf_counter() - started)
            completed += 1
            if not 200 <= status < 300:
                stats.non_2xx += 1
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # server will close: open a new connection
            conn.start_next_cycle()


async def _keep_requesting(target: Target, stats: LoadStats) -> None:
    while True:
        try:
            await _requests_on_one_connection(target, stats)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, ClosedBeforeResponse):
            stats.errors += 1
            await trio.sleep(RECONNECT_PAUSE)


def percentile_ms(sorted_seconds: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted latencies, in milliseconds."""
    if not sorted_seconds:
        return None
    rank = max(0, min(len(sorted_seconds) - 1, round(q / 100 * len(sorted_seconds)) - 1))
    return sorted_seconds[rank] * 1000


async def run_load(target: Target, connections: int, duration: float) -> dict[str, object]:
    stats = LoadStats()
    started = time.perf_counter()
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(_keep_requesting, target, stats)
    elapsed = time.perf_counter() - started
    latencies = sorted(stats.latencies)
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": percentile_ms(latencies, 50),
        "p99_ms": percentile_ms(latencies, 99),
        "errors": stats.errors,
        "non_2xx": stats.non_2xx,
        "connections_opened": stats.connections,
        "closed_by_server": stats.closed_by_server,
    }


async def run_download(target: Target) -> dict[str, object]:
    started = time.perf_counter()
    stream = await trio.open_tcp_stream(target.host, target.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(_request(target)) + conn.send(h11.EndOfMessage()))
        status, body = await _read_response(stream, conn)
    seconds = time.perf_counter() - started
    return {"status": status, "bytes": body, "seconds": seconds, "bytes_per_s": body / seconds}


# --- origin -----------------------------------------------------------------


def _origin_response(target: bytes) -> tuple[int, int]:
    """Map a request target to (status, body length)."""
    if target == b"/small":
        return 200, SMALL_SIZE
    if target.startswith(b"/bytes/") and target[7:].isdigit():
        return 200, int(target[7:])
    return 404, 0


async def _send_body(stream: trio.SocketStream, conn: h11.Connection, length: int) -> None:
    block = b"x" * ORIGIN_CHUNK
    remaining = length
    while remaining:
        chunk = block if remaining >= ORIGIN_CHUNK else block[:remaining]
        for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or []:
            await stream.send_all(piece)
        remaining -= len(chunk)


async def _respond(stream: trio.SocketStream, conn: h11.Connection, request: h11.Request) -> None:
    status, length = _origin_response(request.target)
    head = h11.Response(
        status_code=status,
        headers=[("Content-Length", str(length)), ("Content-Type", "text/plain")],
    )
    await stream.send_all(conn.send(head) or b"")
    await _send_body(stream, conn, length)
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _serve_origin_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            await _respond(stream, conn, event)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return
        # The request's Data / EndOfMessage need nothing from us.
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()


async def _origin_handler(stream: trio.SocketStream) -> None:
    try:
        await _serve_origin_connection(stream)
    except (trio.BrokenResourceError, h11.ProtocolError, OSError):
        pass  # the client went away; nothing to tell it
    finally:
        await stream.aclose()


async def run_origin(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    bound = listeners[0].socket.getsockname()
    print(f"origin listening on http://{bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await trio.serve_listeners(_origin_handler, listeners)


# --- command line -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__ or "trio HTTP load generator")
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser(
        "load", help="N keep-alive connections for a fixed time", epilog=UNITS_HELP
    )
    load.add_argument("url")
    load.add_argument("--connections", type=int, default=1)
    load.add_argument("--duration", type=for_argparse(parse_duration), default=10.0)
    load.add_argument("--via", help="forward proxy HOST:PORT (absolute-form requests)")
    down = sub.add_parser("download", help="one GET, body discarded")
    down.add_argument("url")
    down.add_argument("--via", help="forward proxy HOST:PORT (absolute-form requests)")
    origin = sub.add_parser("origin", help="serve /small and /bytes/N")
    origin.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)

    if args.command == "origin":
        trio.run(run_origin, args.listen)
        return
    target = parse_target(args.url, args.via)
    if args.command == "load":
        result = trio.run(run_load, target, args.connections, args.duration)
    else:
        result = trio.run(run_download, target)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
