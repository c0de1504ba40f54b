# ============================ A YARDSTICK, NOT A PRODUCT ============================
#
# The floor of trio + h11 for small proxied requests (issue #14): the least a
# reverse relay built on these two libraries must do per request, so that
# trioproxy's per-request CPU can be read as a ratio to it in one benchmark run
# (scripts/bench.py, peer "floor"). It is kept minimal ON PURPOSE; every feature
# added here raises the floor and hides trioproxy's own overhead. Do not grow it,
# and do not deploy it.
#
# What it does, per client connection:
#   * one h11 server Connection, kept alive for as long as both sides allow;
#   * one upstream connection with one h11 client Connection, opened at the
#     first request and reused for the next ones (a "pool" of one), reopened
#     when the upstream's message says it will close;
#   * each message (request, then response) relayed event by event: the bytes h11
#     writes for every event already parsed go out in one send_all, then the next
#     read. Content-Length and chunked bodies are re-framed by h11 on the other
#     side; nothing holds more than one read (READ_SIZE) plus h11's buffer.
#
# What it does not do, on purpose: no policy (headers pass as they are, hop-by-hop
# ones included, so "Connection: close" closes both sides), no timeouts, no log,
# no error responses (any failure drops the client connection), no retry when a
# pooled upstream connection turns out closed, no CONNECT or Upgrade, and the
# request is relayed completely before the response is read (an upstream that
# answers before reading the whole request body can stall it).
#
# --workers N runs N such processes on one port (SO_REUSEPORT, the kernel spreads
# the connections), for the comparison with trioproxy --workers 2 (bench.py peer
# "floor-w2"). It changes nothing per request.
# ====================================================================================

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import h11
import trio
from _stresskit import parse_host_port, parse_http_url

__all__ = ["main", "serve_floor"]

READ_SIZE = 64 * 1024
"""Bytes per receive_some: trio's default and trioproxy's default read size."""

_DROPPED = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError)
"""A peer went away, spoke bad HTTP, or the upstream refused: drop this client only."""


class Peer:
    """One side of the relay: a stream and the h11 Connection that speaks on it."""

    __slots__ = ("conn", "stream")

    def __init__(self, stream: trio.SocketStream, role: type[h11.SERVER] | type[h11.CLIENT]):
        self.stream = stream
        self.conn = h11.Connection(role)

    def reusable(self) -> bool:
        """Both messages complete and neither side asked to close."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


def parsed_event(conn: h11.Connection) -> h11.Event | None:
    """The next event already in `conn`'s buffer, or None if it needs more bytes."""
    event = conn.next_event()
    if isinstance(event, h11.Event):
        return event
    if event is h11.PAUSED:
        raise h11.RemoteProtocolError("switched protocols: not relayed")
    return None


async def next_event(peer: Peer) -> h11.Event:
    """The next event `peer` sends, reading as needed."""
    while (event := parsed_event(peer.conn)) is None:
        peer.conn.receive_data(await peer.stream.receive_some(READ_SIZE))
    return event


async def relay_message(event: h11.Event, src: Peer, dst: Peer) -> None:
    """Send `event` and the rest of its message from `src` to `dst`.

    Memory: the bytes h11 wrote for the events parsed from one read (at most
    READ_SIZE of body plus the heads); they are sent before the next read.
    """
    pending: list[bytes] = []
    while True:
        if isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("peer closed mid-message")
        pending.append(dst.conn.send(event) or b"")
        if isinstance(event, h11.EndOfMessage):
            await dst.stream.send_all(b"".join(pending))
            return
        ready = parsed_event(src.conn)
        if ready is None:
            await dst.stream.send_all(b"".join(pending))
            pending.clear()
            ready = await next_event(src)
        event = ready


async def serve_client(stream: trio.SocketStream, upstream_address: tuple[str, int]) -> None:
    """Relay requests from one client connection until either side closes."""
    client = Peer(stream, h11.SERVER)
    upstream: Peer | None = None
    try:
        while isinstance(request := await next_event(client), h11.Request):
            if upstream is None:
                upstream = Peer(await trio.open_tcp_stream(*upstream_address), h11.CLIENT)
            await relay_message(request, client, upstream)
            await relay_message(await next_event(upstream), upstream, client)
            if not client.reusable():
                return
            client.conn.start_next_cycle()
            if upstream.reusable():
                upstream.conn.start_next_cycle()
            else:
                await upstream.stream.aclose()
                upstream = None
    finally:
        if upstream is not None:
            await upstream.stream.aclose()


def _client_handler(
    upstream_address: tuple[str, int],
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Serve one client connection; any failure just drops it."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(*_DROPPED):
                await serve_client(stream, upstream_address)

    return handler


async def serve_floor(
    upstream_address: tuple[str, int],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the floor relay on host:port until cancelled; reports the listeners."""

    await trio.serve_tcp(
        _client_handler(upstream_address), port, host=host, task_status=task_status
    )


async def serve_floor_shared(upstream_address: tuple[str, int], host: str, port: int) -> None:
    """serve_floor on a port other processes share (SO_REUSEPORT)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)

    print(f"floor listening on http://{host}:{port}", file=sys.stderr, flush=True)
    await trio.serve_listeners(_client_handler(upstream_address), [trio.SocketListener(sock)])


async def _serve_and_announce(upstream_address: tuple[str, int], host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_floor, upstream_address, host, port)
        bound_host, bound_port = listeners[0].socket.getsockname()[:2]
        print(f"floor listening on http://{bound_host}:{bound_port}", file=sys.stderr, flush=True)


def run_workers(workers: int, upstream: str, host: str, port: int) -> None:
    """Run ``workers`` floor processes on one port; announce once all listen."""
    if port == 0:  # pick one port for all of them
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    # SIGTERM (how bench.py stops its peers) must reach the children too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    command = [sys.executable, __file__, "--listen", f"{host}:{port}", "--upstream", upstream]
    children = [
        subprocess.Popen([*command, "--shared-port"], stderr=subprocess.PIPE)
        for _ in range(workers)
    ]
    try:
        for child in children:  # each announces once it listens, and says nothing more
            assert child.stderr is not None
            child.stderr.readline()
        print(f"floor listening on http://{host}:{port}", file=sys.stderr, flush=True)
        for child in children:
            child.wait()
    finally:
        for child in children:
            child.terminate()
            child.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Minimal trio + h11 reverse relay: the per-request floor trioproxy is "
        "measured against (a yardstick, not a product)."
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the origin")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    parser.add_argument("--shared-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    host, port = parse_host_port(args.listen)
    try:
        if args.workers > 1:
            run_workers(args.workers, args.upstream, host, port)
        elif args.shared_port:
            trio.run(serve_floor_shared, parse_http_url(args.upstream), host, port)
        else:
            trio.run(_serve_and_announce, parse_http_url(args.upstream), host, port)
    except* KeyboardInterrupt:  # Ctrl-C is the normal way to stop (trio may wrap it)
        pass


if __name__ == "__main__":
    main()
