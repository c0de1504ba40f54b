# What the soak watches, once a second: the proxy's memory against its formula,
# and everything that must come back to its idle value when the load ends.
#
# RSS and open file descriptors come from psutil, summed over the proxy's
# process tree (the supervisor and its workers under --workers N). Connections,
# bytes buffered and live trio tasks come from each worker's /debug/memory
# (worker i serves it on the --metrics port + i). The ceiling is docs/memory.md's
# formula, for the whole tree:
#
#   idle RSS + workers x --max-buffer-memory
#            + per-connection overhead x open client connections
#            + per-exchange overhead x exchanges in progress (upstream connections)
#
# The connection terms use the most connections seen so far, not those open at
# the moment: the heap keeps its high-water mark until the proxy is idle and its
# trimmer gives memory back (docs/memory.md, "After a load"), so a moment after
# many connections closed, RSS is still what they needed. (Compared with the
# connections of the moment, a soak with a 4 MiB budget saw RSS 0.2-0.9 MiB
# above the ceiling in the seconds after connections closed.)
#
# A scrape that does not answer within SCRAPE_TIMEOUT (a worker being restarted,
# or out of descriptors in the EMFILE fault) leaves that worker's figures at
# their last values for the ceiling, and None in the sample.

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import psutil
import trio
from measure_overhead import debug_memory

# Per-connection and per-exchange overheads of the ceiling, as trioproxy's own
# /debug/memory uses them: 12 KiB per open client connection (measured 10.3-10.9
# KiB by scripts/measure_overhead.py) and 128 KiB per exchange in progress
# (measured 22-50 KiB beyond the budgeted buffers); docs/memory.md, "The ceiling".
from trioproxy._metrics import CONNECTION_OVERHEAD_BYTES, EXCHANGE_OVERHEAD_BYTES

MiB = 1024 * 1024

SCRAPE_TIMEOUT = 0.8
"""Seconds one /debug/memory scrape may take before the sample goes without it:
under a second, so a stuck worker does not stretch the once-a-second rhythm."""


@attrs.frozen
class WorkerFigures:
    """One worker's /debug/memory, the parts the soak uses."""

    pid: int
    client_connections: int
    upstream_connections: int
    buffered: int
    tasks: int
    budget_held: int
    budget_waiting: int

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> WorkerFigures:
        return cls(
            pid=int(report["pid"]),
            client_connections=int(report["connections"]["client"]),
            upstream_connections=int(report["connections"]["upstream"]),
            buffered=int(report["buffered_bytes"]["total"]),
            tasks=int(report["tasks_living"]),
            budget_held=int(report["budget"]["held"]),
            budget_waiting=int(report["budget"]["waiting"]),
        )


@attrs.frozen
class Sample:
    """One second of the soak. None: not known at that moment."""

    t: float
    phase: str
    rss: int | None
    fds: int | None
    ceiling: int | None
    client_connections: int | None
    upstream_connections: int | None
    buffered: int | None
    budget_held: int | None
    budget_waiting: int | None
    tasks: int | None
    exchanges: int
    exchanges_per_second: float
    failures: int


def tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (workers), those still alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_totals(pid: int) -> tuple[int | None, int | None]:
    """RSS and open descriptors summed over the tree, or None if it is gone."""
    rss = fds = 0
    processes = tree(pid)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            rss += process.memory_info().rss
            fds += process.num_fds()
    return (rss, fds) if processes else (None, None)


async def scrape(port: int) -> WorkerFigures | None:
    """One worker's figures, or None if it did not answer in time."""
    with trio.move_on_after(SCRAPE_TIMEOUT):
        try:
            return WorkerFigures.from_report(await debug_memory(("127.0.0.1", port)))
        except (OSError, trio.BrokenResourceError, ValueError, KeyError, h11.ProtocolError):
            return None
    return None


