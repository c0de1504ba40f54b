"""``--workers N``: the supervisor, its workers, and the shared port.

Plain tests cover the sans-I/O parts (command line, ready line, backoff) and
the config's validation; in-process tests cover the SO_REUSEPORT listeners
and the worker's link; a few real-process tests run ``python -m trioproxy
--workers 2`` on 127.0.0.1 port 0 and watch its children with psutil. Their
only waits on real time are bounded polls (``eventually``), never asserts on
durations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import psutil
import pytest
import trio
import trio.testing

from trioproxy import ProxyConfig
from trioproxy import _config as config_module
from trioproxy._cli import build_parser, main
from trioproxy._listen import open_reuse_port_listeners
from trioproxy._server import serve
from trioproxy._workers import (
    MAX_READY_LINE,
    WORKER_FD_ENV,
    WORKER_INDEX_ENV,
    RestartBackoff,
    WorkerLink,
    describe_exit,
    parse_ready_line,
    read_ready,
    ready_line,
    worker_command,
)

from .helpers import (
    CHUNK,
    CHUNKS,
    PROMPTLY,
    ROOT,
    GatedOrigin,
    LineReader,
    args_for_a_quiet_start,
    download,
)
from .tlskit import make_pki

# How often a bounded poll looks again; short against PROMPTLY, long enough
# not to busy the 2 cores the other processes need.
POLL_SECONDS = 0.05

# ---- Sans-I/O ----


def test_backoff_doubles_up_to_the_ceiling_and_resets_after_a_healthy_run() -> None:
    """Quick deaths in a row double the delay up to the ceiling; a worker that
    ran ``healthy_uptime`` seconds restarts after the first delay again."""
    backoff = RestartBackoff(first=0.1, ceiling=0.5, healthy_uptime=30.0)
    delays = [backoff.delay_after(1.0) for _ in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.delay_after(30.0) == 0.1
    assert backoff.delay_after(29.9) == 0.2


def test_worker_command_overrides_listen_and_workers_and_keeps_the_rest() -> None:
    """The worker runs this interpreter's trioproxy with the user's flags, but
    listens on the concrete port and is a single process."""
    argv = ["--listen", "127.0.0.1:0", "--workers", "4", "--read-size", "16k"]
    command = worker_command(argv, "127.0.0.1", 4321)
    assert command[:3] == [sys.executable, "-m", "trioproxy"]
    args = build_parser().parse_args(command[3:])
    assert args.listen == ("127.0.0.1", 4321)
    assert args.workers == 1
    assert args.read_size == 16 * 1024


def test_worker_command_brackets_an_ipv6_host() -> None:
    """An IPv6 listen address survives the round trip through ``--listen``."""
    args = build_parser().parse_args(worker_command([], "::1", 8080)[3:])
    assert args.listen == ("::1", 8080)


def test_ready_line_round_trip_and_rejects_garbage() -> None:
    """What a worker writes is what the supervisor reads; anything else is a
    ValueError (the supervisor then treats the worker as not started)."""
    assert parse_ready_line(ready_line("127.0.0.1", 8080)) == ("127.0.0.1", 8080)
    with pytest.raises(ValueError, match="unpack"):
        parse_ready_line(b"127.0.0.1\n")
    with pytest.raises(ValueError, match="invalid literal"):
        parse_ready_line(b"127.0.0.1 http\n")


def test_describe_exit() -> None:
    """Exit statuses and signals are told apart in the restart log."""
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"


def test_worker_link_comes_from_the_environment() -> None:
    """Only a process with both variables is a worker."""
    assert WorkerLink.from_environ({}) is None
    assert WorkerLink.from_environ({WORKER_FD_ENV: "5"}) is None
    link = WorkerLink.from_environ({WORKER_FD_ENV: "5", WORKER_INDEX_ENV: "1"})
    assert link == WorkerLink(index=1, fd=5)


def test_worker_config_shares_the_port_and_shifts_the_metrics_port() -> None:
    """A worker listens with SO_REUSEPORT, and on the metrics port + its index;
    a metrics port of 0 stays 0, and no metrics stays none."""
    link = WorkerLink(index=1, fd=5)
    config = link.worker_config(ProxyConfig(metrics_listen=("127.0.0.1", 9100)))
    assert config.reuse_port
    assert config.metrics_listen == ("127.0.0.1", 9101)
    assert WorkerLink(index=0, fd=5).worker_config(config).metrics_listen == ("127.0.0.1", 9101)
    any_port = link.worker_config(ProxyConfig(metrics_listen=("127.0.0.1", 0)))
    assert any_port.metrics_listen == ("127.0.0.1", 0)
    assert link.worker_config(ProxyConfig()).metrics_listen is None


@pytest.mark.parametrize("count", [0, -1, 1025])
def test_config_refuses_a_worker_count_out_of_range(count: int) -> None:
    """The count is validated where every other value is."""
    with pytest.raises(ValueError, match=f"workers must be between 1 and 1024, got {count}"):
        ProxyConfig(workers=count)


def test_config_refuses_several_workers_without_reuse_port_balancing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where SO_REUSEPORT does not balance, one worker is fine and more are refused."""
    monkeypatch.setattr(config_module, "reuse_port_balances", lambda: False)
    assert ProxyConfig(workers=1).workers == 1
    with pytest.raises(ValueError, match="workers > 1 needs SO_REUSEPORT"):
        ProxyConfig(workers=2)
    with pytest.raises(ValueError, match="reuse_port needs SO_REUSEPORT"):
        ProxyConfig(reuse_port=True)


