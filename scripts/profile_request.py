"""Where one small proxied request spends its CPU, by phase (issue #14).

Runs the real proxy in this process and a load against it, and prints, per
request: process CPU time, Python calls, and the CPU split by phase (read
head, policy, upstream checkout, write request, read response, write
response, log, metrics, and what runs around them). Each round also shows
the latency the clients saw (p50, p99, slowest), since a cut that saves CPU
by yielding less can make the connections unfair (issue #14, target 3).

    python scripts/profile_request.py                         # 50 connections, 5 rounds
    python scripts/profile_request.py --connections 1 --requests 2000
    python scripts/profile_request.py --proxy-args='--access-log off'
    python scripts/profile_request.py --relay floor           # scripts/h11_floor.py instead

How it is set up, and why:

* The proxy is trioproxy as its command line builds it (``build_parser``,
  ``config_from_args``, ``configure_logging``, then ``serve``) in reverse mode,
  on a loopback listener, with the access log written to a file. Like the
  ``trioproxy`` command, the script first re-executes itself with the
  allocator settings of ``_memory.prepare_process_memory`` (PYTHONMALLOC=malloc,
  glibc's tcache off, frozen start-up objects), unless ``--python-allocator``.
* Loopback sockets, not in-memory streams: a request's cost includes the
  socket path (the scratch reads, ``send_all``, the pool's ``poll``, epoll in
  trio's run loop), and trio's memory streams would replace it with machinery
  of their own that no deployment runs.
* The origin and the client run in a child process (this script with
  ``--peers``), an epoll loop over plain sockets that answers every GET with
  one canned nginx-like 1 KiB response and sends a curl-like GET as soon as
  the previous response has arrived, on ``--connections`` keep-alive
  connections. In this process they would add their own CPU to
  ``time.process_time`` and their own functions to the profile; in a child,
  this process's CPU is the proxy's alone, as bench.py's psutil figure is.
* The connections are opened and ``--warmup`` requests run before anything is
  measured, so the figures are the keep-alive steady state (no accept, no
  upstream connect). Then ``--rounds`` rounds of ``--requests`` requests run
  without a profiler (the CPU figures), then one with cProfile (the calls and
  the phases).

How the phases are attributed (``TRANSPARENT``, ``PHASES``, ``BY_CALLER``):
the functions that run an exchange step by step (the connection loop, the
exchange's ``_forward``...) are *transparent*; every function they call
directly is charged, with its whole cumulative time, to the phase the table
maps it to (``BY_CALLER`` first, for a function that means different things
from different callers, such as ``send_head``). A transparent function's own
time, the builtins it calls, and any callee missing from the table go to the
transparent function's own phase; missing callees are listed under the table,
so a new call on the request path shows up instead of vanishing. So the
phases add up exactly to the connection tasks' time; the rest of the process
(trio's run loop: epoll, task switches, deadlines) is a line of its own.
cProfile's coroutine bookkeeping counts each resumption of a suspended
coroutine as a call, and cProfile adds a fixed cost per call, so shares
lean towards call-heavy phases; the "≈ µs" column scales the shares to the
unprofiled CPU figure. ``tests/test_scripts_profile_request.py`` checks that
every function the tables name still exists.

Bounded: every wait on the child has a timeout (``STEP_TIMEOUT``); the
defaults take about half a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import logging
import os
import pstats
import re
import selectors
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from types import CodeType
from typing import Any

import attrs
import trio

import trioproxy
from trioproxy import _accesslog
from trioproxy._accesslog import access_logger
from trioproxy._cli import (
    build_parser,
    config_from_args,
    configure_logging,
    log_settings_from_args,
)
from trioproxy._memory import prepare_process_memory

BODY_SIZE = 1024
"""The response body: 1 KiB, the small response of issue #14's benchmark."""

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Wed, 25 Nov 2026 21:44:54 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 1024\r\n"
    b"Last-Modified: Wed, 25 Nov 2026 21:36:38 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6b0754e6-400"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n" + b"x" * BODY_SIZE
)
"""What the origin answers to every request: nginx's head for a 1 KiB static file."""

STEP_TIMEOUT = 300.0
"""Seconds the harness waits for the child to answer one command: far above
a default round (a few seconds), so only a hung child or proxy trips it."""

RECEIVE_SIZE = 64 * 1024
"""Bytes the child asks of a socket per read."""

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


# --- The child: origin and clients on loopback --------------------------------------


def _request(port: int) -> bytes:
    """A curl-like GET, as the client sends it to the proxy."""
    return (
        f"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
    ).encode("ascii")


