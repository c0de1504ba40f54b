"""The bounded accept loop and the open-file limit."""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._limits import (
    ACCEPT_RETRY_SECONDS,
    descriptors_needed,
    raise_open_file_limit,
    serve_listeners_limited,
    take_slot,
)

from .fakes import FakeListener, HeldConnections, Stream
from .helpers import serve_origin, start_proxy


async def test_connection_beyond_limit_waits_until_one_ends() -> None:
    """With a limit of 2, a third queued connection is not even accepted until
    one of the first two ends; then it is served."""
    listener = FakeListener()
    held = HeldConnections()
    limiter = trio.Semaphore(2)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_listeners_limited,
            held.handle,
            [listener],
            limiter=limiter,
            handler_nursery=nursery,
        )
        await nursery.start(serve)
        for _ in range(3):
            listener.connect()
        await trio.testing.wait_all_tasks_blocked()
        assert len(held.served) == 2
        assert listener.accepts == 2  # the loop waits on the limiter, not in accept
        held.releases[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(held.served) == 3
        assert held.most_active == 2
        nursery.cancel_scope.cancel()
    assert listener.closed


async def test_free_slot_is_taken_without_a_schedule_point() -> None:
    """A free connection slot costs the accept loop no pass of the run loop
    (the accept yields already); only a full limiter makes it wait."""
    limiter = trio.Semaphore(1)
    with trio.testing.assert_no_checkpoints():
        await take_slot(limiter)
    assert limiter.value == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_slot, limiter)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1
        limiter.release()
    assert limiter.value == 0


async def test_limit_holds_across_listeners() -> None:
    """Two listeners share one limit: never more than 2 connections at once."""
    listeners = [FakeListener(), FakeListener()]
    held = HeldConnections()
    limiter = trio.Semaphore(2)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_listeners_limited,
            held.handle,
            listeners,
            limiter=limiter,
            handler_nursery=nursery,
        )
        await nursery.start(serve)
        for _ in range(3):
            for listener in listeners:
                listener.connect()
        await trio.testing.wait_all_tasks_blocked()
        assert held.active == 2
        for _ in range(4):
            held.releases[-held.active].set()
            await trio.testing.wait_all_tasks_blocked()
        assert len(held.served) == 6
        assert held.most_active == 2
        nursery.cancel_scope.cancel()


