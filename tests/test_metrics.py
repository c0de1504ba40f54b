"""The metrics endpoint: scraped while a transfer is stalled mid-body."""

from __future__ import annotations

import errno
import http.client
import json
import re

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import _metrics
from trioproxy._metrics import (
    CONNECTION_OVERHEAD_BYTES,
    EXCHANGE_OVERHEAD_BYTES,
    TLS_CONNECTION_OVERHEAD_BYTES,
    TLS_LEG_OVERHEAD_BYTES,
    ProxyMeters,
    answer_scrape,
    ceiling_at_limits,
    memory_report,
    render_prometheus,
    serve_metrics,
    startup_summary,
)

from .helpers import (
    BUDGETED_CONFIG,
    BUDGETED_READ_SIZE,
    PATTERN_BODY,
    UpstreamPort,
    serve_body,
    stalled_client,
    start_budgeted_connection,
)


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{labels} not in:\n{text}"
    return float(match.group(1))


async def scrape(meters: trioproxy.ProxyMeters, path: str) -> tuple[int, bytes]:
    """GET ``path`` from ``answer_scrape`` over an in-memory stream."""
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("Host", "m")])
    await client.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    await answer_scrape(server, meters, baseline_rss=1000)
    await server.aclose()
    body = b""
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await client.receive_some(65536)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        else:
            return status, body


async def test_scrapes_during_a_stalled_transfer_show_what_is_held() -> None:
    """Mid-transfer, /metrics and /debug/memory report the open connections,
    the bytes buffered (equal to the pump's gauge), the budget, and an RSS;
    the JSON's buffered total matches the metric, and its live task count is
    this run's."""
    meters = trioproxy.ProxyMeters.for_config(BUDGETED_CONFIG)
    port = UpstreamPort(make_pair=trio.testing.memory_stream_pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_body, port, PATTERN_BODY)
        client = await start_budgeted_connection(nursery, meters, port)
        await nursery.start(stalled_client, client)
        await client.receive_some(2 * BUDGETED_READ_SIZE)
        await trio.testing.wait_all_tasks_blocked()

        status, text_bytes = await scrape(meters, "/metrics")
        text = text_bytes.decode()
        assert status == 200
        assert sample(text, "trioproxy_open_connections", '{side="client"}') == 1
        assert sample(text, "trioproxy_open_connections", '{side="upstream"}') == 1
        held = meters.response_bodies.held
        assert held >= BUDGETED_READ_SIZE
        assert sample(text, "trioproxy_buffered_bytes", '{direction="response"}') == held
        assert sample(text, "trioproxy_buffer_budget_bytes") == BUDGETED_CONFIG.max_buffer_memory
        assert sample(text, "trioproxy_responses_total", '{status="200"}') == 1
        relayed = sample(text, "trioproxy_relayed_bytes_total", '{direction="response"}')
        assert relayed == meters.response_bodies.relayed > 0
        assert sample(text, "trioproxy_process_resident_memory_bytes") > 1_000_000

        status, json_bytes = await scrape(meters, "/debug/memory")
        report = json.loads(json_bytes)
        assert status == 200
        assert report["buffered_bytes"]["response"] == held
        assert report["connections"] == {"client": 1, "upstream": 1}
        assert report["tasks_living"] == trio.lowlevel.current_statistics().tasks_living
        assert report["ceiling_bytes"] == (
            1000
            + BUDGETED_CONFIG.max_buffer_memory
            + report["per_connection_overhead_bytes"]
            + report["per_exchange_overhead_bytes"]
        )
        assert (await scrape(meters, "/nothing"))[0] == 404
        nursery.cancel_scope.cancel()


def test_rendering_counts_errors_and_statuses() -> None:
    """Responses are counted per status, and only 502/504 count as upstream errors."""
    meters = trioproxy.ProxyMeters()
    for status in (200, 200, 502, 400):
        meters.count_response(status)
    for status in (502, 400, 504):
        meters.count_failure(status)
    text = render_prometheus(meters, rss=5)
    assert sample(text, "trioproxy_responses_total", '{status="200"}') == 2
    assert sample(text, "trioproxy_responses_total", '{status="400"}') == 1
    assert sample(text, "trioproxy_upstream_errors_total") == 2
    assert "trioproxy_buffer_budget_bytes" not in text  # no budget, no metric
    assert memory_report(meters, rss=10, baseline_rss=4)["ceiling_bytes"] is None


async def test_metrics_endpoint_on_loopback_with_http_client() -> None:
    """``serve_metrics`` on 127.0.0.1 answers a real HTTP client with both pages."""
    meters = trioproxy.ProxyMeters.for_config(trioproxy.ProxyConfig())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_metrics, meters, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]

        def get(path: str) -> tuple[int, str | None, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            result = response.status, response.getheader("Content-Type"), response.read()
            connection.close()
            return result

        status, content_type, body = await trio.to_thread.run_sync(get, "/metrics")
        assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert b"trioproxy_buffer_budget_bytes 67108864" in body
        status, content_type, body = await trio.to_thread.run_sync(get, "/debug/memory")
        assert (status, content_type) == (200, "application/json")
        assert json.loads(body)["rss_bytes"] > 0
        nursery.cancel_scope.cancel()


async def test_a_scrape_without_file_descriptors_is_a_503_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of file descriptors (EMFILE), psutil cannot read /proc: the scrape
    answers 503, and nothing escapes to the server it runs in (the soak found
    a worker exiting on this)."""

    def no_descriptors() -> int:
        raise OSError(errno.EMFILE, "Too many open files", "/proc/self/stat")

    monkeypatch.setattr(_metrics, "process_rss", no_descriptors)
    for path in ("/metrics", "/debug/memory"):
        status, body = await scrape(trioproxy.ProxyMeters(), path)
        assert status == 503
        assert b"Too many open files" in body


def test_a_tls_listener_counts_its_connections_at_the_tls_overhead() -> None:
    """With --tls-cert, the ceiling and /debug/memory count each client
    connection at the measured TLS overhead, and each exchange with a TLS
    leg more per leg, not the plain figures."""
    plain = trioproxy.ProxyConfig()
    tls = trioproxy.ProxyConfig(tls_cert=["cert.pem"])
    assert ProxyMeters.for_config(plain).connection_overhead_bytes == CONNECTION_OVERHEAD_BYTES
    meters = ProxyMeters.for_config(tls)
    assert meters.connection_overhead_bytes == TLS_CONNECTION_OVERHEAD_BYTES
    meters.client_connections = 10
    report = memory_report(meters, rss=100, baseline_rss=0)
    assert report["per_connection_overhead_bytes"] == TLS_CONNECTION_OVERHEAD_BYTES
    both = trioproxy.ProxyConfig(tls_cert=["cert.pem"], upstream="https://origin.test")
    assert report["per_exchange_overhead_bytes"] == EXCHANGE_OVERHEAD_BYTES + TLS_LEG_OVERHEAD_BYTES
    tls_legs = ProxyMeters.for_config(both).exchange_overhead_bytes - EXCHANGE_OVERHEAD_BYTES
    assert tls_legs == 2 * TLS_LEG_OVERHEAD_BYTES
    gap = ceiling_at_limits(tls, 0) - ceiling_at_limits(plain, 0)
    extra = TLS_CONNECTION_OVERHEAD_BYTES - CONNECTION_OVERHEAD_BYTES + TLS_LEG_OVERHEAD_BYTES
    assert gap == tls.max_connections * extra
    assert ", TLS on the listener," in startup_summary(tls, "0")