class _Origin:
    """One connection from the proxy to the origin: every request head gets RESPONSE.

    Requests are GETs without a body, so a request ends at its blank line.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def on_readable(self, peers: _Peers) -> None:
        data = self.sock.recv(RECEIVE_SIZE)
        if not data:
            peers.drop(self.sock)
            return
        self.buffer += data
        heads = self.buffer.count(b"\r\n\r\n")
        if heads:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4 :]
            self.sock.sendall(RESPONSE * heads)


class _Client:
    """One keep-alive connection to the proxy, one request at a time."""

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.buffer = b""
        self.body_left: int | None = None  # None: waiting for a head
        self.sent_at = 0.0

    def on_readable(self, peers: _Peers) -> None:
        data = self.sock.recv(RECEIVE_SIZE)
        if not data:
            raise ConnectionError("the proxy closed a keep-alive connection")
        self.buffer += data
        if self.body_left is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.body_left = _body_length(self.buffer[: end + 2])
            self.buffer = self.buffer[end + 4 :]
        if len(self.buffer) >= self.body_left:
            self.buffer, self.body_left = self.buffer[self.body_left :], None
            peers.response_done(self)


def _body_length(head: bytes) -> int:
    if not head.startswith(b"HTTP/1.1 200 "):
        raise ConnectionError(f"unexpected response: {head[:200]!r}")
    match = _CONTENT_LENGTH.search(head)
    if match is None:
        raise ConnectionError(f"response without Content-Length: {head[:200]!r}")
    return int(match.group(1))


class _Peers:
    """The child's epoll loop: the origin's listener and connections, the
    clients, and commands on stdin (``connect PORT``, ``run N``, ``quit``),
    each answered with one line on stdout."""

    def __init__(self, connections: int) -> None:
        self.connections = connections
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.clients: list[_Client] = []
        self.to_send = 0
        self.pending = 0
        self.latencies: list[float] = []
        self.running = True
        self.commands = b""

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, self._command)
        _say(f"origin {self.listener.getsockname()[1]}")
        while self.running:
            for key, _ in self.selector.select():
                handler: Callable[[_Peers], None] = key.data
                handler(self)

    def _accept(self, _: _Peers) -> None:
        sock, _address = self.listener.accept()
        self._register(sock, _Origin(sock).on_readable)

    def _register(self, sock: socket.socket, handler: Callable[[_Peers], None]) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.selector.register(sock, selectors.EVENT_READ, handler)

    def drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        sock.close()

    def _command(self, _: _Peers) -> None:
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:
            self.running = False
            return
        self.commands += data
        while b"\n" in self.commands:
            line, _newline, self.commands = self.commands.partition(b"\n")
            verb, _space, argument = line.decode("ascii").partition(" ")
            if verb == "connect":
                self._connect(int(argument))
            elif verb == "run":
                self._run(int(argument))
            else:
                self.running = False

    def _connect(self, port: int) -> None:
        for _ in range(self.connections):
            client = _Client(socket.create_connection(("127.0.0.1", port)), _request(port))
            self.clients.append(client)
            self._register(client.sock, client.on_readable)
        _say("connected")

    def _run(self, requests: int) -> None:
        self.to_send = self.pending = requests
        self.latencies = []
        if not requests:
            self._report()
        for client in self.clients[:requests]:
            self._send_next(client)

    def _send_next(self, client: _Client) -> None:
        if self.to_send:
            self.to_send -= 1
            client.sent_at = time.perf_counter()
            client.sock.sendall(client.request)

    def response_done(self, client: _Client) -> None:
        self.latencies.append(time.perf_counter() - client.sent_at)
        self.pending -= 1
        if self.pending:
            self._send_next(client)
        else:
            self._report()

    def _report(self) -> None:
        """``done P50 P99 MAX``: the round's latencies in seconds, as the
        client saw them (request written to response read)."""
        latencies = sorted(self.latencies) or [0.0]
        p50, p99 = (latencies[int(len(latencies) * q)] for q in (0.5, 0.99))
        _say(f"done {p50} {p99} {latencies[-1]}")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_peers(connections: int) -> None:
    """The child's main: serve until stdin says ``quit`` or closes."""
    try:
        _Peers(connections).serve()
    except Exception as exc:
        _say(f"error {exc!r}")
        raise SystemExit(1) from exc


# --- The harness: the proxy in this process --------------------------------------------


