# Side-by-side benchmark: trioproxy against the proxies people would otherwise use.
#
# Why: trioproxy's claim is bounded memory at a reasonable speed. A memory bound
# bought with a 10x slowdown is no bargain, and "reasonable" only means something
# next to a baseline. So one command runs the same three measurements through
# every proxy it can find, plus a direct connection, on one machine, in one run:
#
#   1. Throughput of one large download (default 1 GiB), and its ratio to direct.
#      Client: curl -o /dev/null (its %{speed_download}), else loadgen.py.
#   2. Requests/s and p50/p99 latency of 1 KiB responses on 1 and on 50
#      keep-alive connections for --duration seconds.
#      Client: wrk --latency with one thread (its Lua done() hook prints exact
#      percentiles), else loadgen.py (trio + h11, keep-alive, per-request timing).
#   3. Process CPU per request in those runs: user + system CPU seconds of the
#      proxy process and all its children (psutil, read before and after each
#      wrk run) divided by the requests wrk completed. Issue #14's targets are
#      ratios of these figures within one run (trioproxy's CPU/request to the
#      floor's, trioproxy --workers 2's req/s to proxy.py's); the script prints
#      one line per target.
#   4. Peak RSS of each proxy (process and all its children, summed; psutil,
#      sampled every 0.25 s while its measurements run).
#
# How, and what keeps it fair:
#   * Origin: nginx serving files from a tmpfs (/dev/shm) directory with sendfile,
#     so the origin is never the bottleneck and disk never enters it. Without
#     nginx: scripts/origin.py, else loadgen.py's origin (both trio; then the
#     origin competes for CPU and the direct figure is the origin's speed).
#   * Every peer gets one worker: nginx worker_processes 1, haproxy nbthread 1,
#     Python proxies are one process. tinyproxy has no such knob (one thread per
#     connection) and is a forward proxy, so it gets absolute-form requests.
#   * nginx proxies with upstream keep-alive and proxy_max_temp_file_size 0
#     (buffers in memory, never spools the download to disk); haproxy uses its
#     default connection reuse. Neither logs requests.
#   * Every proxy is started once, from a config written into a temp dir, and
#     checked with two requests on one connection. Then they are measured in
#     turn, round-robin: each step (download, c=1, c=50) runs through every
#     proxy before the next step, and the whole sequence repeats --rounds
#     times, so drift in the machine's load falls on all of them alike. Only
#     the one being measured has clients; the others sit idle. The table shows
#     each proxy's best round (highest req/s, with that round's CPU and
#     latency); the target lines compare proxies round by round. At the end
#     each is stopped by PID (SIGTERM, then SIGKILL). Everything binds 127.0.0.1.
#   * The floor (scripts/h11_floor.py) is the least a trio + h11 relay does per
#     request; proxy.py (PyPI "proxy.py", a forward proxy in pure Python, one
#     acceptor, one worker) is the nearest pure-Python peer. Each runs with
#     its defaults: trioproxy writes one access-log line per request (to a pipe
#     this script drains), proxy.py one per client connection, at its close
#     (to /dev/null), the floor none.
#   * The machine is shared and small (client, proxy and origin share its
#     cores), so figures are for comparison within one run, not absolutes. The
#     load average before and after is recorded in the JSON. Nothing here
#     asserts a timing; it prints figures.
#
# Bounded time: every client call has a timeout (download: --download-timeout;
# load: --duration plus a grace period), every server start has one, and every
# process started is stopped in a finally block, also on Ctrl-C and SIGTERM.

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import grp
import http.client
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
import psutil
from _procs import START_TIMEOUT, STOP_GRACE, ProcessFailed, RssSampler, Server, free_port

from trioproxy._units import UNITS_HELP, for_argparse, format_size, parse_duration, parse_size

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"

PEERS = (
    "direct",
    "trioproxy",
    "trioproxy-w2",
    "floor",
    "floor-w2",
    "proxy.py",
    "naive_relay",
    "nginx",
    "haproxy",
    "tinyproxy",
)
"""Every peer the bench knows, in the order they are measured in each round.
trioproxy-w2 is trioproxy with --workers 2 (its CPU is the sum of all its processes);
floor-w2 the floor likewise: what two processes of the least trio + h11 can do
beside proxy.py (target 2's reach)."""

# trioproxy-w2's process count: the machine has two cores, and issue #14's
# target 2 compares two trioproxy workers with one proxy.py worker.
TRIOPROXY_WORKERS = 2

# Body size of the request-rate test: small enough that per-request overhead
# (parsing, syscalls, scheduling) dominates, which is what req/s should show.
SMALL_SIZE = 1024

# Extra time a load run may take beyond --duration (process start, connect,
# final report) before we call it hung.
LOAD_GRACE = 30.0

# tmpfs keeps disk out of the download test; fall back to the default temp dir
# when /dev/shm is missing or too small for the file.
SHM = Path("/dev/shm")