@attrs.define
class Watcher:
    """Samples the proxy tree; holds the idle baseline the ceiling starts from.

    Attributes:
        pid: the proxy process (the supervisor under --workers N).
        metrics_ports: each worker's /debug/memory port.
        budget: --max-buffer-memory, per worker.
    """

    pid: int
    metrics_ports: Sequence[int]
    budget: int
    idle_rss: int | None = None
    samples: list[Sample] = attrs.Factory(list)
    peak_clients: int = 0
    peak_upstreams: int = 0
    _last: dict[int, WorkerFigures] = attrs.Factory(dict)
    started: float = attrs.field(factory=trio.current_time)

    async def workers(self) -> list[WorkerFigures | None]:
        figures: list[WorkerFigures | None] = [None] * len(self.metrics_ports)

        async def one(index: int, port: int) -> None:
            figures[index] = await scrape(port)

        async with trio.open_nursery() as nursery:
            for index, port in enumerate(self.metrics_ports):
                nursery.start_soon(one, index, port)
        for port, worker in zip(self.metrics_ports, figures, strict=True):
            if worker is not None:
                self._last[port] = worker
        return figures

    def saw_connections(self, clients: int) -> None:
        """Count ``clients`` client connections in the high-water mark, when
        the workers cannot say (the EMFILE burst: they cannot be scraped)."""
        self.peak_clients = max(self.peak_clients, clients)

    def ceiling(self, client_connections: int, upstream_connections: int) -> int | None:
        if self.idle_rss is None:
            return None
        return (
            self.idle_rss
            + len(self.metrics_ports) * self.budget
            + CONNECTION_OVERHEAD_BYTES * client_connections
            + EXCHANGE_OVERHEAD_BYTES * upstream_connections
        )

    async def sample(self, phase: str, exchanges: int, failures: int) -> Sample:
        figures = await self.workers()
        rss, fds = tree_totals(self.pid)
        known = [worker for worker in figures if worker is not None]
        complete = len(known) == len(figures)
        # For the ceiling, a worker that did not answer counts as it last did,
        # and the connections are the most seen so far (see the module comment).
        latest = list(self._last.values())
        self.peak_clients = max(self.peak_clients, sum(w.client_connections for w in latest))
        self.peak_upstreams = max(self.peak_upstreams, sum(w.upstream_connections for w in latest))
        previous = self.samples[-1] if self.samples else None
        now = trio.current_time() - self.started
        rate = 0.0
        if previous is not None and now > previous.t:
            rate = (exchanges - previous.exchanges) / (now - previous.t)
        sample = Sample(
            t=round(now, 2),
            phase=phase,
            rss=rss,
            fds=fds,
            ceiling=self.ceiling(self.peak_clients, self.peak_upstreams),
            client_connections=sum(w.client_connections for w in known) if complete else None,
            upstream_connections=sum(w.upstream_connections for w in known) if complete else None,
            buffered=sum(w.buffered for w in known) if complete else None,
            budget_held=sum(w.budget_held for w in known) if complete else None,
            budget_waiting=sum(w.budget_waiting for w in known) if complete else None,
            tasks=sum(w.tasks for w in known) if complete else None,
            exchanges=exchanges,
            exchanges_per_second=round(rate, 1),
            failures=failures,
        )
        self.samples.append(sample)
        return sample

    def over_ceiling(self) -> list[Sample]:
        """Samples whose RSS was above their ceiling."""
        return [
            s
            for s in self.samples
            if s.rss is not None and s.ceiling is not None and s.rss > s.ceiling
        ]

    def peak(self) -> Sample | None:
        """The sample with the highest RSS."""
        known = [s for s in self.samples if s.rss is not None]
        return max(known, key=lambda s: s.rss or 0) if known else None


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def draw_png(
    path: Path, samples: Sequence[Sample], events: Sequence[tuple[float, str]], title: str
) -> bool:
    """Four panels over time: RSS and ceiling; connections and tasks; fds and
    buffered bytes; exchanges/s and failures. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    t = [s.t for s in samples]

    def line(axis: Any, values: list[float | None], label: str, **style: Any) -> None:
        axis.plot(t, [float("nan") if v is None else v for v in values], label=label, **style)

    line(axes[0], [_mib(s.rss) for s in samples], "RSS (proxy tree)", linewidth=1.6)
    line(axes[0], [_mib(s.ceiling) for s in samples], "ceiling", linestyle="--")
    axes[0].set_ylabel("MiB")
    axes[0].set_ylim(bottom=0)
    line(axes[1], [s.client_connections for s in samples], "client connections")
    line(axes[1], [s.upstream_connections for s in samples], "exchanges (upstream)")
    line(axes[1], [s.tasks for s in samples], "trio tasks")
    line(axes[2], [s.fds for s in samples], "open fds")
    line(axes[2], [_mib(s.buffered, 64) for s in samples], "buffered (64 KiB units)")
    line(axes[3], [s.exchanges_per_second for s in samples], "exchanges/s")
    line(axes[3], [s.failures for s in samples], "failures (total)", color="red")
    axes[3].set_xlabel("seconds")
    for axis in axes:
        for when, what in events:
            axis.axvline(when, color="grey", linewidth=0.8, linestyle=":")
            if axis is axes[0]:
                axis.annotate(what, (when, 0), rotation=90, fontsize=7, va="bottom")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper right")
    axes[0].set_title(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _mib(value: int | None, unit_kib: int = 1024) -> float | None:
    return None if value is None else value / (unit_kib * 1024)
