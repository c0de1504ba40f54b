"""Backpressure through the whole proxy, on in-memory streams.

A client that stops reading (or an upstream that stops reading an upload)
must stop the proxy from pulling more than the stated bound,
(buffer_chunks + 2) x read_size, from the other side; once the slow side
reads again, every byte arrives.

Each test runs twice: a body of at least ``BYPASS_MIN_BODY_FROM_TLS`` (the
threshold for streams that are not plain sockets) goes past h11
(``bypass_body``), a smaller one through it (``pump_body``); the bound is the
same.
"""

from __future__ import annotations

import hashlib

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._body import BYPASS_MIN_BODY_FROM_TLS
from trioproxy._metrics import ProxyMeters

from .helpers import CountingStream, UpstreamPort, counting_upstream_port, pattern

CONFIG = trioproxy.ProxyConfig(upstream="http://origin.test", read_size=4096, buffer_chunks=3)
BOUND = (CONFIG.buffer_chunks + 2) * CONFIG.read_size
SIZES = pytest.mark.parametrize(
    "size",
    [BYPASS_MIN_BODY_FROM_TLS + 900_000, BYPASS_MIN_BODY_FROM_TLS - 48_000],
    ids=["past-h11", "through-h11"],
)


async def receive_head(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> object:
    """Read only until h11 has a head; return it (nothing of the body is asked for)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(bytes(await stream.receive_some(1024)))


@SIZES
async def test_slow_client_bounds_what_is_pulled_from_the_upstream(size: int) -> None:
    """With a client that reads the head and then nothing, the proxy holds at
    most the bound (and fills it), then resumes and delivers byte-exact."""
    port, counted = counting_upstream_port()
    meters = ProxyMeters()
    client, proxy_side = trio.testing.lockstep_stream_pair()
    payload = pattern(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, CONFIG, open_upstream=port.open_upstream, meters=meters
            )
        )
        client_conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/big", headers=[("Host", "x")])
        await client.send_all(client_conn.send(request) + client_conn.send(h11.EndOfMessage()))
        origin = await port.accept()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
        await origin.send_all(head + payload)  # the in-memory origin is infinitely fast
        response = await receive_head(client, client_conn)
        assert isinstance(response, h11.Response)

        await trio.testing.wait_all_tasks_blocked()
        body_pulled = counted[0].received - len(head)
        assert body_pulled < size  # the proxy stopped early
        assert meters.response_bodies.held == body_pulled  # nothing delivered yet
        assert (CONFIG.buffer_chunks + 1) * CONFIG.read_size <= body_pulled <= BOUND

        digest = hashlib.sha256()
        while True:
            event = client_conn.next_event()
            if event is h11.NEED_DATA:
                client_conn.receive_data(bytes(await client.receive_some(65536)))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
            else:
                break
        assert isinstance(event, h11.EndOfMessage)
        assert digest.digest() == hashlib.sha256(payload).digest()
        await trio.testing.wait_all_tasks_blocked()  # the writer resumes after the hand-off
        assert meters.response_bodies.held == 0
        assert meters.response_bodies.peak <= BOUND
        await client.aclose()


@SIZES
async def test_slow_upstream_bounds_what_is_pulled_from_an_upload(size: int) -> None:
    """With an upstream that reads the request head and then nothing, the
    proxy pulls at most the bound of the upload from the client, then
    resumes and delivers it byte-exact."""
    port = UpstreamPort(make_pair=trio.testing.lockstep_stream_pair)
    meters = ProxyMeters()
    client, raw_proxy_side = trio.testing.memory_stream_pair()
    proxy_side = CountingStream(raw_proxy_side)
    payload = pattern(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                proxy_side, CONFIG, open_upstream=port.open_upstream, meters=meters
            )
        )
        client_conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="PUT", target="/up", headers=[("Host", "x"), ("Content-Length", str(size))]
        )
        head = client_conn.send(request)
        await client.send_all(head + payload)  # the in-memory client is infinitely fast
        origin = await port.accept()
        origin_conn = h11.Connection(h11.SERVER)
        assert isinstance(await receive_head(origin, origin_conn), h11.Request)

        await trio.testing.wait_all_tasks_blocked()
        body_pulled = proxy_side.received - len(head)
        assert body_pulled < size
        assert meters.request_bodies.held == body_pulled
        assert (CONFIG.buffer_chunks + 1) * CONFIG.read_size <= body_pulled <= BOUND

        digest = hashlib.sha256()
        while True:
            event = origin_conn.next_event()
            if event is h11.NEED_DATA:
                origin_conn.receive_data(bytes(await origin.receive_some(65536)))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
            else:
                break
        assert isinstance(event, h11.EndOfMessage)
        assert digest.digest() == hashlib.sha256(payload).digest()
        await trio.testing.wait_all_tasks_blocked()  # the writer resumes after the hand-off
        assert meters.request_bodies.held == 0
        nursery.cancel_scope.cancel()
