# One command to show whether a proxy's memory stays bounded under slow clients.
#
# Why it exists: the failure trioproxy is built against (DESIGN.md, "The problem
# it exists for") is invisible in functional tests. It only shows as RSS that
# grows with the size of a download while a client reads slowly, and stays high
# after the client leaves. This script reproduces that situation end to end and
# records the RSS of the proxy process (plus its children) every 0.25 s:
#
#   1. start scripts/origin.py (fast upstream, verifiable payload);
#   2. for each proxy in turn (trioproxy, the naive relay, an already running
#      proxy given by URL, or "direct" to measure the harness itself): start it,
#      sample its idle RSS, run K clients that each download (or upload) N bytes
#      at R bytes/s, verify every byte, wait a few seconds, sample again, stop it;
#   3. write a CSV of samples, a JSON summary, a PNG of RSS over time (one line
#      per proxy, when matplotlib is installed), and print a summary table.
#
# Slow clients are trio tasks in this process: raw trio sockets with a small
# SO_RCVBUF set before connect (so the TCP window, not a local buffer, carries the
# slowness back to the proxy), an h11 client, a token-bucket Pacer after every
# read, and a streaming PatternVerifier (memcmp against the 64 KiB pattern).
# One client at 20 MB/s costs a few percent of a core; a few hundred clients at
# 1 MB/s each are fine.
#
# --tls makes the clients reach trioproxy over TLS (its listener gets a throwaway
# self-signed certificate, scripts/_certs.py); --tls-upstream makes the origin speak
# TLS and trioproxy reach it over verified TLS. The clients' own TLS costs this
# process CPU (count ~1.5x a plain client), never the proxy's RSS.
#
# Everything is bounded: the load phase by --max-seconds, the bytes by K x N,
# each startup and shutdown by a timeout. Processes we start are stopped by PID
# (terminate, then kill after a grace period), with any children they spawned.
# Figures are printed, never asserted: timing on a shared machine is not a test.

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import psutil
import trio
from _certs import Certs, self_signed
from _stresskit import (
    SEND_BLOCK,
    Pacer,
    PatternVerifier,
    expected_sha256,
    parse_http_url,
)

from trioproxy._units import UNITS_HELP, for_argparse, format_size, parse_duration, parse_size

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent

SAMPLE_INTERVAL = 0.25
"""Seconds between RSS samples: fine enough to see a 20 MB/s ramp (5 MB a step),
coarse enough that psutil's /proc reads cost nothing measurable."""

READY_TIMEOUT = 30.0
"""Seconds a child gets to print its 'listening on' line. Python start-up on a
busy 2-core machine can take a few seconds; 30 is generous and still bounded."""

STOP_GRACE = 3.0
"""Seconds between terminate and kill when stopping a child."""

CLIENT_READ_SIZE = 64 * 1024
"""Bytes per client receive_some; also the pacer's burst. At 20 MB/s that is ~300
reads per second, so one client costs little CPU in this process."""

DEFAULT_RCVBUF = 64 * 1024
"""Client SO_RCVBUF (Linux doubles it). Small, so a slow reader's window closes
soon and the proxy must hold or stop reading; the default would autotune to MBs."""

MAX_ERRORS_KEPT = 20
"""Distinct client errors kept for the summary; the rest are only counted."""

READY_RE = re.compile(r"listening on (https?://\S+)")
PROXY_KINDS = ("trioproxy", "naive", "direct")
PHASES = ("idle", "load", "settle", "after")


# ---------------------------------------------------------------- data records


@attrs.frozen
class Target:
    """One proxy to measure: how to start it (kind) or where it already runs."""

    name: str
    kind: str  # "trioproxy" | "naive" | "direct" | "url"
    url: str | None = None
    pid: int | None = None


@attrs.define
class LoadStats:
    """Counters the clients update and the sampler reads (one trio thread: no locks)."""

    clients: int
    bytes_moved: int = 0
    bytes_delivered: int = 0
    bytes_verified: int = 0
    clients_done: int = 0
    clients_ok: int = 0
    error_count: int = 0
    errors: list[str] = attrs.Factory(list)

    def record_error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT and message not in self.errors:
            self.errors.append(message)


