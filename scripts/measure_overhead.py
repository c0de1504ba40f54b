"""Measure trioproxy's RSS per connection, and whether RSS comes back after load.

The memory ceiling of docs/memory.md is ``idle RSS + budget + per-connection
overhead x connections``. The first two are known; this script measures the
third, in the two states a connection spends its life in:

1. idle keep-alive: a client did one request and keeps the connection open;
   the proxy holds a socket, h11 state and a task waiting for the next head.
2. slow download: a client read the response head and then stopped reading;
   the proxy also holds the exchange's tasks, the upstream connection and the
   pump's buffers. Buffered payload bytes (from the proxy's /debug/memory) are
   subtracted, so what is left is the overhead *beyond* buffers.

Between phases it also runs a few fast downloads (a load), and at the end it
closes everything and samples RSS for ``--settle`` seconds, to show whether RSS
returns to its pre-load value (docs/memory.md, "After a load").

Everything runs against a local origin (scripts/origin.py) on 127.0.0.1 and a
trioproxy child process in reverse mode; both are stopped at the end. Every
phase has a deadline (``--max-seconds`` in total). RLIMIT_NOFILE is raised to
the hard limit, since each connection costs the proxy one or two descriptors.

With ``--tls`` the proxy's listener speaks TLS and every client connection is
a TLS one (the per-connection figures then include the proxy's TLS state);
with ``--tls-upstream`` the origin speaks TLS and the proxy reaches it over
verified TLS. The certificate is a throwaway self-signed one (``_certs``).

    python scripts/measure_overhead.py --idle 1000 --slow 100
    python scripts/measure_overhead.py --idle 5000 --slow 0 --fast 0
    python scripts/measure_overhead.py --tls --idle 1000 --slow 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import trio
from _certs import Certs, self_signed
from _stresskit import parse_http_url
from stress import Child, rss_of, start_child, stop_child

from trioproxy._units import UNITS_HELP, for_argparse, format_size, parse_duration, parse_size

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent

CONNECT_CONCURRENCY = 64
"""Connections opened at once: enough to open thousands in seconds, few enough
not to overflow the proxy's listen backlog (SYNs dropped cost 1 s retries)."""

SLOW_BODY = 1 << 30
"""Size of a slow download's body: far more than any buffer, never finished."""

SETTLE_SECONDS = 2.0
"""Wait after a phase before reading RSS, so the proxy has stopped moving."""


async def connect(
    proxy: tuple[str, int], tls: ssl.SSLContext | None, rcvbuf: int | None = None
) -> trio.abc.Stream:
    """A connection to the proxy: TCP (``SO_RCVBUF`` set first if given),
    and TLS over it when ``tls`` is a client context."""
    stream = await trio.open_tcp_stream(*proxy)
    if rcvbuf is not None:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if tls is None:
        return stream
    tls_stream = trio.SSLStream(stream, tls, server_hostname="localhost", https_compatible=True)
    await tls_stream.do_handshake()
    return tls_stream


async def request(stream: trio.abc.Stream, conn: h11.Connection, path: str) -> None:
    data = conn.send(h11.Request(method="GET", target=path, headers=[("Host", "origin")]))
    await stream.send_all((data or b"") + (conn.send(h11.EndOfMessage()) or b""))


async def next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(bytes(await stream.receive_some(65536)))
    return event