# Where the servers live on Debian/Ubuntu when PATH is a non-root user's.
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# Environment variables that would make curl talk to some other proxy.
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

MIB = 1024 * 1024


# --- tools and sizes -------------------------------------------------------------


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=path)


def child_env() -> dict[str, str]:
    """Our environment without proxy settings (curl honours http_proxy)."""
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_ENV}


def first_output_line(argv: Sequence[str]) -> str:
    """First line a command prints (some tools print their version to stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


_VERSION = re.compile(r"\d+\.\d+[\w.+~-]*")


def tool_version(name: str, *argv: str) -> str:
    """ "nginx 1.22.1" from "nginx version: nginx/1.22.1", "wrk 4.1.0-3+b2" from
    "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."."""
    match = _VERSION.search(first_output_line(argv))
    return f"{name} {match.group(0) if match else '(version unknown)'}"


# --- the origin ----------------------------------------------------------------------


@attrs.frozen
class Origin:
    kind: str
    url: str  # http://127.0.0.1:PORT
    big_path: str
    small_path: str

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")


def make_workdir(size: int) -> Path:
    """A temp dir for configs and files; on tmpfs if it has room for the big file."""
    parent = None
    if SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free > size * 1.2:
        parent = str(SHM)
    work = Path(tempfile.mkdtemp(prefix="trioproxy-bench-", dir=parent))
    # nginx workers run as nobody when we are root; they must read the files.
    work.chmod(0o755)
    return work


def write_file(path: Path, size: int) -> None:
    """Write `size` bytes of a repeating non-zero pattern (real pages, not a sparse hole)."""
    block = bytes(range(256)) * (MIB // 256)
    with path.open("wb") as out:
        remaining = size
        while remaining:
            chunk = block if remaining >= len(block) else block[:remaining]
            out.write(chunk)
            remaining -= len(chunk)
    path.chmod(0o644)


def nginx_user_line() -> str:
    """nginx as root drops workers to nobody; name its primary group (nogroup on Debian)."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"


def nginx_common(work: Path, name: str) -> str:
    """The parts of an nginx config that keep it inside our temp dir, quiet, one worker."""
    temp = work / f"{name}-temp"
    temp.mkdir(mode=0o777, exist_ok=True)
    return f"""
{nginx_user_line()}
worker_processes 1;
daemon off;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""


def nginx_http_common(work: Path, name: str) -> str:
    temp = work / f"{name}-temp"
    paths = "\n".join(
        f"    {kind}_temp_path {temp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # keepalive_requests: the default (1000) would close wrk's connection every
    # 1000 responses and turn a keep-alive test into a reconnect test.
    return f"""
    access_log off;
{paths}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
"""


def start_nginx_process(nginx: str, work: Path, name: str, conf: str, port: int) -> Server:
    path = work / f"{name}.conf"
    path.write_text(conf)
    server = Server(
        name, [nginx, "-p", str(work), "-c", str(path), "-e", str(work / f"{name}-error.log")]
    )
    try:
        server.wait_for_port(port)
    except ProcessFailed:
        server.stop()
        raise
    return server


def start_nginx_origin(nginx: str, work: Path, size: int, stack: contextlib.ExitStack) -> Origin:
    docroot = work / "docroot"
    docroot.mkdir(mode=0o755)
    write_file(docroot / "big", size)
    write_file(docroot / "small", SMALL_SIZE)
    port = free_port()
    conf = (
        nginx_common(work, "nginx-origin")
        + f"""