async def test_closed_connection_frees_its_slot_even_if_handler_fails() -> None:
    """A handler that raises still gives its slot back and its stream is closed."""
    listener = FakeListener()
    limiter = trio.Semaphore(1)
    handled: list[Stream] = []

    async def failing(stream: Stream) -> None:
        handled.append(stream)
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_listeners_limited, failing, [listener], limiter=limiter, handler_nursery=nursery
        )
        await nursery.start(serve)
        clients = [listener.connect() for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(handled) == 3
        assert limiter.value == 0  # the accept loop's slot, waiting for a 4th
        for client in clients:
            assert await client.receive_some(10) == b""  # closed by the server
        nursery.cancel_scope.cancel()


async def test_emfile_is_waited_out(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Running out of descriptors does not kill the server: each EMFILE is
    logged and retried after ACCEPT_RETRY_SECONDS, then serving goes on."""
    caplog.set_level(logging.ERROR, logger="trioproxy")
    listener = FakeListener(errors=[OSError(errno.EMFILE, "Too many open files")] * 3)
    held = HeldConnections()
    limiter = trio.Semaphore(10)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_listeners_limited,
            held.handle,
            [listener],
            limiter=limiter,
            handler_nursery=nursery,
        )
        await nursery.start(serve)
        listener.connect()
        await held.wait_for(1)
        assert trio.current_time() == pytest.approx(3 * ACCEPT_RETRY_SECONDS, abs=1e-9)
        assert len([r for r in caplog.records if "EMFILE" in r.getMessage()]) == 3
        assert limiter.value == 10 - 2  # one connection, one waiting accept
        nursery.cancel_scope.cancel()


async def test_other_accept_errors_propagate() -> None:
    """An accept error that is not about capacity is a real failure: raised."""
    listener = FakeListener(errors=[OSError(errno.EBADF, "Bad file descriptor")])
    limiter = trio.Semaphore(1)
    with pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                serve_listeners_limited,
                HeldConnections().handle,
                [listener],
                limiter=limiter,
                handler_nursery=nursery,
            )
            await nursery.start(serve)
            await trio.sleep_forever()
    assert caught.group_contains(OSError, match="Bad file descriptor")


async def test_loopback_limit_with_real_sockets() -> None:
    """On real TCP listeners with a limit of 1, a second client is served only
    after the first connection closes (it waits in the kernel's backlog): the
    accept loop waits for a slot, not in ``accept``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held = HeldConnections()
    limiter = trio.Semaphore(1)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_listeners_limited,
            held.handle,
            listeners,
            limiter=limiter,
            handler_nursery=nursery,
        )
        await nursery.start(serve)
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await held.wait_for(1)
        second = await trio.open_tcp_stream("127.0.0.1", port)  # completes in the backlog
        await second.send_all(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().tasks_waiting == 1  # the accept loop, for a slot
        assert len(held.served) == 1
        held.releases[0].set()
        with trio.fail_after(10):  # a bound on a hang, not a timing check
            await held.wait_for(2)
        assert await held.served[1].receive_some(5) == b"hello"
        await first.aclose()
        await second.aclose()
        nursery.cancel_scope.cancel()


def test_open_file_limit_raised_to_hard_limit() -> None:
    """After the call the soft limit equals the hard one (Linux: hard is finite)."""
    soft = raise_open_file_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
async def test_descriptors_needed_covers_what_proxied_connections_hold() -> None:
    """With N exchanges in flight through the real server (forward mode, each
    waiting for its origin), the proxy's descriptors grew by no more than
    ``descriptors_needed`` allows for N connections beyond the fixed spare."""
    in_flight = 4
    arrived: list[h11.Request] = []
    all_arrived = trio.Event()
    release = trio.Event()

    async def held(
        request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        arrived.append(request)
        if len(arrived) == in_flight:
            all_arrived.set()
        await release.wait()
        return 200, [], b"ok"

    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, held)
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig())
        before = open_descriptors()
        clients = [await trio.open_tcp_stream("127.0.0.1", proxy_port) for _ in range(in_flight)]
        for client in clients:
            await client.send_all(
                b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\n\r\n" % origin_port
            )
        with trio.fail_after(10):  # a bound on a hang, not a timing check
            await all_arrived.wait()
        # This process also holds the clients' ends and the origin's accepted ends.
        proxy_held = open_descriptors() - before - 2 * in_flight
        assert 0 < proxy_held <= descriptors_needed(in_flight) - descriptors_needed(0)
        release.set()
        for client in clients:
            assert (await client.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            await client.aclose()
        nursery.cancel_scope.cancel()


async def test_serve_applies_max_connections() -> None:
    """``serve`` with max_connections=1: while one keep-alive client holds its
    connection, a second client's connection is not even taken (it waits in
    the kernel's backlog) and its request gets no answer; it is answered as
    soon as the first connection closes."""

    async def hello(
        request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        return 200, [], b"hello"

    request = b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: x\r\n\r\n"
    meters = trioproxy.ProxyMeters()
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, hello)
        proxy_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(max_connections=1), meters=meters
        )
        first = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        await first.send_all(request % origin_port)
        assert (await first.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        second = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        await second.send_all(request % origin_port)
        await trio.testing.wait_all_tasks_blocked()
        assert meters.client_connections == 1
        assert meters.responses == {200: 1}
        await first.aclose()
        with trio.fail_after(10):  # a bound on a hang, not a timing check
            assert (await second.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        await second.aclose()
        nursery.cancel_scope.cancel()