@attrs.frozen
class Sample:
    proxy: str
    t: float
    phase: str
    rss: int | None
    bytes_moved: int
    clients_done: int


@attrs.frozen
class Summary:
    proxy: str
    idle_rss: int | None
    peak_rss: int | None
    growth: int | None
    rss_after: int | None
    settle_seconds: float
    bytes_expected: int
    bytes_delivered: int
    bytes_verified: int
    clients: int
    clients_ok: int
    load_seconds: float
    throughput_mb_s: float
    timed_out: bool
    harness_cpu: float
    error_count: int
    errors: list[str]


@attrs.frozen
class LoadSpec:
    """What every client does: download (or upload) `size` bytes at `rate`."""

    clients: int
    size: int
    rate: int
    upload: bool
    chunked: bool
    rcvbuf: int
    tls: ssl.SSLContext | None = None  # the clients speak TLS, trusting this


# ---------------------------------------------------------------- child processes


@attrs.define
class Child:
    name: str
    process: trio.Process
    url: str


def _tty() -> bool:
    return sys.stderr.isatty()


def _log(message: str) -> None:
    prefix = "\r\x1b[K" if _tty() else ""  # clear the progress line first
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


async def _read_ready_line(name: str, stream: trio.abc.ReceiveStream) -> tuple[str, bytes]:
    """Read the child's stderr until 'listening on URL'; return URL and leftover bytes."""
    buffer = b""
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError(f"{name} exited before announcing its address")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            match = READY_RE.search(text)
            if match:
                return match.group(1), buffer
            _log(f"[{name}] {text}")


LineHook = Callable[[str], bool]
"""Sees each stderr line of a child after its 'listening on' line; returns
whether the line should still be copied to our stderr."""


async def _forward_stderr(
    name: str, stream: trio.abc.ReceiveStream, pending: bytes, on_line: LineHook | None
) -> None:
    """Copy the rest of a child's stderr to ours, line by line, with its name
    (the lines ``on_line`` lets through, if given)."""

    def forward(line: bytes) -> None:
        text = line.decode(errors="replace")
        if on_line is None or on_line(text):
            _log(f"[{name}] {text}")

    buffer = pending
    async with stream:
        while chunk := await stream.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                forward(line)
    if buffer:
        forward(buffer)


async def start_child(
    nursery: trio.Nursery,
    name: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    *,
    on_line: LineHook | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> Child:
    """Start argv, wait for its 'listening on' line, forward its stderr.

    ``on_line`` sees every later line of its stderr (see LineHook);
    ``preexec_fn`` runs in the child before it executes argv (as for Popen).

    Resource handling: on any failure before the child is announced, the child is
    stopped here; afterwards the caller owns it and must call stop_child.
    """
    _log(f"starting {name}: {shlex.join(argv)}")
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=preexec_fn,
    )
    assert process.stderr is not None
    try:
        with trio.fail_after(READY_TIMEOUT):
            url, pending = await _read_ready_line(name, process.stderr)
    except BaseException:
        await _stop_process(process)
        raise
    nursery.start_soon(_forward_stderr, name, process.stderr, pending, on_line)
    return Child(name, process, url)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


async def _stop_process(process: trio.Process) -> None:
    """Terminate, then kill, one process we started, and any children it left."""
    with trio.CancelScope(shield=True):
        descendants = _descendants(process.pid)
        for signal_it in (process.terminate, process.kill):
            if process.returncode is not None:
                break
            signal_it()
            with trio.move_on_after(STOP_GRACE):
                await process.wait()
        for child in descendants:  # psutil checks the PID still names that process
            with contextlib.suppress(psutil.Error):
                child.kill()


async def stop_child(child: Child) -> None:
    await _stop_process(child.process)
    _log(f"stopped {child.name} (pid {child.process.pid}, exit {child.process.returncode})")