http {{
{nginx_http_common(work, "nginx-origin")}
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
    }}
}}
"""
    )
    stack.enter_context(start_nginx_process(nginx, work, "nginx-origin", conf, port))
    return Origin("nginx (files on tmpfs)", f"http://127.0.0.1:{port}", "/big", "/small")


def start_python_origin(size: int, stack: contextlib.ExitStack) -> Origin:
    origin_py = SCRIPTS / "origin.py"
    if origin_py.exists():
        kind, argv = "scripts/origin.py", [sys.executable, str(origin_py)]
    else:
        kind, argv = "loadgen.py origin", [sys.executable, str(SCRIPTS / "loadgen.py"), "origin"]
    server = stack.enter_context(Server("origin", [*argv, "--listen", "127.0.0.1:0"], cwd=REPO))
    url = server.wait_for_url()
    return Origin(kind, url, f"/bytes/{size}", "/small")


# --- the proxies ------------------------------------------------------------------------


@attrs.frozen
class Running:
    """A proxy ready for clients. `via` is set for forward proxies (absolute-form)."""

    server: Server | None
    connect: str  # host:port the client connects to
    via: bool = False


Starter = Callable[[Path, Origin, argparse.Namespace], Running]


def start_direct(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    return Running(None, origin.hostport)


def start_python_proxy(name: str, argv: list[str]) -> Running:
    env = child_env()
    # Benchmark this worktree's package, not whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    server = Server(name, argv, cwd=REPO, env=env)
    try:
        url = server.wait_for_url()
    except ProcessFailed:
        server.stop()
        raise
    return Running(server, url.removeprefix("http://"))


def start_on_port(name: str, argv: list[str], port: int, *, via: bool = False) -> Running:
    """Start a server that listens where its config says, and wait for that port."""
    server = Server(name, argv, env=child_env())
    try:
        server.wait_for_port(port)
    except ProcessFailed:
        server.stop()
        raise
    return Running(server, f"127.0.0.1:{port}", via=via)


def trioproxy_argv(origin: Origin, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "trioproxy", "--listen", "127.0.0.1:0"]
    return [*argv, "--upstream", origin.url, *shlex.split(args.trioproxy_args)]


def start_trioproxy(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    return start_python_proxy("trioproxy", trioproxy_argv(origin, args))


def start_trioproxy_workers(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    argv = [*trioproxy_argv(origin, args), "--workers", str(TRIOPROXY_WORKERS)]
    return start_python_proxy("trioproxy-w2", argv)


def start_script_relay(name: str, script: str, origin: Origin) -> Running:
    """A relay from scripts/ that takes --listen and --upstream and announces its URL."""
    argv = [sys.executable, str(SCRIPTS / script), "--listen", "127.0.0.1:0"]
    return start_python_proxy(name, [*argv, "--upstream", origin.url])


def start_floor(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    return start_script_relay("floor", "h11_floor.py", origin)


def start_floor_workers(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    argv = [sys.executable, str(SCRIPTS / "h11_floor.py"), "--listen", "127.0.0.1:0"]
    argv += ["--workers", str(TRIOPROXY_WORKERS), "--upstream", origin.url]
    return start_python_proxy("floor-w2", argv)


def start_naive_relay(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    return start_script_relay("naive_relay", "naive_relay.py", origin)


def start_proxy_py(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    # A forward proxy (absolute-form requests, like tinyproxy). One acceptor
    # process that also does the work (its default --local-executor 1), one
    # worker: the single-process setting issue #14's target 2 compares with.
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port)]
    argv += ["--num-acceptors", "1", "--num-workers", "1"]
    return start_on_port("proxy.py", argv, port, via=True)


def start_nginx_proxy(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    nginx = which("nginx")
    assert nginx is not None
    port = free_port()
    conf = (
        nginx_common(work, "nginx-proxy")
        + f"""
