"""Graceful shutdown on fakes and in-memory streams, with exact virtual times.

The real-process behaviour (signals, exit status) is in test_process.py.
"""

from __future__ import annotations

import functools
import gc
import tracemalloc

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import _shutdown, handle_connection
from trioproxy._shutdown import Shutdown, serve_until_shutdown

from .fakes import FakeListener, HeldConnections
from .helpers import UpstreamPort, read_h11_message, send_h11_message

GET = h11.Request(method="GET", target="http://o.test/", headers=[("Host", "o.test")])


async def test_begin_cuts_idle_waits_now_and_later(autojump_clock: trio.abc.Clock) -> None:
    """``begin`` cancels every idle wait in progress, and waits that start
    afterwards are cancelled from the start."""
    shutdown = Shutdown()
    cut: list[bool] = []

    async def idle() -> None:
        with shutdown.idle_wait() as scope:
            await trio.sleep(1000)
        cut.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle)
        await trio.testing.wait_all_tasks_blocked()
        shutdown.begin()
    assert cut == [True]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle)
    assert cut == [True, True]


async def test_idle_wait_deadline_ends_the_wait_and_unregisters(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An idle wait with a deadline ends by itself exactly then (one scope for
    both shutdown and timeout), and no longer counts as idle afterwards, even
    when it ends by an exception."""
    shutdown = Shutdown()
    start = trio.current_time()
    with shutdown.idle_wait(start + 7) as scope:
        assert shutdown._idle_scopes == {scope}
        await trio.sleep(1000)
    assert scope.cancelled_caught
    assert trio.current_time() - start == 7
    assert shutdown._idle_scopes == set()
    with pytest.raises(ZeroDivisionError), shutdown.idle_wait(start + 100):
        raise ZeroDivisionError
    assert shutdown._idle_scopes == set()


async def test_idle_waits_give_their_memory_back_after_a_peak() -> None:
    """Memory: after 500 connections waited idle at once and ended, nothing
    that registering them allocated is still held (the registry does not keep
    a table of its peak size)."""
    shutdown = Shutdown()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        before = _allocated_by_shutdown()
        async with trio.open_nursery() as nursery:
            for _ in range(500):
                nursery.start_soon(_wait_idle, shutdown)
            await trio.testing.wait_all_tasks_blocked()
            peak = _allocated_by_shutdown()
            shutdown.begin()
        after = _allocated_by_shutdown()
    finally:
        if not tracing:
            tracemalloc.stop()
    assert peak - before > 64 * 1024  # the scopes and their registry
    assert after <= before


def _allocated_by_shutdown() -> int:
    """Bytes alive that code in trioproxy/_shutdown.py allocated (tracemalloc)."""
    gc.collect()  # a cancelled wait's scope sits in an exception <-> frame cycle
    snapshot = tracemalloc.take_snapshot()
    in_shutdown = snapshot.filter_traces([tracemalloc.Filter(True, _shutdown.__file__)])
    return sum(stat.size for stat in in_shutdown.statistics("filename"))


async def _wait_idle(shutdown: Shutdown) -> None:
    with shutdown.idle_wait():
        await trio.sleep_forever()


async def test_drain_waits_for_inflight_then_cancels_at_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """On the trigger (t=1) the listener closes at once; a connection that
    ends by itself (t=4) ends normally; one still running is cancelled at
    exactly trigger + shutdown_timeout (t=11), and serving returns then."""
    listener = FakeListener()
    held = HeldConnections()
    trigger = trio.Event()
    config = trioproxy.ProxyConfig(shutdown_timeout=10.0)
    serve = functools.partial(
        serve_until_shutdown,
        held.handle,
        [listener],
        config=config,
        shutdown=Shutdown(),
        trigger=trigger.wait,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        quick, stuck = listener.connect(), listener.connect()
        await held.wait_for(2)
        await trio.sleep(1)
        trigger.set()
        await trio.testing.wait_all_tasks_blocked()
        assert listener.closed
        await trio.sleep(3)
        held.releases[0].set()
        assert await quick.receive_some(10) == b""
        assert trio.current_time() == 4.0
        assert await stuck.receive_some(10) == b""
        assert trio.current_time() == 11.0
    assert trio.current_time() == 11.0


async def test_drain_ends_as_soon_as_connections_do(autojump_clock: trio.abc.Clock) -> None:
    """With nothing in flight, serving returns at the trigger, not after the timeout."""
    trigger = trio.Event()
    serve = functools.partial(
        serve_until_shutdown,
        HeldConnections().handle,
        [FakeListener()],
        config=trioproxy.ProxyConfig(shutdown_timeout=10.0),
        shutdown=Shutdown(),
        trigger=trigger.wait,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        await trio.sleep(2)
        trigger.set()
    assert trio.current_time() == 2.0


async def answer_ok(port: UpstreamPort, thinking: float = 0.0) -> None:
    stream = await port.accept()
    conn = h11.Connection(h11.SERVER)
    await read_h11_message(stream, conn)
    await trio.sleep(thinking)
    ok = h11.Response(status_code=200, headers=[("Content-Length", "2")])
    await send_h11_message(stream, conn, ok, b"ok")


async def test_idle_keepalive_connection_closes_when_drain_begins(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A keep-alive connection waiting for its next request is closed at the
    moment the drain begins, not at its idle timeout."""
    port = UpstreamPort()
    shutdown = Shutdown()
    async with trio.open_nursery() as nursery:
        client, proxy_side = trio.testing.memory_stream_pair()
        nursery.start_soon(
            functools.partial(
                handle_connection,
                proxy_side,
                trioproxy.ProxyConfig(),
                open_upstream=port.open_upstream,
                shutdown=shutdown,
            )
        )
        nursery.start_soon(answer_ok, port)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        await read_h11_message(client, conn)
        await trio.sleep(5)
        shutdown.begin()
        assert await client.receive_some(10) == b""
        assert trio.current_time() == 5.0


async def test_inflight_exchange_finishes_then_connection_closes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An exchange in flight when the drain begins gets its whole response;
    then the connection closes instead of waiting for another request."""
    port = UpstreamPort()
    shutdown = Shutdown()
    async with trio.open_nursery() as nursery:
        client, proxy_side = trio.testing.memory_stream_pair()
        nursery.start_soon(
            functools.partial(
                handle_connection,
                proxy_side,
                trioproxy.ProxyConfig(),
                open_upstream=port.open_upstream,
                shutdown=shutdown,
            )
        )
        nursery.start_soon(answer_ok, port, 7.0)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        await trio.sleep(1)
        shutdown.begin()
        response, body = await read_h11_message(client, conn)
        assert isinstance(response, h11.Response)
        assert (response.status_code, body) == (200, b"ok")
        assert await client.receive_some(10) == b""
        assert trio.current_time() == 7.0


def test_shutdown_timeout_may_be_zero_but_not_negative() -> None:
    """0 means "cut in-flight requests at once"; a negative value is refused."""
    assert trioproxy.ProxyConfig(shutdown_timeout=0).shutdown_timeout == 0
    with pytest.raises(ValueError, match="shutdown_timeout"):
        trioproxy.ProxyConfig(shutdown_timeout=-1.0)