async def read_response(stream: trio.abc.Stream, conn: h11.Connection) -> int:
    """Read a whole response; return the body's length."""
    length = 0
    while not isinstance(event := await next_event(stream, conn), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            length += len(event.data)
        elif not isinstance(event, h11.Response):
            raise RuntimeError(f"unexpected {event!r}")
    return length


async def open_idle(
    proxy: tuple[str, int], tls: ssl.SSLContext | None, streams: list[trio.abc.Stream]
) -> None:
    """One request, fully read; then the connection stays open, idle."""
    stream = await connect(proxy, tls)
    streams.append(stream)
    conn = h11.Connection(h11.CLIENT)
    await request(stream, conn, "/small")
    await read_response(stream, conn)


async def open_slow(
    proxy: tuple[str, int], tls: ssl.SSLContext | None, streams: list[trio.abc.Stream]
) -> None:
    """A huge download whose client reads the head and then nothing more."""
    stream = await connect(proxy, tls, rcvbuf=16 * 1024)
    streams.append(stream)
    conn = h11.Connection(h11.CLIENT)
    await request(stream, conn, f"/bytes/{SLOW_BODY}")
    event = await next_event(stream, conn)
    if not isinstance(event, h11.Response) or event.status_code != 200:
        raise RuntimeError(f"expected 200, got {event!r}")


async def fast_download(proxy: tuple[str, int], tls: ssl.SSLContext | None, size: int) -> None:
    async with await connect(proxy, tls) as stream:
        conn = h11.Connection(h11.CLIENT)
        await request(stream, conn, f"/bytes/{size}")
        got = await read_response(stream, conn)
        if got != size:
            raise RuntimeError(f"fast download got {got} of {size} bytes")


async def run_many(count: int, start: Callable[[], Awaitable[None]]) -> None:
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def one() -> None:
        async with limiter:
            await start()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def debug_memory(address: tuple[str, int]) -> dict[str, Any]:
    async with await trio.open_tcp_stream(*address) as stream:
        conn = h11.Connection(h11.CLIENT)
        await request(stream, conn, "/debug/memory")
        body = b""
        while not isinstance(event := await next_event(stream, conn), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += event.data
        report: dict[str, Any] = json.loads(body)
        return report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tls_arguments(certs: Certs | None, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The origin's and the proxy's extra arguments for ``--tls`` and
    ``--tls-upstream``."""
    if certs is None:
        return [], []
    pair = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    origin = pair if args.tls_upstream else []
    proxy = pair if args.tls else []
    if args.tls_upstream:
        proxy = [*proxy, "--upstream-ca", str(certs.cert)]
    return origin, proxy


async def start_processes(
    nursery: trio.Nursery, args: argparse.Namespace, certs: Certs | None
) -> list[Child]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    origin_tls, proxy_tls = tls_arguments(certs, args)
    origin = await start_child(
        nursery,
        "origin",
        [sys.executable, str(SCRIPTS_DIR / "origin.py"), "--listen", "127.0.0.1:0", *origin_tls],
    )
    argv = [
        *shlex.split(args.proxy_command),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        origin.url,
        "--metrics",
        f"127.0.0.1:{args.metrics_port}",
        *proxy_tls,
        *shlex.split(args.proxy_args),
    ]
    try:
        proxy = await start_child(nursery, "trioproxy", argv, env=env)
    except BaseException:
        await stop_child(origin)
        raise
    return [origin, proxy]


class Report:
    """RSS readings of the proxy, printed as they come."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.figures: dict[str, Any] = {}

    def rss(self) -> int:
        value = rss_of(self.pid)
        if value is None:
            raise RuntimeError("the proxy is gone")
        return value

    def note(self, key: str, value: Any, text: str) -> None:
        self.figures[key] = value
        print(f"{key:<34} {text}", flush=True)


async def measure(
    args: argparse.Namespace, proxy: Child, report: Report, tls: ssl.SSLContext | None
) -> None:
    address = parse_http_url(proxy.url)
    metrics = ("127.0.0.1", args.metrics_port)
    idle_streams: list[trio.abc.Stream] = []
    slow_streams: list[trio.abc.Stream] = []
    # The proxy imports psutil on its first /debug/memory scrape (~1 MiB of
    # RSS, once); scrape before the idle reading so that the one-time import
    # is not counted as memory the load left behind.
    await debug_memory(metrics)
    await trio.sleep(SETTLE_SECONDS)
    before = report.rss()
    report.note("rss_idle_bytes", before, format_size(before))
    try:
        if args.idle:
            await run_many(args.idle, lambda: open_idle(address, tls, idle_streams))
            await trio.sleep(SETTLE_SECONDS)
            rss = report.rss()
            per = (rss - before) / args.idle
            report.note("rss_with_idle_bytes", rss, f"{format_size(rss)} with {args.idle} idle")
            report.note("overhead_per_idle_connection", per, format_size(per))
            started = time.monotonic()
            await fast_download(address, tls, 1024)
            latency = time.monotonic() - started
            report.note("new_request_seconds", latency, f"{latency * 1000:.1f} ms")
        base = report.rss()
        if args.fast:
            size = args.fast_bytes
            await run_many(args.fast, lambda: fast_download(address, tls, size))
            await trio.sleep(SETTLE_SECONDS)
            rss = report.rss()
            report.note(
                "rss_after_fast_bytes",
                rss,
                f"{format_size(rss)} after {args.fast} x {format_size(size)}",
            )
        if args.slow:
            base = report.rss()
            await run_many(args.slow, lambda: open_slow(address, tls, slow_streams))
            await trio.sleep(SETTLE_SECONDS)
            rss = report.rss()
            memory = await debug_memory(metrics)
            buffered = memory["buffered_bytes"]["total"]
            per = (rss - base - buffered) / args.slow
            report.note("rss_with_slow_bytes", rss, f"{format_size(rss)} with {args.slow} slow")
            report.note("buffered_bytes", buffered, format_size(buffered))
            report.note("overhead_per_slow_connection", per, f"{format_size(per)} beyond buffers")
    finally:
        for stream in idle_streams + slow_streams:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await trio.aclose_forcefully(stream)
    for second in range(1, args.settle + 1):
        await trio.sleep(1)
        rss = report.rss()
        print(f"  {second} s after closing: {format_size(rss)}", flush=True)
    memory = await debug_memory(metrics)
    report.note("connections_after_load", memory["connections"], str(memory["connections"]))
    report.note("rss_after_load_bytes", rss, format_size(rss))
    report.note("rss_after_minus_idle_bytes", rss - before, format_size(rss - before))


async def main_async(args: argparse.Namespace, certs: Certs | None) -> dict[str, Any]:
    tls = None
    if args.tls and certs is not None:
        tls = ssl.create_default_context(cafile=str(certs.cert))
    async with trio.open_nursery() as nursery:
        origin, proxy = await start_processes(nursery, args, certs)
        report = Report(proxy.process.pid)
        try:
            with trio.fail_after(args.max_seconds):
                await measure(args, proxy, report, tls)
        finally:
            await stop_child(proxy)
            await stop_child(origin)
        nursery.cancel_scope.cancel()
    return report.figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=UNITS_HELP)
    parser.add_argument("--idle", type=int, default=500, help="idle keep-alive connections")
    parser.add_argument("--slow", type=int, default=100, help="stalled slow downloads")
    parser.add_argument("--fast", type=int, default=10, help="fast downloads (the load)")
    parser.add_argument("--fast-bytes", type=for_argparse(parse_size), default=parse_size("50MiB"))
    parser.add_argument("--settle", type=int, default=5, help="seconds sampled after closing")
    parser.add_argument(
        "--max-seconds", type=for_argparse(parse_duration), default=120.0, help="bound on the run"
    )
    parser.add_argument(
        "--proxy-command",
        default=f"{shlex.quote(sys.executable)} -m trioproxy",
        help="how to start the proxy (for A/B runs of variants)",
    )
    parser.add_argument("--proxy-args", default="", help="extra arguments for the proxy")
    parser.add_argument("--tls", action="store_true", help="clients reach the proxy over TLS")
    parser.add_argument(
        "--tls-upstream", action="store_true", help="the proxy reaches the origin over TLS"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.metrics_port = free_port()
    limit = raise_fd_limit()
    if args.idle + 2 * args.slow + 100 > limit:
        sys.exit(f"RLIMIT_NOFILE is {limit}: too low for {args.idle} + {args.slow} connections")
    with tempfile.TemporaryDirectory(prefix="trioproxy-certs-") as directory:
        certs = self_signed(Path(directory)) if args.tls or args.tls_upstream else None
        figures = trio.run(main_async, args, certs)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
