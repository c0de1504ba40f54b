"""The global budget inside the proxy: many stalled clients, one fresh client.

Every connection runs ``handle_connection`` on in-memory streams with one
shared ``ProxyMeters`` (and so one budget). Stalled clients are lockstep
streams that read the response head and then never read again.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._body import pump_body
from trioproxy._budget import MemoryBudget
from trioproxy._config import KiB
from trioproxy._endpoint import ClientEndpoint, UpstreamEndpoint
from trioproxy._relay import BufferGauge, Progress, relay

from .helpers import (
    BUDGETED_BUFFER_CHUNKS,
    BUDGETED_CONFIG,
    BUDGETED_MEMORY,
    BUDGETED_READ_SIZE,
    PATTERN_BODY,
    UpstreamPort,
    read_h11_message,
    send_h11_message,
    serve_body,
    stalled_client,
    start_budgeted_connection,
)

PER_PUMP_BOUND = (BUDGETED_BUFFER_CHUNKS + 2) * BUDGETED_READ_SIZE  # 6 KiB
STALLED_CLIENTS = 20  # together they could hold 20 x 6 KiB = 120 KiB, over BUDGETED_MEMORY


async def fetch(stream: trio.abc.Stream) -> tuple[int, bytes]:
    """A well-behaved client: GET, read the whole response."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target="http://origin.test/x", headers=[("Host", "o")])
    await send_h11_message(stream, conn, request)
    response, body = await read_h11_message(stream, conn)
    assert isinstance(response, h11.Response)
    return response.status_code, body


def held_bytes(meters: trioproxy.ProxyMeters) -> int:
    return meters.request_bodies.held + meters.response_bodies.held


async def test_stalled_clients_cannot_exceed_the_budget_or_block_a_fresh_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With 20 stalled clients whose channels could hold 120 KiB, at most the
    48 KiB budget is ever held, and a fresh client still gets its whole body
    byte for byte; when all connections end the budget is back to zero."""
    meters = trioproxy.ProxyMeters.for_config(BUDGETED_CONFIG)
    assert meters.budget is not None
    port = UpstreamPort(make_pair=trio.testing.memory_stream_pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_body, port, PATTERN_BODY)
        for _ in range(STALLED_CLIENTS):
            client = await start_budgeted_connection(nursery, meters, port)
            await nursery.start(stalled_client, client)
            await trio.testing.wait_all_tasks_blocked()
            assert held_bytes(meters) <= meters.budget.statistics().held <= BUDGETED_MEMORY
        statistics = meters.budget.statistics()
        assert statistics.held > BUDGETED_MEMORY // 2  # the stalled clients did fill it
        assert statistics.peak <= BUDGETED_MEMORY
        assert meters.response_bodies.peak <= BUDGETED_MEMORY

        fresh = await start_budgeted_connection(nursery, meters, port)
        with trio.fail_after(30):  # virtual seconds: a deadlock fails, not hangs
            status, body = await fetch(fresh)
        assert (status, body == PATTERN_BODY) == (200, True)
        assert meters.budget.statistics().peak <= BUDGETED_MEMORY
        nursery.cancel_scope.cancel()
    assert meters.budget.statistics().held == 0
    assert meters.budget.statistics().waiting == 0
    assert held_bytes(meters) == 0
    assert meters.client_connections == meters.upstream_connections == 0


async def test_client_leaving_mid_transfer_returns_its_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that disconnects mid-body ends its exchange quietly (no error
    group logged as a bug), and everything it held (channel, reader's and
    writer's chunks) goes back to the budget."""
    meters = trioproxy.ProxyMeters.for_config(BUDGETED_CONFIG)
    assert meters.budget is not None
    port = UpstreamPort(make_pair=trio.testing.memory_stream_pair)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_body, port, PATTERN_BODY)
        client = await start_budgeted_connection(nursery, meters, port)
        await nursery.start(stalled_client, client)
        await client.receive_some(3 * BUDGETED_READ_SIZE)  # a little of the body
        await trio.testing.wait_all_tasks_blocked()
        assert meters.budget.statistics().held >= PER_PUMP_BOUND - BUDGETED_READ_SIZE
        await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert meters.client_connections == 0
        assert meters.budget.statistics().held == 0
        assert held_bytes(meters) == 0
        nursery.cancel_scope.cancel()
    assert [r.message for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_relay_with_budget_is_byte_exact_and_returns_the_budget() -> None:
    """``relay`` under a budget smaller than its own bound moves every byte in
    order, never reserves more than the budget, and gives it all back."""
    budget = MemoryBudget(3 * KiB)
    source_send, source = trio.testing.memory_stream_pair()
    sink, sink_receive = trio.testing.memory_stream_pair()
    received = bytearray()

    async def feed() -> None:
        await source_send.send_all(PATTERN_BODY)
        await source_send.aclose()

    async def drain() -> None:
        while data := await sink_receive.receive_some(700):
            received.extend(data)
            assert budget.statistics().held <= 3 * KiB

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(drain)
        statistics = await relay(source, sink, read_size=KiB, budget=budget)
        await sink.aclose()
    assert statistics.bytes_relayed == len(PATTERN_BODY)
    assert bytes(received) == PATTERN_BODY
    assert budget.statistics().held == 0
    assert budget.statistics().peak <= 3 * KiB


async def test_body_events_larger_than_read_size_are_split() -> None:
    """A Data event larger than ``read_size`` (body bytes h11 had buffered with
    the head) is handed on in pieces of at most ``read_size`` bytes, so each
    piece fits the reservation made for it."""
    body = b"x" * 5000
    budget = MemoryBudget(4 * KiB)
    client_stream, proxy_stream = trio.testing.memory_stream_pair()
    upstream_stream, origin_stream = trio.testing.memory_stream_pair()
    # A read size that takes the whole request in one read: all of the body
    # is buffered in h11 before the body relay, as one Data event.
    source = ClientEndpoint(proxy_stream, read_size=8 * KiB, max_head_size=64 * KiB)
    head = b"POST / HTTP/1.1\r\nHost: o\r\nContent-Length: 5000\r\n\r\n"
    await client_stream.send_all(head + body)
    assert isinstance(await source.next_event(), h11.Request)
    source.read_size = KiB  # the chunk size of the relay from here on
    sink = UpstreamEndpoint(upstream_stream, read_size=KiB, max_head_size=64 * KiB)
    headers = [("Host", "o"), ("Content-Length", "5000")]
    await sink.send_head(h11.Request(method="POST", target="/", headers=headers))
    statistics = await pump_body(
        source, sink, buffer_chunks=2, gauge=BufferGauge(), progress=Progress(), budget=budget
    )
    assert statistics.bytes_relayed == len(body)
    assert statistics.chunks_relayed == 5  # 1024 x 4 + 904
    assert budget.statistics().peak <= 4 * KiB
    assert budget.statistics().held == 0
    await client_stream.aclose()
    await origin_stream.aclose()