class PeersProcess:
    """The child process, driven over its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""

    @classmethod
    async def start(cls, connections: int) -> tuple[PeersProcess, int]:
        """Start the child; return it and its origin's port."""
        process = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--peers", "--connections", str(connections)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        peers = cls(process)
        line = await peers.read_line()
        verb, _, port = line.partition(" ")
        if verb != "origin":
            raise RuntimeError(f"the load process did not start: {line!r}")
        return peers, int(port)

    async def ask(self, command: str, expect: str) -> list[str]:
        """Send ``command``; wait for a line starting with ``expect``; return
        the words after it."""
        await self._stdin.send_all(command.encode("ascii") + b"\n")
        line = await self.read_line()
        verb, *words = line.split()
        if verb != expect:
            raise RuntimeError(f"the load process answered {line!r} to {command!r}")
        return words

    async def read_line(self) -> str:
        with trio.fail_after(STEP_TIMEOUT):
            while b"\n" not in self._buffer:
                data = await self._stdout.receive_some(4096)
                if not data:
                    raise RuntimeError("the load process ended")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("ascii", "replace")

    async def stop(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await self._stdin.send_all(b"quit\n")
        with trio.move_on_after(5):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@attrs.frozen
class Round:
    """One measured round, in seconds: process CPU (``time.process_time``),
    its user and system parts (``os.times``, in 10 ms ticks), wall time, and
    the clients' latency percentiles."""

    requests: int
    cpu: float
    user: float
    system: float
    wall: float
    p50: float = 0.0
    p99: float = 0.0
    slowest: float = 0.0

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / self.requests


@attrs.define
class Measurement:
    """What a whole run measured: the plain rounds and the profiled one."""

    rounds: list[Round] = attrs.Factory(list)
    profiled: Round | None = None
    stats: pstats.Stats | None = None


async def _measure_round(peers: PeersProcess, requests: int) -> Round:
    before, cpu, wall = os.times(), time.process_time(), time.perf_counter()
    p50, p99, slowest = map(float, await peers.ask(f"run {requests}", "done"))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    return Round(requests, cpu, user, system, wall, p50, p99, slowest)


async def measure(args: argparse.Namespace, log_path: str) -> Measurement:
    """Start the load process and the relay; warm up; run the rounds."""
    result = Measurement()
    peers, origin_port = await PeersProcess.start(args.connections)
    origin_port = args.origin_port or origin_port
    try:
        async with trio.open_nursery() as nursery:
            port = await _start_relay(nursery, args, origin_port, log_path)
            await peers.ask(f"connect {port}", "connected")
            await peers.ask(f"run {args.warmup}", "done")
            for _ in range(args.rounds):
                result.rounds.append(await _measure_round(peers, args.requests))
            if args.no_profile:
                nursery.cancel_scope.cancel()
                return result
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            result.profiled = await _measure_round(peers, args.requests)
            profiler.disable()
            result.stats = pstats.Stats(profiler)
            if args.dump_stats:
                result.stats.dump_stats(args.dump_stats)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await peers.stop()
    return result


async def _start_relay(
    nursery: trio.Nursery, args: argparse.Namespace, origin_port: int, log_path: str
) -> int:
    """Start the relay under test on a loopback port of its choosing; return it."""
    if args.relay == "floor":
        floor = importlib.import_module("h11_floor")  # scripts/h11_floor.py
        listeners = await nursery.start(floor.serve_floor, ("127.0.0.1", origin_port))
    else:
        cli = build_parser().parse_args(_proxy_argv(origin_port, log_path, args.proxy_args))
        configure_logging(log_settings_from_args(cli))
        config = config_from_args(cli)
        # The command line's flusher of the buffered access log, where the
        # tree under test has one (A/B runs load older trees too).
        flusher = getattr(_accesslog, "flush_access_log_forever", None)
        if flusher is not None:  # without a buffer installed it writes nothing
            nursery.start_soon(flusher)
        listeners = await nursery.start(trioproxy.serve, config)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _proxy_argv(origin_port: int, log_path: str, extra: str) -> list[str]:
    """The trioproxy command line under test (later flags win)."""
    return [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"http://127.0.0.1:{origin_port}",
        "--access-log",
        log_path,
        *shlex.split(extra),
    ]


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """Give back the logging set-up ``configure_logging`` replaces (for tests)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    access = (access_logger.handlers[:], access_logger.level, access_logger.propagate)
    try:
        yield
    finally:
        uninstall = getattr(_accesslog, "use_access_log_buffer", None)
        if uninstall is not None:
            uninstall(None)  # writes the lines still buffered
        for handler in access_logger.handlers:
            if handler not in access[0]:
                handler.close()
        root.handlers[:], root.level = saved
        access_logger.handlers[:], access_logger.level, access_logger.propagate = access


# --- Phase attribution ---------------------------------------------------------------

# The functions that run an exchange step by step, and the phase of their own
# time (and of the builtins and unlisted functions they call).
TRANSPARENT: dict[str, str] = {
    "trioproxy._connection:handle_connection": "connection loop",
    "trioproxy._connection:_serve_requests": "connection loop",
    "trioproxy._exchange:Exchange.run": "exchange",
    "trioproxy._exchange:Exchange._forward": "exchange",
    "trioproxy._exchange:Exchange._forward_to_group": "exchange",
    "trioproxy._exchange:Exchange._forward_to_server": "exchange",
    "trioproxy._exchange:Exchange._exchange_on": "exchange",
    "trioproxy._exchange:Exchange._send_on": "exchange",
    "trioproxy._exchange:Exchange._forward_response": "exchange",
    "trioproxy._exchange:Exchange._check_target": "policy",
    "trioproxy._body:send_buffered": "write response",
}

# What each function a transparent one calls is charged to, whole.
PHASES: dict[str, tuple[str, ...]] = {
    "read head": (
        "trioproxy._timeouts:wait_for_request",
        "trioproxy._timeouts:read_request_head",
        "trioproxy._endpoint:ClientEndpoint.next_event_nowait",  # the request's end
        "trioproxy._http:request_has_body",
        "trioproxy._endpoint:H11Endpoint.reuse",  # h11 ready for the next head
    ),
    "policy": (
        "trioproxy._exchange:Exchange._authorize",
        "trioproxy._http:reverse_path",
        "trioproxy._http:request_authority",
        "trioproxy._front:Front.group_for",
        "trioproxy._policy:check_not_loop",
        "h11._headers:Headers.raw_items",
    ),
    "upstream checkout": (
        "trioproxy._exchange:Exchange._connect",
        "trioproxy._balance:UpstreamGroup.pick",
        "trioproxy._balance:UpstreamGroup.finished",
        "trioproxy._upstream:UpstreamConnector.checkout",
        "trioproxy._upstream:UpstreamConnector.release",
        "trioproxy._exchange:may_pool",
        "trioproxy._endpoint:H11Endpoint.state",
    ),
    "write request": ("trioproxy._exchange:Exchange._upstream_request",),
    "read response": (
        "trioproxy._exchange:Exchange._response_head",
        "trioproxy._endpoint:H11Endpoint.next_event_nowait",  # the body, in send_buffered
    ),
    "write response": (
        "trioproxy._exchange:client_head",
        "trioproxy._relay:PendingBody.__init__",
    ),
    "log": (
        "trioproxy._accesslog:logged_exchange",
        "trioproxy._accesslog:LoggedExchange.__enter__",
        "trioproxy._accesslog:LoggedExchange.__exit__",
        "trioproxy._accesslog:AccessRecord.set_request",
        "trioproxy._accesslog:AccessRecord.set_upstream",
    ),
    "metrics": (
        "trioproxy._metrics:ProxyMeters.count_response",
        "trioproxy._relay:BufferGauge.add",
        "trioproxy._relay:BufferGauge.remove",
    ),
    "deadlines": (
        "trio:CancelScope.__init__",
        "trio:CancelScope.__enter__",
        "trio:CancelScope.__exit__",
        "trio:CancelScope.deadline",
        "trio:current_time",
        "trioproxy._relay:Progress.moved",  # the stall watchdog's clock
    ),
    "exchange": (
        "trioproxy._exchange:Exchange.__init__",
        "trioproxy._exchange:Exchange.keeps_connection",
    ),
}

# A function whose phase depends on who calls it: (caller, callee) -> phase.
BY_CALLER: dict[tuple[str, str], str] = {
    (
        "trioproxy._exchange:Exchange._send_on",
        "trioproxy._endpoint:H11Endpoint.send_head",
    ): "write request",
    (
        "trioproxy._body:send_buffered",
        "trioproxy._endpoint:H11Endpoint.send_head",
    ): "write response",
}

ROOT = "trioproxy._connection:handle_connection"
"""The connection task's entry: the phases add up to its cumulative time."""

OUTSIDE = "trio run loop, outside the connection tasks"
PHASE_ORDER = (*PHASES, "connection loop", OUTSIDE)

FunctionKey = tuple[str, int, str]
"""How cProfile names a function: file, first line, name."""


def resolve(name: str) -> list[FunctionKey]:
    """The cProfile keys of ``"module:Qualified.name"`` (a property gives its
    getter and setter).

    Raises:
        LookupError: when the module, the name or its code is gone.
    """
    module_name, _, qualname = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise LookupError(f"{name}: {exc}") from exc
    functions = [target.fget, target.fset] if isinstance(target, property) else [target]
    codes: list[CodeType] = [
        code for f in functions if (code := getattr(f, "__code__", None)) is not None
    ]
    if not codes:
        raise LookupError(f"{name} is not a Python function")
    return [(code.co_filename, code.co_firstlineno, code.co_name) for code in codes]


def _keys(names: Sequence[str]) -> dict[FunctionKey, str]:
    return {key: name for name in names for key in resolve(name)}


@attrs.frozen
class PhaseSplit:
    """Seconds by phase over the profiled round, and the callees no table names."""

    seconds: dict[str, float]
    unlisted: dict[str, float]
    total: float


def attribute(stats: dict[FunctionKey, Any]) -> PhaseSplit:
    """Split a cProfile run's time into phases (see the module comment).

    Args:
        stats: ``pstats.Stats(...).stats``: key -> (cc, nc, own, cumulative, callers),
            where callers maps a caller's key to (nc, cc, own, cumulative).
    """
    transparent = {key: TRANSPARENT[name] for key, name in _keys(list(TRANSPARENT)).items()}
    callee_phase = {key: phase for phase, names in PHASES.items() for key in _keys(names)}
    by_caller = {
        (caller, callee): phase
        for (caller_name, callee_name), phase in BY_CALLER.items()
        for caller in resolve(caller_name)
        for callee in resolve(callee_name)
    }
    seconds = dict.fromkeys(PHASE_ORDER, 0.0)
    unlisted: dict[str, float] = {}
    for key, (_cc, _nc, own, _cumulative, callers) in stats.items():
        if key in transparent:
            seconds[transparent[key]] += own
        for caller, edge in callers.items():
            if caller not in transparent or key in transparent:
                continue
            phase = by_caller.get((caller, key)) or callee_phase.get(key)
            if phase is None:
                phase = transparent[caller]
                if key[0] != "~":  # a builtin: the caller's own work
                    unlisted[_label(key)] = unlisted.get(_label(key), 0.0) + edge[3]
            seconds[phase] += edge[3]
    total = sum(entry[2] for entry in stats.values())
    root = sum(stats[key][3] for key in resolve(ROOT) if key in stats)
    seconds[OUTSIDE] = total - root
    return PhaseSplit(seconds, unlisted, total)


def _label(key: FunctionKey) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    parts = Path(filename).parts
    where = "/".join(parts[-2:]) if len(parts) > 1 else filename
    return f"{where}:{line}({name})"


# --- The report ----------------------------------------------------------------------


def report(args: argparse.Namespace, result: Measurement) -> str:
    """The whole printout: set-up, rounds, phases, top functions."""
    lines = [*_setup_lines(args), "", *_round_lines(result.rounds)]
    if result.profiled is not None and result.stats is not None:
        best = min(r.cpu_per_request for r in result.rounds)
        lines += ["", *_profile_lines(args, result.profiled, result.stats, best)]
    return "\n".join(lines)


def _setup_lines(args: argparse.Namespace) -> list[str]:
    relay = (
        "scripts/h11_floor.py (in-process)"
        if args.relay == "floor"
        else f"trioproxy from {Path(trioproxy.__file__).parent}"
        + (f", flags: {args.proxy_args}" if args.proxy_args else "")
    )
    return [
        f"relay: {relay}",
        f"python {sys.version.split()[0]}, trio {trio.__version__}, h11 {version('h11')}, "
        f"PYTHONMALLOC={os.environ.get('PYTHONMALLOC', '(default)')}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(none)')}",
        f"load: {args.rounds} rounds + 1 profiled x {args.requests} requests, "
        f"{args.connections} keep-alive connections, {BODY_SIZE} B responses, "
        f"after {args.warmup} warm-up requests; origin and client in a child process",
    ]


def _round_lines(rounds: Sequence[Round]) -> list[str]:
    lines = [
        "| round | CPU µs/req | user µs/req | system µs/req | req/s | p50 / p99 / max ms |",
        "|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(rounds, 1):
        lines.append(
            f"| {number} | {r.cpu_per_request * 1e6:.0f} | {r.user / r.requests * 1e6:.0f} "
            f"| {r.system / r.requests * 1e6:.0f} | {r.requests / r.wall:.0f} "
            f"| {r.p50 * 1e3:.2f} / {r.p99 * 1e3:.2f} / {r.slowest * 1e3:.1f} |"
        )
    cpu = sorted(r.cpu_per_request * 1e6 for r in rounds)
    spread = f"{(cpu[-1] - cpu[0]) / cpu[0] * 100:.0f} %" if cpu[0] else "-"
    lines.append(
        f"\nCPU µs/req: best {cpu[0]:.0f}, median {statistics.median(cpu):.0f}, "
        f"worst {cpu[-1]:.0f} (spread {spread})"
    )
    return lines


def _profile_lines(
    args: argparse.Namespace, profiled: Round, stats: pstats.Stats, best: float
) -> list[str]:
    raw: dict[FunctionKey, Any] = stats.stats  # type: ignore[attr-defined]
    n = profiled.requests
    calls = sum(entry[1] for entry in raw.values())
    lines = [
        f"profiled round: {calls / n:.0f} calls/req, "
        f"{profiled.cpu_per_request * 1e6:.0f} CPU µs/req under cProfile",
    ]
    if args.relay == "trioproxy":
        lines += ["", *_phase_lines(attribute(raw), n, best)]
    lines += ["", *_top_lines(raw, n, args.top)]
    return lines


def _phase_lines(split: PhaseSplit, n: int, best: float) -> list[str]:
    lines = [
        "| phase | share | µs/req profiled | ≈ µs/req unprofiled |",
        "|---|---|---|---|",
    ]
    for phase in PHASE_ORDER:
        seconds = split.seconds[phase]
        share = seconds / split.total if split.total else 0.0
        lines.append(
            f"| {phase} | {share * 100:.1f} % | {seconds / n * 1e6:.1f} "
            f"| {share * best * 1e6:.0f} |"
        )
    if split.unlisted:
        lines.append("\nnot in the phase table (charged to their caller's phase):")
        for label, seconds in sorted(split.unlisted.items(), key=lambda item: -item[1]):
            lines.append(f"  {label}: {seconds / n * 1e6:.1f} µs/req")
    return lines


def _top_lines(raw: dict[FunctionKey, Any], n: int, top: int) -> list[str]:
    lines = [
        f"top {top} functions by own time (under cProfile):",
        "",
        "| function | calls/req | own µs/req | cumulative µs/req |",
        "|---|---|---|---|",
    ]
    ranked = sorted(raw.items(), key=lambda item: -item[1][2])[:top]
    for key, (_cc, nc, own, cumulative, _callers) in ranked:
        lines.append(
            f"| {_label(key)} | {nc / n:.1f} | {own / n * 1e6:.1f} | {cumulative / n * 1e6:.1f} |"
        )
    return lines


# --- Command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Process CPU, calls and phases of one small proxied request."
    )
    parser.add_argument("--requests", type=int, default=5000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="unprofiled rounds")
    parser.add_argument("--warmup", type=int, default=1000, help="requests before measuring")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument("--relay", choices=["trioproxy", "floor"], default="trioproxy")
    parser.add_argument(
        "--origin-port",
        type=int,
        metavar="PORT",
        help="use the origin on 127.0.0.1:PORT (say nginx) instead of the child's canned one",
    )
    parser.add_argument(
        "--proxy-args", default="", help="more trioproxy flags, e.g. '--access-log off'"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiled round (for A/B runs)"
    )
    parser.add_argument(
        "--dump-stats", metavar="PATH", help="save the profiled round for pstats or snakeviz"
    )
    parser.add_argument("--top", type=int, default=20, help="functions in the top table")
    parser.add_argument(
        "--python-allocator",
        action="store_true",
        help="keep the interpreter's allocator (the trioproxy command switches it)",
    )
    parser.add_argument("--peers", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.peers:
        run_peers(args.connections)
        return
    if min(args.requests, args.rounds, args.connections) < 1 or args.warmup < 0:
        raise SystemExit("profile_request: --requests, --rounds, --connections must be >= 1")
    if argv is None and args.relay == "trioproxy" and not args.python_allocator:
        prepare_process_memory()  # as the trioproxy command does; may re-execute
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for h11_floor
    with tempfile.TemporaryDirectory() as tmp, restored_logging():
        result = trio.run(measure, args, str(Path(tmp) / "access.log"))
    print(report(args, result))


if __name__ == "__main__":
    main()