http {{
{nginx_http_common(work, "nginx-proxy")}
    upstream origin {{
        server {origin.hostport};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    )
    server = start_nginx_process(nginx, work, "nginx-proxy", conf, port)
    return Running(server, f"127.0.0.1:{port}")


# One thread (one worker, as every peer), HTTP keep-alive both ways, default
# connection reuse; shared by the TLS rows (_benchtls).
HAPROXY_COMMON = """
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""


def start_haproxy(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    haproxy = which("haproxy")
    assert haproxy is not None
    port = free_port()
    conf = work / "haproxy.cfg"
    conf.write_text(f"""{HAPROXY_COMMON}
frontend bench
    bind 127.0.0.1:{port}
    default_backend origin

backend origin
    server origin {origin.hostport}
""")
    return start_on_port("haproxy", [haproxy, "-db", "-f", str(conf)], port)


def start_tinyproxy(work: Path, origin: Origin, args: argparse.Namespace) -> Running:
    tinyproxy = which("tinyproxy")
    assert tinyproxy is not None
    port = free_port()
    # As root tinyproxy drops to an unprivileged user; it must still write its log.
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    logdir = work / "tinyproxy"
    logdir.mkdir(mode=0o777, exist_ok=True)
    logdir.chmod(0o777)
    conf = work / "tinyproxy.conf"
    conf.write_text(f"""{user}Port {port}
Listen 127.0.0.1
Timeout 120
MaxClients 1024
Allow 127.0.0.1
LogLevel Error
LogFile "{logdir}/tinyproxy.log"
PidFile "{logdir}/tinyproxy.pid"
""")
    return start_on_port("tinyproxy", [tinyproxy, "-d", "-c", str(conf)], port, via=True)


def importable(module: str) -> bool:
    """Whether this interpreter can import `module` (tried in a child, not here)."""
    argv = [sys.executable, "-c", f"import {module}"]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def available(name: str, args: argparse.Namespace) -> tuple[Starter | None, str]:
    """The starter for a peer, or None and the reason it is skipped."""
    if name == "direct":
        return start_direct, ""
    if name in ("trioproxy", "trioproxy-w2"):
        if not (REPO / "trioproxy" / "__main__.py").exists():
            return None, "trioproxy/__main__.py not in this checkout yet"
        return (start_trioproxy if name == "trioproxy" else start_trioproxy_workers), ""
    scripts: dict[str, tuple[str, Starter]] = {
        "floor": ("h11_floor.py", start_floor),
        "floor-w2": ("h11_floor.py", start_floor_workers),
        "naive_relay": ("naive_relay.py", start_naive_relay),
    }
    if name in scripts:
        script, starter = scripts[name]
        if not (SCRIPTS / script).exists():
            return None, f"scripts/{script} not in this checkout"
        return starter, ""
    if name == "proxy.py":
        if not importable("proxy"):
            return None, f"{sys.executable} cannot import proxy; pip install proxy.py"
        return start_proxy_py, ""
    starters: dict[str, Starter] = {
        "nginx": start_nginx_proxy,
        "haproxy": start_haproxy,
        "tinyproxy": start_tinyproxy,
    }
    if which(name) is None:
        return None, f"{name} not installed; apt-get install {name}"
    return starters[name], ""


# --- the clients ---------------------------------------------------------------------------


def request_target(running: Running, origin: Origin, path: str) -> tuple[str, str]:
    """(URL the client is given, request-target it sends); absolute-form via a forward proxy."""
    if running.via:
        return f"http://{origin.hostport}{path}", f"http://{origin.hostport}{path}"
    return f"http://{running.connect}{path}", path


def _get_small(conn: http.client.HTTPConnection, target: str, host: str) -> str | None:
    conn.request("GET", target, headers={"Host": host})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200 or len(body) != SMALL_SIZE:
        return f"check request got {response.status} with {len(body)} bytes"
    return None


def check_proxy(running: Running, origin: Origin) -> tuple[str | None, bool]:
    """Two GETs of the small file through the proxy on one connection.

    Returns:
        (None if the first worked, else why not; whether the proxy closed the
        connection after the first response, i.e. offers no keep-alive. tinyproxy
        does this without saying "Connection: close", so we try a second request.)
    """
    host, _, port = running.connect.rpartition(":")
    _, target = request_target(running, origin, origin.small_path)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        try:
            problem = _get_small(conn, target, origin.hostport)
        except (OSError, http.client.HTTPException) as exc:
            return f"check request failed: {exc!r}", False
        if problem or conn.sock is None:  # sock is None: it said Connection: close
            return problem, True
        try:
            _get_small(conn, target, origin.hostport)
        except (OSError, http.client.HTTPException):
            return None, True
        return None, False
    finally:
        conn.close()


def run_json(argv: Sequence[str], timeout: float, marker: str = "") -> dict[str, Any]:
    """Run a client; return the JSON object on the last stdout line `marker` + "{...}"."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=child_env()
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(marker + "{"):
            result: dict[str, Any] = json.loads(line.removeprefix(marker))
            return result
    raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[-500:]}")


def download(
    running: Running, origin: Origin, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One download of the big file; bytes, seconds, MiB/s."""
    url, _ = request_target(running, origin, origin.big_path)
    curl = which("curl")
    if curl and args.client == "auto":
        argv = [curl, "-sS", "-o", "/dev/null", "--max-time", str(args.download_timeout)]
        # %{json} (curl >= 7.70): every -w variable, properly quoted.
        argv += ["-w", "%{json}\\n"]
        if running.via:
            argv += ["-x", f"http://{running.connect}"]
        raw = run_json([*argv, url], args.download_timeout + LOAD_GRACE)
        if raw.get("exitcode"):
            raise RuntimeError(f"curl: {raw.get('errormsg')}")
        result = {
            "status": raw["http_code"],
            "bytes": raw["size_download"],
            "bytes_per_s": raw["speed_download"],
            "seconds": raw["time_total"],
        }
    else:
        argv = [sys.executable, str(SCRIPTS / "loadgen.py"), "download", url]
        if running.via:
            argv += ["--via", running.connect]
        result = run_json(argv, args.download_timeout)
    if result["status"] != 200 or result["bytes"] != size:
        raise RuntimeError(f"download got status {result['status']}, {result['bytes']} bytes")
    return {
        "bytes": result["bytes"],
        "seconds": result["seconds"],
        "mib_per_s": result["bytes_per_s"] / MIB,
    }


WRK_SCRIPT = """-- written by scripts/bench.py: request path and exact percentiles as JSON
wrk.path = "{path}"
wrk.headers["Host"] = "{host}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, ' ..
    '"errors": %d, "non_2xx": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def load_wrk(
    wrk: str, running: Running, origin: Origin, connections: int, args: argparse.Namespace
) -> dict[str, Any]:
    _, target = request_target(running, origin, origin.small_path)
    script = args.workdir / "bench.lua"
    script.write_text(WRK_SCRIPT.format(path=target, host=origin.hostport))
    # One thread: wrk drives 50 connections from one thread easily, and the
    # other core stays for the proxy and the origin.
    argv = [wrk, "-t1", f"-c{connections}", f"-d{args.duration:g}s", "--latency"]
    argv += ["-s", str(script), f"http://{running.connect}/"]
    raw = run_json(argv, args.duration + LOAD_GRACE, "BENCH_JSON ")
    return {
        "requests": raw["requests"],
        "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": raw["errors"],
        "non_2xx": raw["non_2xx"],
    }


def load_client(
    running: Running, origin: Origin, connections: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Requests/s and latency of the small file on `connections` keep-alive connections."""
    wrk = which("wrk")
    if wrk and args.client == "auto":
        return load_wrk(wrk, running, origin, connections, args)
    url, _ = request_target(running, origin, origin.small_path)
    argv = [sys.executable, str(SCRIPTS / "loadgen.py"), "load", url]
    argv += ["--connections", str(connections), "--duration", str(args.duration)]
    if running.via:
        argv += ["--via", running.connect]
    return run_json(argv, args.duration + LOAD_GRACE)


# --- CPU per request -----------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and each of its descendants, by PID.

    Children matter: trioproxy --workers and proxy.py do their work in child
    processes, nginx in its worker. A process that is gone reads as absent.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    seconds = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            seconds[proc.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the processes in `after` spent since `before` (new ones: all of theirs).

    A process that exited in between is missing from `after` and its share is
    lost; the proxies here keep their processes for the whole run.
    """
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def load(
    running: Running, origin: Origin, connections: int, args: argparse.Namespace
) -> dict[str, Any]:
    """load_client's figures plus the proxy's CPU per completed request (µs)."""
    if running.server is None:
        return load_client(running, origin, connections, args)
    before = tree_cpu_seconds(running.server.pid)
    figures = load_client(running, origin, connections, args)
    cpu = cpu_used(before, tree_cpu_seconds(running.server.pid))
    figures["cpu_seconds"] = cpu
    requests = figures["requests"]
    figures["cpu_us_per_request"] = cpu * 1e6 / requests if requests else None
    return figures


# --- all peers, round-robin ------------------------------------------------------------------


@attrs.define
class Result:
    """One peer's figures. `download` and `load` hold its best round (highest
    MiB/s; highest req/s per connection count); `rounds` holds every round."""

    name: str
    download: dict[str, Any] | None = None
    ratio_to_direct: float | None = None
    load: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    rounds: list[dict[str, Any]] = attrs.field(factory=list)
    rss_start_mib: float | None = None
    peak_rss_mib: float | None = None
    end_rss_mib: float | None = None  # after the last client left: is memory given back?
    rss_samples: int = 0
    closes_connections: bool = False
    errors: list[str] = attrs.field(factory=list)


@attrs.define
class Live:
    """A peer that started and answered its check: what the rounds measure."""

    result: Result
    running: Running
    sampler: RssSampler | None


def attempt(result: Result, what: str, func: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Run one measurement; a failure is recorded and the run goes on."""
    try:
        return func()
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        result.errors.append(f"{what}: {exc}")
        return None


def start_peer(
    name: str,
    starter: Starter,
    origin: Origin,
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
) -> tuple[Result, Live | None]:
    """Start a peer (stopped when `stack` closes) and check it; None if it failed."""
    result = Result(name)
    print(f"--- starting {name}", file=sys.stderr, flush=True)
    try:
        running = starter(args.workdir, origin, args)
    except ProcessFailed as exc:
        result.errors.append(str(exc))
        return result, None
    if running.server is not None:
        stack.callback(running.server.stop)
    problem, result.closes_connections = check_proxy(running, origin)
    if problem:
        result.errors.append(problem)
        return result, None
    sampler = RssSampler(running.server.pid) if running.server is not None else None
    return result, Live(result, running, sampler)


def measure_step(
    live: Live, step: int | None, origin: Origin, args: argparse.Namespace
) -> dict[str, Any] | None:
    """One download (step None) or one load run at `step` connections, RSS sampled."""
    if step is None:
        what, func = "download", functools.partial(download, live.running, origin, args.size, args)
    else:
        what = f"load c={step}"
        func = functools.partial(load, live.running, origin, step, args)
    if live.sampler is None:
        return attempt(live.result, what, func)
    first = live.sampler.samples == 0
    with live.sampler.running():
        if first:
            live.result.rss_start_mib = live.sampler.peak_bytes / MIB
        return attempt(live.result, what, func)


def run_rounds(lives: list[Live], origin: Origin, args: argparse.Namespace) -> None:
    """Every step through every peer in turn, --rounds times."""
    steps: list[int | None] = [None] if args.download else []
    steps += args.connections
    for n in range(1, args.rounds + 1):
        for live in lives:
            live.result.rounds.append({"download": None, "load": {}})
        for step in steps:
            for live in lives:
                what = "download" if step is None else f"c={step}"
                print(
                    f"--- round {n}/{args.rounds}, {what}: {live.result.name}",
                    file=sys.stderr,
                    flush=True,
                )
                figures = measure_step(live, step, origin, args)
                this_round = live.result.rounds[-1]
                if step is None:
                    this_round["download"] = figures
                elif figures is not None:
                    this_round["load"][str(step)] = figures


def keep_best(live: Live) -> None:
    """Fill the result's best-round figures and its RSS summary."""
    result = live.result
    downloads = [r["download"] for r in result.rounds if r["download"]]
    result.download = max(downloads, key=lambda d: d["mib_per_s"], default=None)
    for r in result.rounds:
        for c, figures in r["load"].items():
            best = result.load.get(c)
            if best is None or figures["requests_per_s"] > best["requests_per_s"]:
                result.load[c] = figures
    if live.sampler is not None and live.sampler.samples:
        result.peak_rss_mib = live.sampler.peak_bytes / MIB
        result.end_rss_mib = live.sampler.last_bytes / MIB
        result.rss_samples = live.sampler.samples


def add_ratios(results: list[Result]) -> None:
    direct = next((r for r in results if r.name == "direct" and r.download), None)
    if direct is None or direct.download is None:
        return
    for result in results:
        if result.download:
            result.ratio_to_direct = result.download["mib_per_s"] / direct.download["mib_per_s"]


# --- issue #14's targets: ratios within one round ------------------------------------------


@attrs.frozen
class Target:
    """top / bottom, each a (peer, figure) at the same connection count in the same round."""

    label: str
    top: tuple[str, str]
    bottom: tuple[str, str]
    bound: float
    lower_is_better: bool
    connections: tuple[int, ...]
    # False for a yardstick line: the same ratio for a peer that is not
    # trioproxy, printed without a verdict.
    is_target: bool = True


TARGETS = (
    Target(
        "1, CPU/request trioproxy / floor",
        ("trioproxy", "cpu_us_per_request"),
        ("floor", "cpu_us_per_request"),
        1.3,
        lower_is_better=True,
        connections=(50,),
    ),
    Target(
        "2, req/s trioproxy-w2 / proxy.py",
        ("trioproxy-w2", "requests_per_s"),
        ("proxy.py", "requests_per_s"),
        1.0,
        lower_is_better=False,
        connections=(1, 50),
    ),
    Target(
        "2's reach, req/s floor-w2 / proxy.py",
        ("floor-w2", "requests_per_s"),
        ("proxy.py", "requests_per_s"),
        1.0,
        lower_is_better=False,
        connections=(1, 50),
        is_target=False,
    ),
    Target(
        "3, p99 / p50 trioproxy",
        ("trioproxy", "p99_ms"),
        ("trioproxy", "p50_ms"),
        3.0,
        lower_is_better=True,
        connections=(50,),
    ),
)
"""Issue #14's targets 1-3, each at the connection counts the issue names, and
what two floor processes reach beside proxy.py: target 2's ceiling for any
proxy built on trio + h11."""


def round_figure(result: Result, n: int, c: int, key: str) -> float | None:
    figures = result.rounds[n]["load"].get(str(c)) if n < len(result.rounds) else None
    value = figures.get(key) if figures else None
    return float(value) if value else None


def target_line(target: Target, by_name: dict[str, Result], c: int, rounds: int) -> str:
    head = f"target {target.label}, c={c}"
    missing = [p for p in (target.top[0], target.bottom[0]) if p not in by_name]
    if missing:
        return f"{head}: not measured ({', '.join(missing)} not run)"
    top, bottom = by_name[target.top[0]], by_name[target.bottom[0]]
    ratios = []
    for n in range(rounds):
        a = round_figure(top, n, c, target.top[1])
        b = round_figure(bottom, n, c, target.bottom[1])
        ratios.append(a / b if a is not None and b is not None else None)
    measured = [r for r in ratios if r is not None]
    if not measured:
        return f"{head}: not measured (no round has both figures)"
    best = min(measured) if target.lower_is_better else max(measured)
    met = best <= target.bound if target.lower_is_better else best >= target.bound
    sign = "<=" if target.lower_is_better else ">="
    each = ", ".join(cell(r, ".2f") for r in ratios)
    if not target.is_target:
        return f"{head}: best {best:.2f} (rounds: {each}); a yardstick, no target"
    verdict = "met" if met else "not met"
    return f"{head}: best {best:.2f} (rounds: {each}); target {sign} {target.bound:g}: {verdict}"


def target_lines(results: list[Result], args: argparse.Namespace) -> list[str]:
    by_name = {r.name: r for r in results}
    lines = []
    for target in TARGETS:
        for c in target.connections:
            if c in args.connections:
                lines.append(target_line(target, by_name, c, args.rounds))
            else:
                lines.append(f"target {target.label}, c={c}: not measured (c={c} not run)")
    return lines


# --- output ----------------------------------------------------------------------------------


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def latency_cell(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "-"
    return f"{cell(figures['p50_ms'], '.2f')} / {cell(figures['p99_ms'], '.2f')}"


def markdown_table(results: list[Result], args: argparse.Namespace) -> str:
    head = ["proxy"]
    if args.download:
        head += [f"{format_size(args.size)} MiB/s", "vs direct"]
    for c in args.connections:
        head += [f"req/s c={c}", f"CPU µs/req c={c}", f"p50 / p99 ms c={c}"]
    # Start next to peak: a Python proxy's ~25 MiB is mostly the interpreter,
    # and the growth during a 1 GiB download is what the bound is about.
    head.append("RSS MiB start / peak")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name]
        if args.download:
            row.append(cell(r.download["mib_per_s"] if r.download else None, ".0f"))
            row.append(cell(r.ratio_to_direct, ".2f"))
        for c in args.connections:
            figures = r.load.get(str(c)) or {}
            row.append(cell(figures.get("requests_per_s"), ".0f"))
            row.append(cell(figures.get("cpu_us_per_request"), ".0f"))
            row.append(latency_cell(figures))
        rss = f"{cell(r.rss_start_mib, '.1f')} / {cell(r.peak_rss_mib, '.1f')}"
        row.append(rss if r.name != "direct" else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def error_notes(r: Result) -> list[str]:
    out = []
    for n, one_round in enumerate(r.rounds, start=1):
        for c, figures in one_round["load"].items():
            bad = figures.get("errors", 0) + figures.get("non_2xx", 0)
            where = f"{r.name}: round {n}, c={c}"
            if bad and r.closes_connections and not figures.get("non_2xx"):
                out.append(
                    f"{where}: {bad} socket errors for {figures['requests']}"
                    " responses (the closes above, if about one per response)"
                )
            elif bad:
                out.append(f"{where}: {bad} socket errors or non-2xx responses")
    return out


def notes(results: list[Result], skipped: dict[str, str], missing: list[str]) -> list[str]:
    out = [*missing, *(f"{name}: skipped ({why})" for name, why in skipped.items())]
    for r in results:
        out += [f"{r.name}: {error}" for error in r.errors]
        if r.closes_connections:
            out.append(
                f"{r.name}: closes the client connection after every response (no keep-alive),"
                " so each request pays a TCP connect; the client reconnects (wrk counts each"
                " close as a read error, loadgen.py as closed_by_server)"
            )
        out += error_notes(r)
    return out


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark trioproxy side by side with direct, the h11 floor, proxy.py, "
        "naive_relay, nginx, haproxy and tinyproxy (whichever are present), round-robin.",
        epilog=UNITS_HELP,
    )
    parser.add_argument(
        "--size",
        type=for_argparse(parse_size),
        default=parse_size("1GiB"),
        help="download size (default 1GiB; 100MB = 10^8, 100MiB = 100*2^20)",
    )
    parser.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="skip the download rows (only the requests/s runs)",
    )
    parser.add_argument(
        "--duration",
        type=for_argparse(parse_duration),
        default=10.0,
        help="seconds per requests/s run (default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="times every step runs through every peer, alternating (default 3)",
    )
    parser.add_argument(
        "--connections",
        default="1,50",
        help="keep-alive connection counts for the req/s runs (default 1,50)",
    )
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(PEERS)}")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also the TLS rows: trioproxy and haproxy terminating TLS, reaching a TLS "
        "origin, and new TLS connections/s (scripts/_benchtls.py)",
    )
    parser.add_argument(
        "--tls-only",
        action="store_true",
        help="only the TLS rows (the other peers are not run)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "results" / "bench.json",
        help="where to write the results (default results/bench.json)",
    )
    parser.add_argument(
        "--trioproxy-args",
        default="",
        help="extra arguments for python -m trioproxy, one string; write it with '=' "
        "(--trioproxy-args='--read-size 64KiB') so it is not taken for an option of ours",
    )
    parser.add_argument(
        "--download-timeout",
        type=for_argparse(parse_duration),
        default=120.0,
        help="seconds a single download may take (default 120)",
    )
    parser.add_argument(
        "--client",
        choices=["auto", "bundled"],
        default="auto",
        help="auto: curl and wrk when installed; bundled: always loadgen.py",
    )
    parser.add_argument(
        "--origin",
        choices=["auto", "bundled"],
        default="auto",
        help="auto: nginx when installed; bundled: the trio origin",
    )
    args = parser.parse_args(argv)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections wants numbers like 1,50, got {args.connections!r}")
    if not args.connections or min(args.connections) < 1:
        parser.error("--connections needs at least one count >= 1")
    if args.rounds < 1:
        parser.error("--rounds needs at least 1")
    names = args.only.split(",") if args.only else list(PEERS)
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    args.peers = [] if args.tls_only else [p for p in PEERS if p in names]
    args.tls = args.tls or args.tls_only
    return args


def meta(args: argparse.Namespace, origin: Origin) -> dict[str, Any]:
    curl, wrk = which("curl"), which("wrk")
    auto = args.client == "auto"
    versions = {}
    for tool, flag in (("nginx", "-v"), ("haproxy", "-v"), ("tinyproxy", "-v")):
        path = which(tool)
        if path:
            versions[tool] = tool_version(tool, path, flag)
    if "proxy.py" in args.peers:
        versions["proxy.py"] = tool_version("proxy.py", sys.executable, "-m", "proxy", "--version")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "size_bytes": args.size,
        "small_bytes": SMALL_SIZE,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "download": args.download,
        "connections": args.connections,
        "origin": origin.kind,
        "download_client": tool_version("curl", curl, "--version")
        if curl and auto
        else "loadgen.py",
        "load_client": (tool_version("wrk", wrk, "--version") + " -t1")
        if wrk and auto
        else "loadgen.py",
        "python": sys.version.split()[0],
        "commit": first_output_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "trioproxy_args": args.trioproxy_args,
        "trioproxy_workers": TRIOPROXY_WORKERS,
        "versions": versions,
    }


def raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workdir(size: int) -> Iterator[Path]:
    path = make_workdir(size)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def missing_tools(args: argparse.Namespace) -> list[str]:
    """What the preferred setup lacks on this machine, and what is used instead."""
    out = []
    if args.client == "auto" and which("wrk") is None:
        out.append(
            "missing: wrk (apt-get install wrk); req/s measured with scripts/loadgen.py, "
            "which is itself slower than the faster proxies here"
        )
    if args.client == "auto" and args.download and which("curl") is None:
        out.append("missing: curl (apt-get install curl); downloads read by scripts/loadgen.py")
    if args.origin == "auto" and which("nginx") is None:
        out.append(
            "missing: nginx (apt-get install nginx); the origin is scripts/origin.py, "
            "which competes with the proxy for CPU"
        )
    return out


def peer_starters(args: argparse.Namespace) -> tuple[list[tuple[str, Starter]], dict[str, str]]:
    """The peers that can run here, and why each of the others cannot."""
    skipped: dict[str, str] = {}
    starters: list[tuple[str, Starter]] = []
    for name in args.peers:
        starter, why = available(name, args)
        if starter is None:
            skipped[name] = why
        else:
            starters.append((name, starter))
    return starters, skipped


def run(args: argparse.Namespace, missing: list[str]) -> dict[str, Any]:
    starters, skipped = peer_starters(args)
    for name, why in skipped.items():
        print(f"bench: {name} skipped: {why}", file=sys.stderr, flush=True)
    size = args.size if args.download or args.tls else SMALL_SIZE
    tls: dict[str, Any] | None = None
    with workdir(size) as work, contextlib.ExitStack() as stack:
        args.workdir = work
        nginx = which("nginx")
        if nginx and args.origin == "auto":
            origin = start_nginx_origin(nginx, work, size, stack)
        else:
            origin = start_python_origin(size, stack)
        info = meta(args, origin)
        print(f"origin: {origin.kind} at {origin.url}", file=sys.stderr, flush=True)
        started = [start_peer(name, starter, origin, args, stack) for name, starter in starters]
        lives = [live for _, live in started if live is not None]
        run_rounds(lives, origin, args)
        for live in lives:
            keep_best(live)
        if args.tls:
            from _benchtls import run_tls  # imports this module: not at the top

            tls = run_tls(args, stack)
    results = [result for result, _ in started]
    add_ratios(results)
    info["loadavg_after"] = os.getloadavg()
    return {
        "meta": info,
        "results": [attrs.asdict(r) for r in results],
        "skipped": skipped,
        "table": markdown_table(results, args),
        "targets": target_lines(results, args),
        "notes": notes(results, skipped, missing),
        "tls": tls,
    }