@pytest.mark.parametrize("count", ["0", "-2"])
def test_cli_refuses_bad_worker_count_with_one_line_and_status_2(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workers 0`` or a negative count: exit status 2, one line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--workers", count])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"trioproxy: error: workers must be between 1 and 1024, got {count}\n"


def test_cli_refuses_several_workers_without_reuse_port_balancing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a platform without SO_REUSEPORT balancing, ``--workers 2`` exits 2 with one line."""
    monkeypatch.setattr(config_module, "reuse_port_balances", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--workers", "2"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("trioproxy: error: workers > 1 needs SO_REUSEPORT")


# ---- In-process: the listeners and the link ----


async def test_reuse_port_listeners_share_a_port_that_plain_listeners_cannot() -> None:
    """Two sets of SO_REUSEPORT listeners bind the same port; trio's own
    listeners (no SO_REUSEPORT) are refused it, so the option is what shares it."""
    first = await open_reuse_port_listeners(0, host="127.0.0.1")
    port = first[0].socket.getsockname()[1]
    second = await open_reuse_port_listeners(port, host="127.0.0.1")
    try:
        assert second[0].socket.getsockname() == ("127.0.0.1", port)
        with pytest.raises(OSError, match="in use"):
            await trio.open_tcp_listeners(port, host="127.0.0.1")
    finally:
        for listener in first + second:
            await listener.aclose()


async def test_two_servers_with_reuse_port_serve_one_port() -> None:
    """``serve`` with ``reuse_port`` opens sharing listeners: a second server
    starts on the first one's port, and the port accepts connections."""
    async with trio.open_nursery() as nursery:
        config = ProxyConfig(listen_port=0, reuse_port=True)
        listeners = await nursery.start(serve, config)
        port = listeners[0].socket.getsockname()[1]
        again = await nursery.start(serve, attrs.evolve(config, listen_port=port))
        assert again[0].socket.getsockname()[1] == port
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_read_ready_reads_at_most_its_bound() -> None:
    """A worker that sends endless bytes and no newline costs the supervisor
    at most MAX_READY_LINE bytes, and counts as not started."""
    stream = trio.testing.MemoryReceiveStream()
    stream.put_data(b"x" * (MAX_READY_LINE * 3))
    assert await read_ready(stream) is None
    left = await stream.receive_some()
    assert len(left) == MAX_READY_LINE * 2


async def test_read_ready_is_none_when_the_worker_closes_first() -> None:
    """EOF before the line: the worker exited before it was ready."""
    stream = trio.testing.MemoryReceiveStream()
    stream.put_data(b"127.0.0.1 80")
    stream.put_eof()
    assert await read_ready(stream) is None


async def test_worker_link_reports_ready_then_notices_the_supervisor_leaving() -> None:
    """The worker's ready line reaches the supervisor's end; when that end
    closes, the worker is told to drain (and not before)."""
    ours, theirs = socket.socketpair()
    supervisor_end = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    link = WorkerLink(index=0, fd=theirs.detach())
    gone = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(link.report_ready_then_watch, "127.0.0.1", 8080, gone.set)
        assert await read_ready(supervisor_end) == ("127.0.0.1", 8080)
        await trio.testing.wait_all_tasks_blocked()
        assert not gone.is_set()
        await supervisor_end.aclose()
    assert gone.is_set()


# ---- Real processes ----


@attrs.define
class Supervisor:
    process: trio.Process
    stderr: LineReader
    port: int
    startup_line: str

    @property
    def psutil(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def worker_pids(self) -> set[int]:
        return {child.pid for child in self.psutil.children()}


@asynccontextmanager
async def supervisor_process(*args: str) -> AsyncIterator[Supervisor]:
    """Start ``--workers 2`` on port 0; read its startup line. At the end kill
    the supervisor and any worker still alive, by PID."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "trioproxy", "--listen", "127.0.0.1:0", "--workers", "2"]
    process = await trio.lowlevel.open_process(
        [*command, *args_for_a_quiet_start(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    seen_workers: set[int] = set()
    try:
        assert process.stderr is not None
        stderr = LineReader(process.stderr)
        with trio.fail_after(PROMPTLY):
            startup = (await stderr.until("trioproxy listening on "))[-1]
        supervisor = Supervisor(process, stderr, int(startup.rsplit(":", 1)[1]), startup)
        seen_workers = supervisor.worker_pids()
        yield supervisor
    finally:
        if process.returncode is None:
            seen_workers |= {child.pid for child in psutil.Process(process.pid).children()}
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        for pid in seen_workers:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


async def eventually(check: Callable[[], bool]) -> None:
    """Poll ``check`` until it holds; fail after PROMPTLY seconds."""
    with trio.fail_after(PROMPTLY):
        # Another process's state has no event to wait on: poll it.
        while not check():  # noqa: ASYNC110
            await trio.sleep(POLL_SECONDS)


def listening_pids(port: int, pids: set[int]) -> set[int]:
    """Those of ``pids`` that are alive with a TCP socket listening on ``port``."""
    return {pid for pid in pids if _listens(pid, port)}


def _listens(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


async def fetch_all(proxy_port: int, origin_port: int, count: int) -> list[int]:
    """``count`` downloads at once through the proxy; their body lengths."""
    lengths: list[int] = []

    async def one() -> None:
        lengths.append(await download(proxy_port, origin_port, []))

    with trio.fail_after(PROMPTLY):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return lengths


async def test_two_workers_share_the_port_and_serve() -> None:
    """``--workers 2``: one startup line, two child processes both listening
    on the announced port, and requests through it are served."""
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with supervisor_process("--access-log", "off") as proxy:
            assert proxy.startup_line == f"trioproxy listening on http://127.0.0.1:{proxy.port}"
            workers = proxy.worker_pids()
            assert len(workers) == 2
            assert listening_pids(proxy.port, workers) == workers
            assert not listening_pids(proxy.port, {proxy.process.pid})
            lengths = await fetch_all(proxy.port, origin.port, 8)
            assert lengths == [len(CHUNK) * CHUNKS] * 8
            with trio.fail_after(PROMPTLY):
                proxy.process.send_signal(signal.SIGTERM)
                assert await proxy.process.wait() == 0
                assert "listening on" not in await proxy.stderr.rest()
        nursery.cancel_scope.cancel()


async def test_a_killed_worker_is_restarted_and_serving_goes_on() -> None:
    """SIGKILL to one worker: the supervisor logs the restart, a new worker
    takes its place on the port, and requests are still served."""
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with supervisor_process("--access-log", "off") as proxy:
            before = proxy.worker_pids()
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(PROMPTLY):
                line = (await proxy.stderr.until("restarting"))[-1]
            assert f"(pid {victim}) was killed by SIGKILL; restarting it in 0.1 s" in line

            def replaced() -> bool:
                now = proxy.worker_pids()
                return len(now) == 2 and victim not in now

            await eventually(replaced)
            await eventually(lambda: len(listening_pids(proxy.port, proxy.worker_pids())) == 2)
            assert await fetch_all(proxy.port, origin.port, 8) == [len(CHUNK) * CHUNKS] * 8
        nursery.cancel_scope.cancel()


async def test_sigterm_drains_every_worker_and_leaves_no_child() -> None:
    """SIGTERM to the supervisor: workers stop accepting, an in-flight download
    still completes, the supervisor exits 0, and no worker is left."""
    origin = GatedOrigin()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with supervisor_process("--access-log", "off", "--shutdown-timeout", "60") as proxy:
            workers = proxy.worker_pids()
            results: list[int] = []

            async def fetch() -> None:
                results.append(await download(proxy.port, origin.port, []))

            nursery.start_soon(fetch)
            with trio.fail_after(PROMPTLY):
                await origin.half_sent.wait()
                proxy.process.send_signal(signal.SIGTERM)
                await eventually(lambda: not listening_pids(proxy.port, workers))
                origin.release.set()
                assert await proxy.process.wait() == 0
            assert not any(psutil.pid_exists(pid) for pid in workers)
        nursery.cancel_scope.cancel()
    assert results == [len(CHUNK) * CHUNKS]


async def test_workers_drain_when_the_supervisor_is_killed() -> None:
    """SIGKILL to the supervisor (no chance to forward anything): each worker
    sees its link close and exits on its own, so no orphan keeps serving."""
    async with supervisor_process("--access-log", "off") as proxy:
        workers = [psutil.Process(pid) for pid in proxy.worker_pids()]
        proxy.process.kill()
        await proxy.process.wait()
        for worker in workers:
            await eventually(lambda worker=worker: has_exited(worker))  # type: ignore[misc]


def has_exited(process: psutil.Process) -> bool:
    """Gone, or a zombie its new parent has not reaped yet."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_a_worker_that_cannot_listen_fails_the_startup() -> None:
    """A port held by a socket without SO_REUSEPORT: the workers cannot bind,
    so the supervisor exits 1 with an error line and leaves no child."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "trioproxy", "--listen", f"127.0.0.1:{port}"]
        with trio.fail_after(PROMPTLY):
            result = await trio.run_process(
                [*command, "--workers", "2", *args_for_a_quiet_start()],
                env=env,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "in use" in err
    assert "trioproxy: error: worker" in err
    assert "exited with status 1 before it was ready" in err


async def test_a_worker_that_does_not_stop_is_killed_after_the_shutdown_timeout() -> None:
    """A worker that cannot act on SIGTERM (stopped with SIGSTOP) is killed
    once the shutdown timeout and the grace have passed; the supervisor logs
    it, exits 0, and leaves no child."""
    async with supervisor_process("--access-log", "off", "--shutdown-timeout", "0") as proxy:
        workers = proxy.worker_pids()
        stuck = min(workers)
        os.kill(stuck, signal.SIGSTOP)
        with trio.fail_after(PROMPTLY):
            proxy.process.send_signal(signal.SIGTERM)
            assert await proxy.process.wait() == 0
            rest = await proxy.stderr.rest()
        assert f"(pid {stuck}) is still running: killing it" in rest
        assert not any(psutil.pid_exists(pid) for pid in workers)


async def test_two_workers_serve_tls(tmp_path: Path) -> None:
    """``--workers 2 --tls-cert``: the startup line says https, both workers
    listen, and TLS requests through the port are served (each worker
    built its own context from the files)."""
    pki = make_pki(tmp_path)
    cert, key = pki.pair("localhost")
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        upstream = f"http://127.0.0.1:{origin.port}"
        tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--upstream", upstream]
        async with supervisor_process(*tls, "--access-log", "off") as proxy:
            assert proxy.startup_line == f"trioproxy listening on https://127.0.0.1:{proxy.port}"
            workers = proxy.worker_pids()
            await eventually(lambda: listening_pids(proxy.port, workers) == workers)
            for _ in range(6):
                transport = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                stream = trio.SSLStream(
                    transport, pki.context(), server_hostname="localhost", https_compatible=True
                )
                async with stream:
                    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                    await stream.send_all(request)
                    with trio.fail_after(PROMPTLY):
                        response = b""
                        while data := await stream.receive_some():
                            response += data
                assert response.startswith(b"HTTP/1.1 200 ")
                assert response.endswith(CHUNK * CHUNKS)
        nursery.cancel_scope.cancel()


def two_free_ports() -> int:
    """A port P such that P and P + 1 were both free a moment ago."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as second:
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports")


async def scrape_pid(port: int) -> int:
    """The ``pid`` in ``/debug/memory`` on 127.0.0.1:``port``."""
    with trio.fail_after(PROMPTLY):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET /debug/memory HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some():
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    pid: int = json.loads(body)["pid"]
    return pid


async def test_each_worker_serves_metrics_on_its_own_port() -> None:
    """``--workers 2 --metrics HOST:P``: the workers start (none fails to bind
    the metrics port), and worker ``i`` answers ``/debug/memory`` on ``P + i``,
    each with its own pid."""
    base = two_free_ports()
    async with supervisor_process("--access-log", "off", "--metrics", f"127.0.0.1:{base}") as proxy:
        pids = {await scrape_pid(base), await scrape_pid(base + 1)}
        assert pids == proxy.worker_pids()
