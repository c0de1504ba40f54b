# Starting, watching and stopping the processes a benchmark runs.
#
# The benchmark starts servers (origin, proxies) whose ports and lifetimes it
# owns. Three things go wrong with ad-hoc subprocess code, and this module is
# the place that gets them right once:
#
# * A server that logs to a pipe nobody reads blocks when the pipe fills (64 KiB
#   on Linux). Every child's stderr is drained by a thread for its whole life;
#   the last lines are kept for error messages, and a "... listening on URL"
#   line is recognised so servers that pick their own port (port 0) can say
#   where they are.
# * Processes must be stopped by the PID we started, never by name (pkill would
#   hit other people's nginx). We remember the child's descendants too (nginx
#   workers) and stop them by PID if the parent's SIGTERM did not take them down.
# * Peak memory is what the benchmark is about, so RSS of a process plus its
#   children is sampled on a thread at a fixed period while the load runs.
#
# Plain threads and subprocess, not trio: the benchmark's own event loop would
# compete for the same two cores with the thing being measured, and the work
# here is waiting, not I/O multiplexing.

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

# How long a server may take to print its address or open its port. Python
# servers import trio + h11 in well under a second; 15 s leaves room for a
# loaded 2-core machine without letting a broken server stall the run.
START_TIMEOUT = 15.0

# Grace period between SIGTERM and SIGKILL. nginx and haproxy finish a fast
# shutdown in milliseconds; trio servers need one trip through their loop.
STOP_GRACE = 5.0

# Lines of stderr kept per process for error messages.
STDERR_TAIL = 40

# "trioproxy listening on http://127.0.0.1:41234" (also origin, naive_relay).
_LISTENING = re.compile(r"listening on (https?://[^\s]+)")


class ProcessFailed(RuntimeError):
    """A child process exited early or never became ready."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    For servers that need a port written into their config file (nginx,
    haproxy, tinyproxy). There is a small race between closing this socket and
    the server binding it; the server then fails to start and we say so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One child process: started in a new session, stderr drained, stopped by PID.

    Use as a context manager; leaving the block stops the process and the
    descendants seen while it ran.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.url: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._url_seen = threading.Event()
        self._known_pids: set[int] = set()
        # A new session: Ctrl-C in the terminal reaches only the benchmark,
        # which then stops the children in order instead of racing them.
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._drainer = threading.Thread(target=self._drain, name=f"stderr-{name}", daemon=True)
        self._drainer.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            match = _LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1).rstrip("/")
                self._url_seen.set()

    def stderr_tail(self) -> str:
        return "\n".join(self._tail)

    def _fail(self, what: str) -> ProcessFailed:
        code = self.proc.poll()
        status = f"exited with {code}" if code is not None else "still running"
        return ProcessFailed(f"{self.name}: {what} ({status}); stderr:\n{self.stderr_tail()}")

    def wait_for_url(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for a "listening on http://..." line on stderr and return the URL."""
        deadline = time.monotonic() + timeout
        while not self._url_seen.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self._fail("did not print 'listening on http://...'")
        assert self.url is not None
        return self.url

    def wait_for_port(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until 127.0.0.1:port accepts a TCP connection."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited before opening port {port}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                self.remember_descendants()
                return
            if time.monotonic() > deadline:
                raise self._fail(f"port {port} not open after {timeout:.0f} s")
            time.sleep(0.05)

    def remember_descendants(self) -> None:
        """Record child PIDs now, so they can be stopped even if the parent dies first."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self._known_pids.add(child.pid)

    def stop(self) -> None:
        """SIGTERM the process, wait, then SIGKILL it and any remembered descendants."""
        self.remember_descendants()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_GRACE)
        for pid in self._known_pids:
            _kill_if_alive(pid)
        self._drainer.join(1.0)


def _kill_if_alive(pid: int) -> None:
    # PIDs are reused, so check it is still a process we could have started
    # (a child of ours that outlived its parent is reparented, so we cannot
    # check the parent; checking it is alive and not a zombie is the best we can do).
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)


class RssSampler:
    """Peak RSS of a process tree, sampled every `period` seconds on a thread.

    RSS summed over the process and all its descendants (nginx's master and
    worker; a Python proxy is one process). Sampling misses spikes shorter
    than the period; for the slow-growing heaps this benchmark looks for, a
    quarter second is plenty.
    """

    def __init__(self, pid: int, period: float = 0.25) -> None:
        self.pid = pid
        self.period = period
        self.peak_bytes = 0
        self.last_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _sample_once(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.last_bytes = total
        self.peak_bytes = max(self.peak_bytes, total)
        self.samples += 1

    def _run(self) -> None:
        while True:
            self._sample_once()
            if self._stop.wait(self.period):
                return

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        """Sample while the block runs (one extra sample at the end)."""
        self._stop.clear()
        self._sample_once()  # so peak_bytes is the starting RSS inside the block
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._sample_once()
