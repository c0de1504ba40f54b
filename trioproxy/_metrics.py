"""What the proxy holds and did, and an HTTP endpoint that shows it.

The meters are plain ints and floats on one shared ``ProxyMeters`` object,
updated inline by the server and the pumps: an attribute add costs nothing
next to a socket call, and trio runs everything on one thread, so no locks.
They are only turned into text when someone scrapes.

The endpoint (``serve_metrics``, enabled by ``--metrics HOST:PORT``) answers:

* ``GET /metrics``: Prometheus text exposition format 0.0.4. Written by hand
  rather than with prometheus-client: we export only counters and gauges (no
  histograms), which take a dozen lines to format, while the client library
  costs a dependency and import-time RSS in a program whose point is a small
  RSS.
* ``GET /debug/memory``: JSON tying the process RSS to the payload bytes
  buffered right now and to the configured ceiling, ``baseline RSS + budget
  + per-connection overhead x connections + per-exchange overhead x
  exchanges`` (docs/memory.md), with the process's pid and its number of
  live trio tasks.

psutil is imported on the first scrape, not at startup: it is only needed
when metrics are on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import h11
import trio

from ._balance import UpstreamGroup
from ._budget import BudgetStatistics, MemoryBudget
from ._config import ProxyConfig
from ._endpoint import ClientEndpoint
from ._errors import ClientGone, ProxyError
from ._relay import BufferGauge

logger = logging.getLogger("trioproxy.metrics")

# RSS one more idle keep-alive client connection costs: socket, h11 state,
# the handler's task. Measured by scripts/measure_overhead.py: 10.3-10.9 KiB
# (docs/memory.md); rounded up.
CONNECTION_OVERHEAD_BYTES = 12 * 1024
# What an idle keep-alive client connection costs when the listener speaks
# TLS: the above plus OpenSSL's state, the SSLObject and its BIOs after a
# handshake and a small exchange. Measured by scripts/measure_overhead.py
# --tls --idle 1000: 31.1 KiB in all (two runs; 11.3 KiB without TLS in the
# same session); rounded up.
TLS_CONNECTION_OVERHEAD_BYTES = 32 * 1024
# What an exchange in progress adds beyond the payload bytes the budget
# counts: the upstream socket, two pumps' tasks, h11's receive buffers and
# the transient copies of a read. Measured: 27-44 KiB for stalled downloads,
# 92-116 KiB per client with 200 clients streaming (heap high-water
# included); rounded up.
EXCHANGE_OVERHEAD_BYTES = 128 * 1024
# What an idle pooled upstream connection costs: its socket object and an
# h11 state with empty buffers, no task. Measured 2.0 KiB each on the Python
# heap (tracemalloc, 256 idle connections); doubled for the allocator's
# share. At most --upstream-pool-total of them (256: 1 MiB).
POOLED_CONNECTION_OVERHEAD_BYTES = 4 * 1024
# What each TLS leg adds to an exchange in progress: its TLS state, the BIOs,
# and one slice of ciphertext held while its peer is slow. Measured by
# scripts/measure_overhead.py --slow 100 (stalled downloads, same session):
# 37.4 KiB beyond buffers on the plain channel relay (--no-splice), 99-103
# KiB with a TLS client leg, 124 KiB with a TLS upstream leg, 190 KiB with
# both: 62-87 KiB per leg; rounded up.
TLS_LEG_OVERHEAD_BYTES = 96 * 1024
# A scrape is one small request; a client that sends nothing for this long is
# dropped, so a stuck scraper cannot pin a task and a socket for ever.
SCRAPE_TIMEOUT_SECONDS = 10.0
# The largest request head a scraper may send.
MAX_SCRAPE_HEAD = 16 * 1024


@attrs.define
class ProxyMeters:
    """The state every connection of one server shares: gauges and counters.

    Attributes:
        request_bodies: bytes read from clients, not yet written upstream.
        response_bodies: bytes read from upstreams, not yet written to
            clients; its ``sink_wait_seconds`` is the time spent waiting on
            slow clients.
        tunnels: bytes held by CONNECT and Upgrade tunnels, both directions.
        budget: the global memory budget every pump reserves from, if any.
        client_connections: client connections open now.
        upstream_connections: upstream connections open now.
        responses: responses sent to clients, by status code (including the
            proxy's own error responses).
        upstream_errors: exchanges that failed because of the upstream (502
            or 504, before or after the response started).
        tunnels_open: CONNECT and Upgrade tunnels running now.
        tunnel_bytes_up: bytes ended tunnels carried client -> upstream.
        tunnel_bytes_down: bytes ended tunnels carried upstream -> client.
        groups: the upstream groups in force now (reverse mode), for the
            per-server lines; the server sets it.
        pooled_upstreams: how many idle upstream connections the pool
            holds now; the server sets it.
        tls_handshakes: TLS handshakes completed, by leg (``client``,
            ``upstream``).
        tls_handshake_failures: failed TLS handshakes, by ``(leg, reason)``
            (``_tls.handshake_failure_reason``: ``not_tls``, ``timeout``, ...).
        connection_overhead_bytes: what one open client connection costs
            beyond payload, for the ceiling (more on a TLS listener).
        exchange_overhead_bytes: what one exchange in progress costs beyond
            payload, for the ceiling (more per TLS leg).
    """

    request_bodies: BufferGauge = attrs.Factory(BufferGauge)
    response_bodies: BufferGauge = attrs.Factory(BufferGauge)
    # Both directions of CONNECT and Upgrade tunnels.
    tunnels: BufferGauge = attrs.Factory(BufferGauge)
    budget: MemoryBudget | None = None
    client_connections: int = 0
    upstream_connections: int = 0
    responses: dict[int, int] = attrs.Factory(dict)
    upstream_errors: int = 0
    tunnels_open: int = 0
    tunnel_bytes_up: int = 0
    tunnel_bytes_down: int = 0
    groups: Callable[[], Iterable[UpstreamGroup]] = attrs.field(default=lambda: ())
    pooled_upstreams: Callable[[], int] = attrs.field(default=lambda: 0)
    tls_handshakes: dict[str, int] = attrs.Factory(dict)
    tls_handshake_failures: dict[tuple[str, str], int] = attrs.Factory(dict)
    connection_overhead_bytes: int = CONNECTION_OVERHEAD_BYTES
    exchange_overhead_bytes: int = EXCHANGE_OVERHEAD_BYTES

    @classmethod
    def for_config(cls, config: ProxyConfig) -> ProxyMeters:
        """Meters with a fresh budget of ``config.max_buffer_memory`` bytes."""
        return cls(
            budget=MemoryBudget(config.max_buffer_memory),
            connection_overhead_bytes=connection_overhead(config),
            exchange_overhead_bytes=exchange_overhead(config),
        )

    def count_response(self, status_code: int) -> None:
        self.responses[status_code] = self.responses.get(status_code, 0) + 1

    def count_tunnel(self, bytes_up: int, bytes_down: int) -> None:
        """Count the bytes an ended tunnel carried."""
        self.tunnel_bytes_up += bytes_up
        self.tunnel_bytes_down += bytes_down

    def count_tls_handshake(self, leg: str) -> None:
        self.tls_handshakes[leg] = self.tls_handshakes.get(leg, 0) + 1

    def count_tls_failure(self, leg: str, reason: str) -> None:
        key = (leg, reason)
        self.tls_handshake_failures[key] = self.tls_handshake_failures.get(key, 0) + 1

    def count_failure(self, status_code: int) -> None:
        """Count an exchange that ended with the error ``status_code``."""
        if status_code in (502, 504):
            self.upstream_errors += 1


def process_rss() -> int:
    """This process's resident set size in bytes (psutil, imported lazily)."""
    import psutil

    rss: int = psutil.Process().memory_info().rss
    return rss


def startup_rss() -> int:
    """This process's RSS without importing psutil (which would add ~1 MiB to
    what it measures): ``/proc/self/statm`` where it exists."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return process_rss()
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def connection_overhead(config: ProxyConfig) -> int:
    """What one open client connection costs beyond payload (docs/memory.md)."""
    return TLS_CONNECTION_OVERHEAD_BYTES if config.tls_cert else CONNECTION_OVERHEAD_BYTES


def exchange_overhead(config: ProxyConfig) -> int:
    """What one exchange in progress costs beyond payload: more for a TLS
    listener and for an https:// upstream (docs/memory.md)."""
    upstream_tls = config.upstream is not None and config.upstream.tls
    legs = bool(config.tls_cert) + upstream_tls
    return EXCHANGE_OVERHEAD_BYTES + legs * TLS_LEG_OVERHEAD_BYTES


def ceiling_at_limits(config: ProxyConfig, idle_rss: int) -> int:
    """The RSS one process may reach at its configured limits: the ceiling
    formula (docs/memory.md) with every allowed connection busy with an
    exchange."""
    per_connection = connection_overhead(config) + exchange_overhead(config)
    return idle_rss + config.max_buffer_memory + config.max_connections * per_connection


def startup_summary(config: ProxyConfig, version: str) -> str:
    """The line logged at start: version, mode, workers and the memory ceiling."""
    idle = startup_rss()
    ceiling = ceiling_at_limits(config, idle)
    mode = (
        f"reverse proxy for {config.upstream.authority}"
        if config.upstream is not None
        else "forward proxy" + (" via a parent proxy" if config.parent_proxy else "")
    )
    if config.upstream is not None and config.upstream.tls:
        mode += " over TLS"
    if config.tls_cert:
        mode += ", TLS on the listener"
    workers = f"{config.workers} worker{'s' if config.workers > 1 else ''}"
    mib = 1024 * 1024
    return (
        f"trioproxy {version}: {mode}, {workers}, memory ceiling {ceiling / mib:.0f} MiB"
        f" per process (idle {idle / mib:.0f} MiB + budget {config.max_buffer_memory / mib:.0f}"
        f" MiB + {config.max_connections} connections x "
        f"{(connection_overhead(config) + exchange_overhead(config)) // 1024} KiB)"
    )


def _budget_statistics(meters: ProxyMeters) -> BudgetStatistics | None:
    return meters.budget.statistics() if meters.budget is not None else None


def render_prometheus(meters: ProxyMeters, *, rss: int) -> str:
    """The meters in Prometheus text format 0.0.4 (no I/O; ``rss`` is given)."""
    return "".join(_prometheus_lines(meters, rss))


def _metric(name: str, kind: str, help_text: str, samples: dict[str, float]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}\n"
    yield f"# TYPE {name} {kind}\n"
    for labels, value in samples.items():
        yield (
            f"{name}{labels} {value:g}\n"
            if isinstance(value, float)
            else f"{name}{labels} {value}\n"
        )


def _prometheus_lines(meters: ProxyMeters, rss: int) -> Iterator[str]:
    request, response = meters.request_bodies, meters.response_bodies
    budget = _budget_statistics(meters)
    yield from _metric(
        "trioproxy_process_resident_memory_bytes", "gauge", "Process RSS.", {"": rss}
    )
    yield from _metric(
        "trioproxy_open_connections",
        "gauge",
        "Connections open now.",
        {
            '{side="client"}': meters.client_connections,
            '{side="upstream"}': meters.upstream_connections,
        },
    )
    yield from _metric(
        "trioproxy_buffered_bytes",
        "gauge",
        "Payload bytes held in user space now, by direction.",
        {'{direction="request"}': request.held, '{direction="response"}': response.held},
    )
    if budget is not None:
        yield from _budget_lines(budget)
    yield from _metric(
        "trioproxy_relayed_bytes_total",
        "counter",
        "Payload bytes relayed, by direction.",
        {'{direction="request"}': request.relayed, '{direction="response"}': response.relayed},
    )
    yield from _metric(
        "trioproxy_responses_total",
        "counter",
        "Responses sent to clients, by status code.",
        {f'{{status="{status}"}}': count for status, count in sorted(meters.responses.items())},
    )
    yield from _metric(
        "trioproxy_upstream_errors_total",
        "counter",
        "Exchanges failed by the upstream (502, 504).",
        {"": meters.upstream_errors},
    )
    yield from _tunnel_lines(meters)
    yield from _server_lines(meters.groups())
    yield from _tls_lines(meters)
    yield from _metric(
        "trioproxy_sink_wait_seconds_total",
        "counter",
        "Time readers waited for a slow receiver (response: slow clients).",
        {
            '{direction="request"}': request.sink_wait_seconds,
            '{direction="response"}': response.sink_wait_seconds,
        },
    )


def _tunnel_lines(meters: ProxyMeters) -> Iterator[str]:
    yield from _metric(
        "trioproxy_tunnels_open",
        "gauge",
        "CONNECT and Upgrade tunnels open now.",
        {"": meters.tunnels_open},
    )
    yield from _metric(
        "trioproxy_tunnel_bytes_total",
        "counter",
        "Bytes carried by ended tunnels, by direction.",
        {
            '{direction="up"}': meters.tunnel_bytes_up,
            '{direction="down"}': meters.tunnel_bytes_down,
        },
    )


def _label(value: str) -> str:
    """A label value as the text format writes it (backslash, quote, newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _server_lines(groups: Iterable[UpstreamGroup]) -> Iterator[str]:
    """Per server of each group: up or out, exchanges in flight, attempts, failures."""
    samples: dict[str, dict[str, float]] = {"up": {}, "in_flight": {}, "requests": {}, "fails": {}}
    for group in groups:
        for state in group.states:
            labels = f'{{group="{_label(group.name)}",server="{_label(state.server.url)}"}}'
            samples["up"][labels] = 1 if state.health() == "up" else 0
            samples["in_flight"][labels] = state.in_flight
            samples["requests"][labels] = state.requests
            samples["fails"][labels] = state.failures
    if not samples["up"]:
        return
    yield from _metric(
        "trioproxy_upstream_server_up",
        "gauge",
        "1 while a server takes requests; 0 while health (passive or active) holds it out.",
        samples["up"],
    )
    yield from _metric(
        "trioproxy_upstream_server_in_flight",
        "gauge",
        "Exchanges on a server now.",
        samples["in_flight"],
    )
    yield from _metric(
        "trioproxy_upstream_server_requests_total",
        "counter",
        "Attempts sent to a server (a retry counts on each server it tried).",
        samples["requests"],
    )
    yield from _metric(
        "trioproxy_upstream_server_failures_total",
        "counter",
        "Failures of a server: connect failures, resets before the response head.",
        samples["fails"],
    )


def _tls_lines(meters: ProxyMeters) -> Iterator[str]:
    yield from _metric(
        "trioproxy_tls_handshakes_total",
        "counter",
        "TLS handshakes completed, by leg.",
        {f'{{leg="{leg}"}}': meters.tls_handshakes.get(leg, 0) for leg in ("client", "upstream")},
    )
    failures = sorted(meters.tls_handshake_failures.items())
    yield from _metric(
        "trioproxy_tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes, by leg and reason.",
        {f'{{leg="{leg}",reason="{reason}"}}': count for (leg, reason), count in failures},
    )


def _budget_lines(budget: BudgetStatistics) -> Iterator[str]:
    yield from _metric(
        "trioproxy_buffer_budget_bytes",
        "gauge",
        "The global buffer budget (--max-buffer-memory).",
        {"": budget.capacity},
    )
    yield from _metric(
        "trioproxy_buffer_budget_reserved_bytes",
        "gauge",
        "Bytes of the budget reserved by readers now.",
        {"": budget.held},
    )
    yield from _metric(
        "trioproxy_buffer_budget_waiting_readers",
        "gauge",
        "Readers waiting for the budget now.",
        {"": budget.waiting},
    )
    yield from _metric(
        "trioproxy_buffer_budget_wait_seconds_total",
        "counter",
        "Time readers spent waiting for the budget.",
        {"": budget.wait_seconds},
    )


def memory_report(meters: ProxyMeters, *, rss: int, baseline_rss: int) -> dict[str, Any]:
    """RSS, buffered bytes and the ceiling formula, as a JSON-ready dict."""
    buffered = meters.request_bodies.held + meters.response_bodies.held
    budget = _budget_statistics(meters)
    pooled = meters.pooled_upstreams()
    overhead = (
        meters.connection_overhead_bytes * meters.client_connections
        + meters.exchange_overhead_bytes * meters.upstream_connections
        + POOLED_CONNECTION_OVERHEAD_BYTES * pooled
    )
    capacity = budget.capacity if budget is not None else None
    return {
        "rss_bytes": rss,
        "baseline_rss_bytes": baseline_rss,
        "growth_over_baseline_bytes": rss - baseline_rss,
        "buffered_bytes": {
            "request": meters.request_bodies.held,
            "response": meters.response_bodies.held,
            "total": buffered,
        },
        "budget": attrs.asdict(budget) if budget is not None else None,
        "connections": {
            "client": meters.client_connections,
            "upstream": meters.upstream_connections,
        },
        "per_connection_overhead_bytes": meters.connection_overhead_bytes,
        "pooled_upstream_connections": pooled,
        "per_exchange_overhead_bytes": meters.exchange_overhead_bytes,
        "per_pooled_connection_overhead_bytes": POOLED_CONNECTION_OVERHEAD_BYTES,
        "ceiling_formula": (
            "baseline_rss + budget + per_connection_overhead x client_connections"
            " + per_exchange_overhead x upstream_connections"
            " + per_pooled_connection_overhead x pooled_upstream_connections"
        ),
        "ceiling_bytes": None if capacity is None else baseline_rss + capacity + overhead,
        "unexplained_bytes": rss - baseline_rss - buffered - overhead,
    }


async def serve_metrics(
    meters: ProxyMeters,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/debug/memory`` on ``host:port`` until cancelled.

    The baseline RSS for ``/debug/memory`` is the RSS when this starts (the
    server is idle then). Reports the listeners, like ``serve``.

    Resource handling: one short-lived task per scrape; each connection is
    closed after one response, or after ``SCRAPE_TIMEOUT_SECONDS``.
    """
    baseline_rss = process_rss()
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def handler(stream: trio.SocketStream) -> None:
        with trio.move_on_after(SCRAPE_TIMEOUT_SECONDS):
            await answer_scrape(stream, meters, baseline_rss=baseline_rss)
        await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handler, listeners, task_status=task_status)