def rss_of(pid: int | None) -> int | None:
    """RSS in bytes of pid plus all its descendants, or None if unknown/gone."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        total = int(root.memory_info().rss)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += int(child.memory_info().rss)
        return total
    except psutil.Error:
        return None


# ---------------------------------------------------------------- clients


async def _connect(url: str, spec: LoadSpec) -> trio.abc.Stream:
    """TCP connection with SO_RCVBUF set before connect, so the window stays
    small; TLS over it with ``spec.tls``."""
    stream = await _connect_tcp(url, spec.rcvbuf)
    if spec.tls is None:
        return stream
    tls = trio.SSLStream(stream, spec.tls, server_hostname="localhost", https_compatible=True)
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return tls


async def _connect_tcp(url: str, rcvbuf: int) -> trio.SocketStream:
    host, port = parse_http_url(url)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _host_header(url: str) -> str:
    host, port = parse_http_url(url)
    return f"{host}:{port}"


async def _next_event(
    stream: trio.abc.Stream, conn: h11.Connection, pacer: Pacer | None
) -> h11.Event:
    """Next h11 event; reads (paced) while h11 needs data."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(CLIENT_READ_SIZE)
            conn.receive_data(bytes(data))
            if data and pacer is not None:
                await pacer.consume(len(data))
            continue
        if event is h11.PAUSED:
            raise h11.RemoteProtocolError("unexpected PAUSED")
        assert isinstance(event, h11.Event)
        return event


async def _expect_ok(
    stream: trio.abc.Stream, conn: h11.Connection, pacer: Pacer | None
) -> h11.Response:
    event = await _next_event(stream, conn, pacer)
    while isinstance(event, h11.InformationalResponse):
        event = await _next_event(stream, conn, pacer)
    if not isinstance(event, h11.Response) or event.status_code != 200:
        raise RuntimeError(f"expected 200, got {event!r}")
    return event


async def download(url: str, spec: LoadSpec, stats: LoadStats) -> None:
    """GET spec.size bytes through url at spec.rate, verifying every byte."""
    path = f"/{'chunked' if spec.chunked else 'bytes'}/{spec.size}"
    stream = await _connect(url, spec)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", _host_header(url)), ("Connection", "close")]
        await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=headers)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        pacer = Pacer(spec.rate, burst=CLIENT_READ_SIZE)
        await _expect_ok(stream, conn, pacer)
        verifier = PatternVerifier()
        while isinstance(event := await _next_event(stream, conn, pacer), h11.Data):
            stats.bytes_moved += len(event.data)
            stats.bytes_delivered += len(event.data)
            if verifier.feed(event.data):
                stats.bytes_verified += len(event.data)
    if not verifier.ok:
        raise RuntimeError(f"content mismatch at offset {verifier.first_mismatch}")
    if verifier.offset != spec.size:
        raise RuntimeError(f"got {verifier.offset} bytes, expected {spec.size}")


async def _send_upload_body(
    stream: trio.abc.Stream, conn: h11.Connection, size: int, stats: LoadStats
) -> None:
    view = memoryview(SEND_BLOCK)
    sent = 0
    while sent < size:
        block = view[: min(size - sent, len(view))]
        # h11 frames any bytes-like object; its annotation says bytes.
        pieces = conn.send_with_data_passthrough(h11.Data(data=block))  # type: ignore[arg-type]
        for piece in pieces or ():
            await stream.send_all(piece)
        sent += len(block)
        stats.bytes_moved += len(block)
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def upload(url: str, spec: LoadSpec, stats: LoadStats) -> None:
    """POST spec.size bytes through url to an origin that reads at spec.rate."""
    target = f"/upload?rate={spec.rate}" if spec.rate else "/upload"
    stream = await _connect(url, spec)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", _host_header(url)),
            ("Content-Length", str(spec.size)),
            ("Connection", "close"),
        ]
        await stream.send_all(conn.send(h11.Request(method="POST", target=target, headers=headers)))
        await _send_upload_body(stream, conn, spec.size, stats)
        await _expect_ok(stream, conn, None)
        body = b""
        while isinstance(event := await _next_event(stream, conn, None), h11.Data):
            body += event.data
    result = json.loads(body)
    stats.bytes_delivered += int(result["bytes"])
    if result["bytes"] != spec.size or result["sha256"] != expected_sha256(spec.size):
        raise RuntimeError(f"origin received {result['bytes']} bytes, sha256 mismatch or short")
    stats.bytes_verified += spec.size


