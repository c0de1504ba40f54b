"""The idle heap trimmer: when it trims, and that it trims only once per settle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import _memory, _server

from .helpers import UpstreamPort, read_h11_message, send_h11_message, serve_one, start_proxy


@pytest.fixture
def trims(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The trio times at which the trimmer trimmed; the heap itself is left alone."""
    times: list[float] = []

    def fake_trim() -> bool:
        times.append(trio.current_time())
        return True

    monkeypatch.setattr(_memory, "trim_heap", fake_trim)
    return times


async def test_trims_once_after_work_settles(
    autojump_clock: trio.testing.MockClock, trims: list[float]
) -> None:
    """One trim once start-up has settled (it freed what imports and parsing
    left), then none while idle, none while bytes are still held or still
    moving, exactly one once the work has stopped for one interval, one after
    connections merely opened or closed or a response was sent, and none
    while nothing happens."""
    meters = trioproxy.ProxyMeters()
    interval = _memory.IDLE_CHECK_SECONDS
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_memory.trim_heap_when_idle, meters)
        await trio.sleep(5 * interval + interval / 2)
        assert trims == [1.0]  # start-up settled; idle after it: nothing more
        meters.response_bodies.relayed += 100
        meters.response_bodies.held = 10
        await trio.sleep(3 * interval)
        assert trims == [1.0]  # bytes still held
        meters.response_bodies.held = 0
        await trio.sleep(5 * interval)
        assert trims == [1.0, 9.0]  # unchanged since t=6; first check with nothing held
        meters.client_connections = 3
        await trio.sleep(2 * interval)
        meters.client_connections = 0
        await trio.sleep(3 * interval)
        assert trims == [1.0, 9.0, 15.0, 17.0]  # opening and closing connections is work too
        meters.count_response(200)  # a whole short exchange between two checks
        await trio.sleep(3 * interval)
        assert trims == [1.0, 9.0, 15.0, 17.0, 20.0]
        await trio.sleep(10 * interval)
        assert len(trims) == 5  # idle: never twice
        nursery.cancel_scope.cancel()