def announce_duration(args: argparse.Namespace) -> None:
    peers = len(args.peers)
    per_round = len(args.connections) * args.duration + (2 if args.download else 0)
    expected = peers * (2 + args.rounds * per_round)
    step_worst = (args.download_timeout + LOAD_GRACE if args.download else 0) + len(
        args.connections
    ) * (args.duration + LOAD_GRACE)
    worst = peers * (START_TIMEOUT + STOP_GRACE + args.rounds * step_worst)
    print(
        f"bench: about {expected:.0f} s if all goes well, at most {worst / 60:.0f} min"
        " if every step times out",
        file=sys.stderr,
        flush=True,
    )


def print_report(report: dict[str, Any], args: argparse.Namespace, seconds: float) -> None:
    m = report["meta"]
    downloader = m["download_client"] if m["download"] else "skipped"
    print()
    print(
        f"origin: {m['origin']}; download: {downloader}; load: {m['load_client']};"
        f" {m['rounds']} round(s), best round shown"
    )
    print(
        f"{m['cpus']} CPUs, load average before/after: "
        f"{m['loadavg_before'][0]:.2f} / {m['loadavg_after'][0]:.2f}; "
        f"{seconds:.0f} s in total"
    )
    if args.peers:
        print()
        print(report["table"])
        print()
        for line in report["targets"]:
            print(line)
    for note in report["notes"]:
        print(f"- {note}")
    if report.get("tls"):
        from _benchtls import print_tls

        print_tls(report["tls"])
    print(f"\nwritten to {args.json}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    started = time.monotonic()
    missing = missing_tools(args)
    for line in missing:
        print(f"bench: {line}", file=sys.stderr, flush=True)
    announce_duration(args)
    try:
        report = run(args, missing)
    except ProcessFailed as exc:
        print(f"bench: the origin did not start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # run()'s finally blocks have stopped every process and removed the temp dir.
        print("\ninterrupted; all benchmark processes stopped, nothing written", file=sys.stderr)
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, args, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