async def run_client(url: str, spec: LoadSpec, stats: LoadStats) -> None:
    """One client; its failure is recorded, never propagated to the others."""
    try:
        await (upload if spec.upload else download)(url, spec, stats)
    except (OSError, trio.BrokenResourceError, h11.ProtocolError, RuntimeError) as exc:
        stats.record_error(f"{type(exc).__name__}: {exc}")
    else:
        stats.clients_ok += 1
    finally:
        stats.clients_done += 1


async def run_clients(url: str, spec: LoadSpec, stats: LoadStats) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(spec.clients):
            nursery.start_soon(run_client, url, spec, stats)


# ---------------------------------------------------------------- sampling


@attrs.define
class Recorder:
    """Samples one proxy's RSS every SAMPLE_INTERVAL and draws the progress line."""

    target: str
    pid: int | None
    stats: LoadStats
    total_bytes: int
    started: float = attrs.field(factory=trio.current_time)
    phase: str = "idle"
    samples: list[Sample] = attrs.Factory(list)
    harness_cpu: float = 0.0  # this process's CPU during load, in cores
    _last_plain_log: float = -math.inf

    def sample(self) -> Sample:
        now = trio.current_time() - self.started
        rss = rss_of(self.pid)
        record = Sample(
            self.target, now, self.phase, rss, self.stats.bytes_moved, self.stats.clients_done
        )
        self.samples.append(record)
        return record

    def show(self, s: Sample) -> None:
        rss = "n/a" if s.rss is None else format_size(s.rss)
        line = (
            f"[{self.target}] {s.t:6.1f}s {s.phase:<6} moved {format_size(s.bytes_moved)}"
            f" / {format_size(self.total_bytes)}  rss {rss}"
            f"  done {s.clients_done}/{self.stats.clients}  errors {self.stats.error_count}"
        )
        if _tty():
            print(f"\r\x1b[K{line}", end="", file=sys.stderr, flush=True)
        elif s.t - self._last_plain_log >= 5.0:  # a log file gets a line every 5 s
            self._last_plain_log = s.t
            print(line, file=sys.stderr, flush=True)

    async def run(self) -> None:
        while True:
            self.show(self.sample())
            await trio.sleep(SAMPLE_INTERVAL)


# ---------------------------------------------------------------- one proxy run


def _tls_argv(args: argparse.Namespace) -> list[str]:
    """trioproxy's TLS arguments for --tls and --tls-upstream."""
    certs: Certs | None = args.certs
    if certs is None:
        return []
    argv = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)] if args.tls else []
    return argv + (["--upstream-ca", str(certs.cert)] if args.tls_upstream else [])


def _proxy_argv(kind: str, origin_url: str, extra: str, tls: Sequence[str] = ()) -> list[str]:
    listen = ["--listen", "127.0.0.1:0", "--upstream", origin_url]
    if kind == "trioproxy":
        return [sys.executable, "-m", "trioproxy", *listen, *tls, *shlex.split(extra)]
    return [sys.executable, str(SCRIPTS_DIR / "naive_relay.py"), *listen, *shlex.split(extra)]


