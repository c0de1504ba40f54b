"""``--workers N``: N proxy processes on one port, and the supervisor above them.

One trio process uses one core. To use N, the supervisor (the process the
user started) runs N workers, each ``python -m trioproxy`` with the user's
own arguments plus ``--listen HOST:PORT --workers 1``: a clean interpreter
running the ordinary single-process server (no fork of a running trio
process). Each worker opens its listening sockets with SO_REUSEPORT
(``_listen``), so the kernel spreads new connections over the workers. The
supervisor accepts nothing itself.

The port. With ``--listen HOST:0`` every worker binding port 0 would get a
port of its own. So the supervisor binds a probe socket (SO_REUSEADDR +
SO_REUSEPORT, never listening) to get a concrete port, passes that port to
every worker, and keeps the probe bound for its whole life, not just until
the workers are up: a bound socket that does not listen receives no
connections (they go only to listening members of the port's group), and it
keeps the port ours when every worker has died at once and is being
restarted. With a fixed port there is no probe.

The link. Each worker gets one end of a socketpair (its descriptor and its
index in the environment: ``WORKER_FD_ENV``, ``WORKER_INDEX_ENV``). It writes
one line, ``HOST PORT``, once its listeners accept connections, instead of
printing the startup line; the supervisor prints the one startup line when
every worker has reported. After that the link is a lifeline: if the
supervisor dies (even by SIGKILL) the worker reads EOF and drains as on
SIGTERM, so no orphan keeps serving. Workers start in a session of their own,
so a terminal's Ctrl-C reaches only the supervisor, which forwards one
SIGTERM (a worker would take a second signal as "stop now").

Supervision: one task per worker in a nursery. A worker that exits while we
are not stopping, whatever its status, is restarted after a delay that
doubles with each quick death in a row (``RestartBackoff``), so a crash loop
costs little; every restart is logged. A worker that dies before its first
report ends the startup: the supervisor stops the others and fails (exit 1),
as a single process that cannot listen does.

Reload: with a config file, the supervisor takes SIGHUP. It validates the
file once (``validate``, the same loading the workers do); a file that
fails is one error line and no worker hears of it; otherwise SIGHUP goes to
every worker that is ready (one still starting has no SIGHUP handler yet,
and reads the file as it starts anyway), and each reloads it. ``workers``
and ``listen`` are the supervisor's: a change is reported as needing a
restart. A worker restarted later reads the file as it is then.

Shutdown: the first SIGTERM/SIGINT is forwarded as SIGTERM to every worker,
which drains for ``--shutdown-timeout`` (``_shutdown``); a further signal is
forwarded again, which makes the workers stop at once. Workers still running
``KILL_GRACE_SECONDS`` after their shutdown timeout are killed. Then the
supervisor exits 0.

Per-worker resources: the index is stable across restarts. Anything a worker
listens on besides the shared port must differ per worker: a metrics
endpoint ``--metrics HOST:PORT`` listens on ``PORT + index`` in worker
``index`` (``WorkerLink.index``), so each worker's counters are
scraped separately.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from ._config import ProxyConfig, keep_restart_settings
from ._errors import collapse_single_error
from ._listen import listening_line
from ._metrics import startup_summary
from ._version import VERSION

logger = logging.getLogger("trioproxy")

# The environment of a worker: the descriptor of its end of the link, and
# its index (0 .. N-1). Their presence is what makes a process a worker.
WORKER_FD_ENV = "TRIOPROXY_WORKER_FD"
WORKER_INDEX_ENV = "TRIOPROXY_WORKER_INDEX"

# The first restart of a dead worker waits this long: enough that a worker
# dying at once does not spin a core, short enough to go unnoticed.
FIRST_RESTART_DELAY = 0.1
# Each quick death in a row doubles the delay, up to this: a worker that cannot
# start (say, a disk full) costs one interpreter start every 10 s.
MAX_RESTART_DELAY = 10.0
# A worker that served this long before it died was healthy: the next restart
# waits FIRST_RESTART_DELAY again. Longer than any startup, so a worker that
# crashes just after reporting ready still counts as a crash loop.
HEALTHY_UPTIME = 30.0
# Seconds past --shutdown-timeout before a worker that has not exited is
# killed: the worker cuts its connections at the timeout itself and needs
# only a moment to exit; this covers a loaded machine.
KILL_GRACE_SECONDS = 2.0
# The longest ready line (``HOST PORT\n``) read from a worker: a host name is
# at most 253 characters.
MAX_READY_LINE = 512


class WorkerStartupError(Exception):
    """A worker exited before it was ready; the message says which and how."""


# ---- Sans-I/O: the command line, the ready line, the restart delays ----


def listen_argument(host: str, port: int) -> str:
    """``HOST:PORT`` for ``--listen``, brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_command(argv: Sequence[str], host: str, port: int) -> list[str]:
    """The command line of a worker: the user's arguments, then ours.

    argparse keeps the last value of a repeated option, so the appended
    ``--listen`` and ``--workers`` override the user's.
    """
    return [
        sys.executable,
        "-m",
        "trioproxy",
        *argv,
        "--listen",
        listen_argument(host, port),
        "--workers",
        "1",
    ]