def test_trim_heap_reports_what_malloc_trim_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trim_heap`` asks ``malloc_trim`` to keep no pad (argument 0) and says
    True only if it released something; without ``malloc_trim`` (not glibc)
    it does nothing and says False."""
    pads: list[int] = []

    def malloc_trim(released: int) -> Callable[[int], int]:
        def trim(pad: int) -> int:
            pads.append(pad)
            return released

        return trim

    monkeypatch.setattr(_memory, "_malloc_trim", lambda: malloc_trim(1))
    assert _memory.trim_heap() is True
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: malloc_trim(0))
    assert _memory.trim_heap() is False
    assert pads == [0, 0]
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    assert _memory.trim_heap() is False


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_trim_heap_finds_and_calls_glibcs_malloc_trim() -> None:
    """On glibc the trimmer finds ``malloc_trim`` (through ctypes), and a trim
    after a load's chunks were freed reports pages given back. (glibc counts
    every free page it advises away, so any heap that freed memory reports
    True; what this guards is that the trim reaches glibc at all.)"""
    assert _memory._malloc_trim() is not None
    chunks = [bytearray(64 * 1024) for _ in range(128)]  # a load's 64 KiB chunks
    del chunks
    assert _memory.trim_heap() is True


async def test_trims_again_when_lingering_tasks_end(
    autojump_clock: trio.testing.MockClock, trims: list[float]
) -> None:
    """Tasks that end after the meters settled (connections whose closing
    outlives their count) are work too: their memory is freed only then, so
    the trimmer trims once more after they are gone, and not again."""
    meters = trioproxy.ProxyMeters()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_memory.trim_heap_when_idle, meters)
        for _ in range(3):
            nursery.start_soon(trio.sleep, 4.5)  # a closing that lingers
        meters.client_connections = 3
        await trio.sleep(0.5)
        meters.client_connections = 0
        await trio.sleep(3)
        assert trims == [2.0]  # the meters settled; the tasks still live
        await trio.sleep(4)
        assert trims == [2.0, 6.0]  # they ended at 4.5: seen at 5, settled at 6
        await trio.sleep(10)
        assert trims == [2.0, 6.0]
        nursery.cancel_scope.cancel()


async def test_trims_as_pooled_upstreams_close(
    autojump_clock: trio.testing.MockClock, trims: list[float]
) -> None:
    """The upstream pool closes its idle connections one by one for seconds
    after the load (``--upstream-idle-timeout``) while nothing else changes.
    Their memory is free only then: the trimmer trims after each second in
    which some closed, without waiting for the pool to be still, and then
    no more."""
    meters = trioproxy.ProxyMeters()
    pooled = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_memory.trim_heap_when_idle, meters, lambda: pooled[0])
        await trio.sleep(0.5)
        meters.count_response(200)
        pooled[0] = 4  # the exchanges returned their upstream connections
        await trio.sleep(2)
        assert trims == [2.0]  # the client side settled
        for _ in range(4):
            pooled[0] -= 1  # the reaper closes one each second: 2.5, 3.5, 4.5, 5.5
            await trio.sleep(1)
        await trio.sleep(10)
        assert trims == [2.0, 3.0, 4.0, 5.0, 6.0]
        nursery.cancel_scope.cancel()


def test_trim_heap_releases_names_held_by_the_type_cache() -> None:
    """CPython's type cache keeps a reference to every attribute name it
    looked up; a name made at run time (as C code calling a method by a C
    string does on every call) stays alive in it until the trim clears it."""
    name = "".join(["with_", "traceback"])  # built at run time: not interned
    alone = sys.getrefcount(name)
    getattr(ValueError(), name)
    if sys.getrefcount(name) == alone:
        pytest.skip("this interpreter's type cache does not hold names")
    _memory.trim_heap()
    assert sys.getrefcount(name) == alone


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (None, "glibc.malloc.tcache_count=0"),
        ("", "glibc.malloc.tcache_count=0"),
        ("glibc.malloc.arena_max=1", "glibc.malloc.arena_max=1:glibc.malloc.tcache_count=0"),
        ("glibc.malloc.tcache_count=7", "glibc.malloc.tcache_count=7"),  # the user's choice
    ],
)
def test_glibc_tunables_turn_the_tcache_off_and_keep_the_users(
    current: str | None, expected: str
) -> None:
    assert _memory.glibc_tunables(current) == expected


async def test_the_server_shows_the_trimmer_its_pool(
    monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """``serve`` hands the trimmer a count of the upstream pool's idle
    connections: 1 once a reverse-proxied response is done and until the
    pool's idle timeout (``--upstream-idle-timeout``) has passed, 0 once it
    has closed it."""
    counts: list[Callable[[], int]] = []

    async def capture(meters: trioproxy.ProxyMeters, idle_upstreams: Callable[[], int]) -> None:
        counts.append(idle_upstreams)
        await trio.sleep_forever()

    monkeypatch.setattr(_server, "trim_heap_when_idle", capture)
    # The clock runs at real speed (so fail_after still catches a hang) and
    # the idle timeout is far beyond what this test takes: the pooled
    # connection expires only when the test jumps the clock past it.
    mock_clock.rate = 1
    idle_timeout = 600.0
    config = trioproxy.ProxyConfig(
        upstream="http://origin.test:9000", upstream_idle_timeout=idle_timeout
    )
    upstream = UpstreamPort()
    with trio.fail_after(idle_timeout + 20):  # a bound on a hang, not a timing check
        async with trio.open_nursery() as nursery:
            port = await start_proxy(nursery, config, open_upstream=upstream.open_upstream)
            (idle_upstreams,) = counts
            assert idle_upstreams() == 0
            client = await trio.open_tcp_stream("127.0.0.1", port)
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target="/", headers=[("Host", "a")])
            await send_h11_message(client, conn, request)
            await serve_one(await upstream.accept(), h11.Connection(h11.SERVER))
            head, _ = await read_h11_message(client, conn)
            assert isinstance(head, h11.Response)
            await trio.testing.wait_all_tasks_blocked()
            assert idle_upstreams() == 1
            mock_clock.jump(idle_timeout / 2)
            await trio.testing.wait_all_tasks_blocked()
            assert idle_upstreams() == 1  # kept: the pool's timeout has not passed
            mock_clock.jump(idle_timeout / 2)  # now it has
            await trio.testing.wait_all_tasks_blocked()
            assert idle_upstreams() == 0
            await client.aclose()
            nursery.cancel_scope.cancel()