def _trioproxy_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def _own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def _locate_trioproxy(env: dict[str, str]) -> str:
    """Where `python -m trioproxy` will import from, so a report names what it ran
    (an editable install elsewhere can shadow --trioproxy-root)."""
    code = "import trioproxy; print(trioproxy.__file__ or list(trioproxy.__path__))"
    with trio.fail_after(READY_TIMEOUT):
        done = await trio.run_process(
            [sys.executable, "-c", code],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.stdout.decode().strip() or f"not importable: {done.stderr.decode()[-300:]}"


async def _measure(
    recorder: Recorder, url: str, spec: LoadSpec, args: argparse.Namespace
) -> tuple[float, bool]:
    """Idle, load, settle; returns (load seconds, whether the load timed out)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.run)
        await trio.sleep(args.idle_seconds)
        recorder.sample()  # the idle figure is the last sample before load
        recorder.phase = "load"
        load_start, cpu_start = trio.current_time(), _own_cpu_seconds()
        with trio.move_on_after(args.max_seconds) as scope:
            await run_clients(url, spec, recorder.stats)
        load_seconds = trio.current_time() - load_start
        recorder.harness_cpu = (_own_cpu_seconds() - cpu_start) / max(load_seconds, 1e-9)
        recorder.phase = "settle"
        await trio.sleep(args.settle_seconds)
        recorder.phase = "after"
        recorder.show(recorder.sample())
        nursery.cancel_scope.cancel()
    if _tty():
        print(file=sys.stderr)
    return load_seconds, scope.cancelled_caught


def summarize(
    recorder: Recorder, spec: LoadSpec, load_seconds: float, timed_out: bool, settle: float
) -> Summary:
    by_phase = {p: [s.rss for s in recorder.samples if s.phase == p] for p in PHASES}
    idle = by_phase["idle"][-1] if by_phase["idle"] else None
    known = [r for s in recorder.samples if (r := s.rss) is not None]
    peak = max(known) if known else None
    after = by_phase["after"][-1] if by_phase["after"] else None
    stats = recorder.stats
    return Summary(
        proxy=recorder.target,
        idle_rss=idle,
        peak_rss=peak,
        growth=None if idle is None or peak is None else peak - idle,
        rss_after=after,
        settle_seconds=settle,
        bytes_expected=spec.clients * spec.size,
        bytes_delivered=stats.bytes_delivered,
        bytes_verified=stats.bytes_verified,
        clients=spec.clients,
        clients_ok=stats.clients_ok,
        load_seconds=load_seconds,
        throughput_mb_s=stats.bytes_delivered / load_seconds / 1e6 if load_seconds else 0.0,
        timed_out=timed_out,
        harness_cpu=recorder.harness_cpu,
        error_count=stats.error_count,
        errors=list(stats.errors),
    )


async def run_target(
    nursery: trio.Nursery, target: Target, origin: Child, spec: LoadSpec, args: argparse.Namespace
) -> tuple[Summary, list[Sample]]:
    """Start (or attach to) one proxy, measure it under load, stop it."""
    child: Child | None = None
    if target.kind == "url":
        url, pid = target.url, target.pid
    elif target.kind == "direct":
        url, pid = origin.url, origin.process.pid
    else:
        extra = args.proxy_args if target.kind == "trioproxy" else args.naive_args
        argv = _proxy_argv(target.kind, origin.url, extra, _tls_argv(args))
        env = None
        if target.kind == "trioproxy":
            env = _trioproxy_env(args.trioproxy_root)
            _log(f"trioproxy package: {await _locate_trioproxy(env)}")
        child = await start_child(nursery, target.name, argv, env)
        url, pid = child.url, child.process.pid
    assert url is not None
    try:
        stats = LoadStats(clients=spec.clients)
        recorder = Recorder(target.name, pid, stats, spec.clients * spec.size)
        load_seconds, timed_out = await _measure(recorder, url, spec, args)
    finally:
        if child is not None:
            await stop_child(child)
    summary = summarize(recorder, spec, load_seconds, timed_out, args.settle_seconds)
    return summary, recorder.samples


async def run_all(
    targets: Sequence[Target], spec: LoadSpec, args: argparse.Namespace
) -> tuple[list[Summary], list[Sample]]:
    summaries: list[Summary] = []
    samples: list[Sample] = []
    if spec.upload:
        expected_sha256(spec.size)  # computed once, before any clock starts
    async with trio.open_nursery() as nursery:  # holds the stderr forwarders
        origin_argv = [sys.executable, str(SCRIPTS_DIR / "origin.py"), "--listen", "127.0.0.1:0"]
        if args.tls_upstream:
            origin_argv += ["--tls-cert", str(args.certs.cert), "--tls-key", str(args.certs.key)]
        origin = await start_child(nursery, "origin", origin_argv)
        try:
            for target in targets:
                summary, target_samples = await run_target(nursery, target, origin, spec, args)
                summaries.append(summary)
                samples.extend(target_samples)
        finally:
            await stop_child(origin)
    return summaries, samples


# ---------------------------------------------------------------- reports


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def format_table(summaries: Sequence[Summary]) -> str:
    header = (
        f"{'proxy':<12} {'idle MiB':>9} {'peak MiB':>9} {'growth MiB':>10} {'after MiB':>10}"
        f" {'delivered':>11} {'verified':>11} {'ok':>9} {'secs':>7} {'MB/s':>7} {'cpu':>5}"
    )
    rows = [header, "-" * len(header)]
    for s in summaries:
        rows.append(
            f"{s.proxy:<12} {_mib(s.idle_rss):>9} {_mib(s.peak_rss):>9} {_mib(s.growth):>10}"
            f" {_mib(s.rss_after):>10} {format_size(s.bytes_delivered):>11}"
            f" {format_size(s.bytes_verified):>11} {f'{s.clients_ok}/{s.clients}':>9}"
            f" {s.load_seconds:>7.1f} {s.throughput_mb_s:>7.1f} {s.harness_cpu:>5.0%}"
        )
    notes = [
        f"'after' is the RSS {summaries[0].settle_seconds:g} s after the load ended;"
        " growth is peak minus idle; cpu is this stress process's own CPU during load"
        " (100% = one core; near it, the clients rather than the proxy set the pace)."
        if summaries
        else ""
    ]
    for s in summaries:
        if s.timed_out:
            notes.append(f"{s.proxy}: load phase hit --max-seconds; clients were cancelled.")
        for error in s.errors:
            notes.append(f"{s.proxy}: {error}")
        if s.error_count > len(s.errors):
            notes.append(f"{s.proxy}: {s.error_count} client errors in all")
    return "\n".join(rows + notes)


def write_csv(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["proxy", "t_seconds", "phase", "rss_bytes", "bytes_moved", "clients_done"])
        for s in samples:
            rss = "" if s.rss is None else s.rss
            writer.writerow([s.proxy, f"{s.t:.3f}", s.phase, rss, s.bytes_moved, s.clients_done])


def write_json(path: Path, summaries: Sequence[Summary], config: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": config, "results": [attrs.asdict(s) for s in summaries]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def draw_png(path: Path, samples: Sequence[Sample], title: str) -> bool:
    """Plot RSS over time, one line per proxy. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for proxy in dict.fromkeys(s.proxy for s in samples):
        points = [(s.t, s.rss / 2**20) for s in samples if s.proxy == proxy and s.rss]
        if points:
            axes.plot(*zip(*points, strict=True), label=proxy, linewidth=1.6)
    axes.set_xlabel("seconds since the proxy was ready")
    axes.set_ylabel("RSS of proxy + children (MiB)")
    axes.set_title(title, fontsize=10)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start an origin and proxies, drive slow clients, record proxy RSS.",
        epilog=UNITS_HELP,
    )
    add = parser.add_argument
    add("--proxy", action="append", choices=PROXY_KINDS, default=[], help="repeatable")
    add("--proxy-url", action="append", default=[], help="an already running proxy")
    add("--proxy-pid", type=int, help="PID of the --proxy-url process, for RSS")
    add("--proxy-args", default="", help="extra arguments for python -m trioproxy")
    add("--naive-args", default="", help="extra arguments for naive_relay.py")
    add("--trioproxy-root", type=Path, default=REPO_ROOT, help="dir holding trioproxy/")
    add("--clients", type=int, default=1, help="concurrent clients (default 1)")
    size, duration = for_argparse(parse_size), for_argparse(parse_duration)
    add("--bytes", type=size, default=parse_size("50MB"), help="per client (default 50MB)")
    add("--rate", type=size, default=parse_size("20MB"), help="bytes/s per client; 0: no cap")
    add("--upload", action="store_true", help="clients upload; the origin reads at --rate")
    add("--chunked", action="store_true", help="download /chunked/N instead of /bytes/N")
    add("--rcvbuf", type=size, default=DEFAULT_RCVBUF, help="client SO_RCVBUF")
    add("--idle-seconds", type=duration, default=2.0, help="idle sampling before load")
    add("--settle-seconds", type=duration, default=5.0, help="sampling after load")
    add("--max-seconds", type=duration, default=300.0, help="bound on each load phase")
    add("--csv", type=Path, help="samples CSV (default results/stress-<proxy>.csv each)")
    add("--json", type=Path, help="write the summary as JSON")
    add("--png", type=Path, help="RSS plot (default results/stress-<proxies>.png)")
    add("--tls", action="store_true", help="clients reach trioproxy over TLS")
    add("--tls-upstream", action="store_true", help="trioproxy reaches the origin over TLS")
    return parser