async def answer_scrape(stream: trio.abc.Stream, meters: ProxyMeters, *, baseline_rss: int) -> None:
    """Read one request from ``stream`` and answer it; errors end quietly."""
    scraper = ClientEndpoint(stream, read_size=MAX_SCRAPE_HEAD, max_head_size=MAX_SCRAPE_HEAD)
    try:
        request = await scraper.next_event()
        if not isinstance(request, h11.Request):
            return
        try:
            status, content_type, body = _route(request, meters, baseline_rss)
        except OSError as exc:
            # Reading this process's figures needs a file descriptor (psutil
            # opens /proc): out of them (EMFILE), the scrape fails, never the
            # server it runs in.
            logger.warning("metrics scrape: cannot read process figures: %s", exc)
            status, content_type = 503, b"text/plain"
            body = f"cannot read process figures: {exc.strerror or exc}\n".encode()
        headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        await scraper.send_head(
            h11.Response(status_code=status, headers=headers), body=body, end=True
        )
    except (ProxyError, ClientGone) as exc:
        logger.debug("metrics scrape failed: %r", exc)


def _route(
    request: h11.Request, meters: ProxyMeters, baseline_rss: int
) -> tuple[int, bytes, bytes]:
    path = request.target.split(b"?", 1)[0]
    if request.method != b"GET":
        return 405, b"text/plain", b"only GET\n"
    if path == b"/metrics":
        text = render_prometheus(meters, rss=process_rss())
        return 200, b"text/plain; version=0.0.4; charset=utf-8", text.encode()
    if path == b"/debug/memory":
        report = memory_report(meters, rss=process_rss(), baseline_rss=baseline_rss)
        report["pid"] = os.getpid()
        # Tasks alive in this process now (the scrape's own included): with
        # connections and fds, what must come back to its idle count after a
        # load (scripts/soak.py watches it).
        report["tasks_living"] = trio.lowlevel.current_statistics().tasks_living
        return 200, b"application/json", json.dumps(report, indent=2).encode() + b"\n"
    return 404, b"text/plain", b"try /metrics or /debug/memory\n"