def ready_line(host: str, port: int) -> bytes:
    """What a worker writes on its link once it accepts connections."""
    return f"{host} {port}\n".encode()


def parse_ready_line(line: bytes) -> tuple[str, int]:
    """Inverse of ``ready_line``.

    Raises:
        ValueError: if ``line`` is not ``HOST PORT``.
    """
    host, port = line.decode("ascii").split()
    return host, int(port)


def describe_exit(returncode: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``, for the log."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


@attrs.define
class RestartBackoff:
    """The delay before restarting one worker: doubling, capped, and reset
    after a healthy run."""

    first: float = FIRST_RESTART_DELAY
    ceiling: float = MAX_RESTART_DELAY
    healthy_uptime: float = HEALTHY_UPTIME
    _next: float | None = None

    def delay_after(self, uptime: float) -> float:
        """The seconds to wait before restarting a worker that ran ``uptime`` s."""
        if self._next is None or uptime >= self.healthy_uptime:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.ceiling)
        return delay


# ---- The worker's side ----


@attrs.frozen
class WorkerLink:
    """A supervised worker's end of its link to the supervisor.

    Attributes:
        index: 0 .. N-1, the same across restarts; per-worker ports derive
            from it (a metrics endpoint listens on its port + index).
        fd: the descriptor of the worker's end of the socketpair.
    """

    index: int
    fd: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> WorkerLink | None:
        """The link the supervisor set up, or None if this is no worker."""
        fd, index = environ.get(WORKER_FD_ENV), environ.get(WORKER_INDEX_ENV)
        if fd is None or index is None:
            return None
        return cls(index=int(index), fd=int(fd))

    def worker_config(self, config: ProxyConfig) -> ProxyConfig:
        """``config`` as this worker serves it: the shared port opened with
        SO_REUSEPORT, and a metrics endpoint of its own on the given port +
        ``index`` (port 0 stays 0: any free port)."""
        metrics = config.metrics_listen
        if metrics is not None and metrics[1] != 0:
            metrics = (metrics[0], metrics[1] + self.index)
        return attrs.evolve(config, reuse_port=True, metrics_listen=metrics)

    async def report_ready_then_watch(
        self,
        host: str,
        port: int,
        supervisor_gone: Callable[[], object],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell the supervisor we listen on ``host:port``; then wait until it
        goes away and call ``supervisor_gone()`` (which should start a drain).

        Memory: reads at most 1 byte at a time; the supervisor sends nothing.
        """
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=self.fd)))
        async with stream:
            await stream.send_all(ready_line(host, port))
            task_status.started()
            try:
                while await stream.receive_some(1):
                    pass
            except (trio.BrokenResourceError, OSError):
                pass
        logger.info("worker %d: the supervisor is gone; shutting down", self.index)
        supervisor_gone()


# ---- The supervisor ----


async def supervise(
    config: ProxyConfig,
    argv: Sequence[str],
    validate: Callable[[], ProxyConfig] | None = None,
) -> None:
    """Run ``config.workers`` workers until SIGTERM/SIGINT; see the module comment.

    Args:
        config: the validated configuration (workers, listen address, shutdown
            timeout); the workers build theirs from ``argv``.
        argv: the user's command line arguments, passed on to each worker.
        validate: reads the configuration again, raising ValueError for one
            that is not valid; given, SIGHUP reloads the workers.

    Raises:
        WorkerStartupError: a worker exited before it was ready.
        OSError: the probe socket for port 0 could not be bound.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with _port_for_workers(config) as port:
            command = worker_command(argv, config.listen_host, port)
            supervisor = _Supervisor(config, command)
            with collapse_single_error():
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(supervisor.forward_signals, signals)
                    watchers.start_soon(supervisor.kill_stragglers)
                    if validate is not None:
                        await watchers.start(supervisor.forward_reloads, validate)
                    await supervisor.run_all()
                    watchers.cancel_scope.cancel()
    if supervisor.startup_failure is not None:
        raise WorkerStartupError(supervisor.startup_failure)


@asynccontextmanager
async def _port_for_workers(config: ProxyConfig) -> AsyncIterator[int]:
    """The port every worker listens on; for port 0, a probe holds it."""
    if config.listen_port != 0:
        yield config.listen_port
        return
    addresses = await trio.socket.getaddrinfo(
        config.listen_host, 0, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = addresses[0]
    with trio.socket.socket(family, type_, proto) as probe:
        probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await probe.bind(sockaddr)
        yield int(probe.getsockname()[1])


@attrs.frozen
class _WorkerEnded:
    """How one run of a worker ended; ``uptime`` counts from its ready report."""

    pid: int
    returncode: int
    uptime: float

    def __str__(self) -> str:
        return f"(pid {self.pid}) {describe_exit(self.returncode)}"


class _Supervisor:
    """The state shared by the per-worker tasks and the signal forwarder.

    Memory: one process and one link socket per worker.
    """

    def __init__(self, config: ProxyConfig, command: list[str]) -> None:
        self.config = config
        self.command = command
        self.running: dict[int, trio.Process] = {}
        # Workers that reported ready since they last started.
        self.ready: set[int] = set()
        self.stopping = trio.Event()
        self.startup_failure: str | None = None

    async def run_all(self) -> None:
        """Start every worker, announce the port, supervise until stopped."""
        addresses: list[tuple[str, int] | None] = [None] * self.config.workers
        async with trio.open_nursery() as workers:

            async def start(index: int) -> None:
                addresses[index] = await workers.start(self.run_worker, index)

            async with trio.open_nursery() as starting:
                for index in range(self.config.workers):
                    starting.start_soon(start, index)
            if self.startup_failure is not None:
                workers.cancel_scope.cancel()  # kills the workers that did start
                return
            first = addresses[0]
            if first is not None and not self.stopping.is_set():
                print(
                    listening_line(*first, tls=bool(self.config.tls_cert)),
                    file=sys.stderr,
                    flush=True,
                )
                print(startup_summary(self.config, VERSION), file=sys.stderr, flush=True)

    async def run_worker(
        self, index: int, task_status: trio.TaskStatus[tuple[str, int] | None]
    ) -> None:
        """Run worker ``index``, restarting it whenever it exits, until stopping.

        Reports the worker's address through ``task_status`` once it is first
        ready, or None if it exited before (then, unless we are stopping,
        ``startup_failure`` says why, and this returns).
        """
        backoff = RestartBackoff()
        reported = False

        def report(address: tuple[str, int]) -> None:
            nonlocal reported
            if reported:
                logger.info("worker %d is ready again", index)
            else:
                reported = True
                task_status.started(address)

        while True:
            ended = await self._run_once(index, report)
            if not reported:
                if not self.stopping.is_set() and self.startup_failure is None:
                    self.startup_failure = f"worker {index} {ended} before it was ready"
                task_status.started(None)
                return
            if self.stopping.is_set():
                return
            delay = backoff.delay_after(ended.uptime)
            logger.warning("worker %d %s; restarting it in %.1f s", index, ended, delay)
            with trio.move_on_after(delay):
                await self.stopping.wait()
            if self.stopping.is_set():
                return

    async def _run_once(
        self, index: int, report: Callable[[tuple[str, int]], None]
    ) -> _WorkerEnded:
        """Start worker ``index``, ``report`` its address when it is ready,
        and return when it has exited."""
        async with self._spawned(index) as (process, link):
            address = await read_ready(link)
            ready_at = trio.current_time()
            if address is None:
                process.kill()  # it has exited, or it is broken: make sure it is gone
            else:
                report(address)
                self.ready.add(index)
            try:
                returncode = await process.wait()
            finally:
                self.ready.discard(index)
        return _WorkerEnded(process.pid, returncode, trio.current_time() - ready_at)

    @asynccontextmanager
    async def _spawned(self, index: int) -> AsyncIterator[tuple[trio.Process, trio.SocketStream]]:
        """Start worker ``index`` with its link; on exit make sure it is gone.

        Resource handling: the worker is in ``running`` while it may run; if
        this is left while it still runs (cancellation, an error) it is
        killed, and it is always waited for, so no zombie or orphan stays.
        """
        ours, theirs = socket.socketpair()
        with theirs:
            environ = {
                **os.environ,
                WORKER_FD_ENV: str(theirs.fileno()),
                WORKER_INDEX_ENV: str(index),
            }
            process = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.DEVNULL,
                env=environ,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        link = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        self.running[index] = process
        if self.stopping.is_set():  # the signal came while it started
            process.send_signal(signal.SIGTERM)
        try:
            yield process, link
        finally:
            del self.running[index]
            with trio.move_on_after(KILL_GRACE_SECONDS) as cleanup:
                cleanup.shield = True
                if process.returncode is None:
                    process.kill()
                await process.wait()
                await link.aclose()

    async def forward_signals(self, signals: AsyncIterator[int]) -> None:
        """Forward every SIGTERM/SIGINT to the workers as SIGTERM: the first
        drains them, a further one stops them at once."""
        async for signum in signals:
            name = signal.Signals(signum).name
            if self.stopping.is_set():
                logger.warning("second signal (%s): stopping the workers now", name)
            else:
                logger.info("%s: draining %d workers", name, len(self.running))
                self.stopping.set()
            for process in self.running.values():
                process.send_signal(signal.SIGTERM)

    async def forward_reloads(
        self,
        validate: Callable[[], ProxyConfig],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """On each SIGHUP, validate the configuration once; if it holds, pass
        SIGHUP to every ready worker."""
        with trio.open_signal_receiver(signal.SIGHUP) as hangups:
            task_status.started()
            async for _ in hangups:
                try:
                    new = validate()
                except ValueError as exc:
                    logger.error("reload refused, the workers keep their configuration: %s", exc)
                    continue
                for note in keep_restart_settings(self.config, new)[1]:
                    if note.startswith(("workers:", "listen:")):
                        logger.warning("reload: %s", note)
                logger.info("SIGHUP: reloading %d workers", len(self.ready))
                for index in sorted(self.ready):
                    self.running[index].send_signal(signal.SIGHUP)

    async def kill_stragglers(self) -> None:
        """Once stopping, kill the workers still running after the shutdown
        timeout and ``KILL_GRACE_SECONDS``."""
        await self.stopping.wait()
        await trio.sleep(self.config.shutdown_timeout + KILL_GRACE_SECONDS)
        for index, process in self.running.items():
            logger.warning("worker %d (pid %d) is still running: killing it", index, process.pid)
            process.kill()


async def read_ready(link: trio.abc.ReceiveStream) -> tuple[str, int] | None:
    """The address in the worker's ready line, or None if it closed first.

    Memory: at most ``MAX_READY_LINE`` bytes.
    """
    line = bytearray()
    try:
        while b"\n" not in line and len(line) < MAX_READY_LINE:
            chunk = await link.receive_some(MAX_READY_LINE - len(line))
            if not chunk:
                return None
            line += chunk
        return parse_ready_line(bytes(line))
    except (trio.BrokenResourceError, ValueError) as exc:
        logger.warning("worker sent no usable ready line: %r", exc)
        return None