def targets_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Target]:
    targets = [Target(name=kind, kind=kind) for kind in args.proxy]
    for index, url in enumerate(args.proxy_url):
        try:
            parse_http_url(url)
        except ValueError as exc:
            parser.error(str(exc))
        pid = args.proxy_pid if index == 0 else None
        targets.append(Target(name=f"url{index or ''}", kind="url", url=url, pid=pid))
    if not targets:
        parser.error("give at least one --proxy or --proxy-url")
    if len({t.name for t in targets}) != len(targets):
        parser.error("each proxy may be given once per run")
    if args.clients < 1 or args.bytes < 0 or args.rate < 0:
        parser.error("--clients must be >= 1; --bytes and --rate must be >= 0")
    if (args.tls or args.tls_upstream) and any(t.kind in ("naive", "direct") for t in targets):
        parser.error("--tls and --tls-upstream are for trioproxy (or a --proxy-url speaking TLS)")
    return targets


def write_reports(
    args: argparse.Namespace, spec: LoadSpec, summaries: list[Summary], samples: list[Sample]
) -> None:
    names = [s.proxy for s in summaries]
    if args.csv:
        write_csv(args.csv, samples)
    else:
        for name in names:
            write_csv(Path(f"results/stress-{name}.csv"), [s for s in samples if s.proxy == name])
    config = {
        k: str(v) if isinstance(v, Path | Certs) else v
        for k, v in vars(args).items()
        if k != "certs" or v is None
    }
    if args.json:
        write_json(args.json, summaries, config)
    png = args.png or Path(f"results/stress-{'-vs-'.join(names)}.png")
    direction = "upload (origin reads)" if spec.upload else "download"
    title = (
        f"{spec.clients} client(s) x {format_size(spec.size)} {direction}"
        f" at {spec.rate / 1e6:g} MB/s each"
    )
    if draw_png(png, samples, title):
        _log(f"wrote {png}")
    else:
        _log("matplotlib not importable: no PNG")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    targets = targets_from(args, parser)
    with tempfile.TemporaryDirectory(prefix="trioproxy-certs-") as directory:
        args.certs = self_signed(Path(directory)) if args.tls or args.tls_upstream else None
        tls = ssl.create_default_context(cafile=str(args.certs.cert)) if args.tls else None
        spec = LoadSpec(
            args.clients, args.bytes, args.rate, args.upload, args.chunked, args.rcvbuf, tls
        )
        try:
            summaries, samples = trio.run(run_all, targets, spec, args)
        except* KeyboardInterrupt:  # children were already stopped on the way out
            _log("interrupted: no summary")
            sys.exit(130)
    write_reports(args, spec, summaries, samples)
    print(format_table(summaries))


if __name__ == "__main__":
    main()
