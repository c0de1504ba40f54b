"""Reload: a new front for new exchanges, nothing in flight dropped.

Unit tests of the swap (``Front.build``, ``apply_reload``), one in-process
server fed new configurations, and the real thing: SIGHUP to a process
reading ``--config`` during a large download, alone and with ``--workers
2``. The download is 64 MiB in the suite; ``RELOAD_DOWNLOAD=1GiB`` runs the
same tests with a larger one by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio
import trio.testing

from trioproxy import ProxyConfig
from trioproxy._balance import GroupSpec, UpstreamServer
from trioproxy._front import Front, LiveFront
from trioproxy._metrics import ProxyMeters
from trioproxy._pool import UpstreamPool
from trioproxy._reload import apply_reload
from trioproxy._routes import Route, RouteTable
from trioproxy._units import parse_size

from .helpers import PROMPTLY, proxy_process, read_h11_message, send_h11_message, start_proxy
from .streaming_origin import OriginLog, expected_sha256, serve_streaming_origin

DOWNLOAD = parse_size(os.environ.get("RELOAD_DOWNLOAD", "64MiB"))


def server(port: int) -> UpstreamServer:
    return UpstreamServer("http", "127.0.0.1", port)


def config_of(**groups: tuple[int, ...]) -> ProxyConfig:
    """Groups of loopback servers by port, the first one the default route."""
    specs = tuple(
        GroupSpec(name=name, servers=tuple(server(port) for port in ports))
        for name, ports in groups.items()
    )
    return ProxyConfig(upstreams=specs, routes=RouteTable((Route(upstream=specs[0].name),)))


# ---- The swap, without I/O ----


def test_servers_that_stay_keep_their_state() -> None:
    """Health, failures and in-flight counts carry over for a server that
    stays in its group; a new server starts fresh; an attempt picked before
    the reload finishes against the counters the new group balances on."""
    old = Front.build(config_of(api=(1, 2)))
    group = old.groups["api"]
    first = group.pick(0.0)
    assert first is not None
    assert first.server == server(1)
    second = group.pick(0.0)
    assert second is not None
    group.report(second, ok=False, now=0.0)  # max_fails 1: server 2 is out
    group.finished(second)
    new = Front.build(config_of(api=(2, 1, 3)), previous=old)
    states = {state.server.port: state for state in new.groups["api"].states}
    assert states[2].health() == "down"
    assert states[1].in_flight == 1
    assert (states[3].health(), states[3].in_flight) == ("up", 0)
    group.finished(first)  # the exchange that began before the reload ends
    assert states[1].in_flight == 0


def test_a_group_without_health_checks_lets_held_servers_back_in() -> None:
    checked = attrs.evolve(
        config_of(api=(1,)),
        upstreams=(GroupSpec(name="api", servers=(server(1),), health_check="/h"),),
    )
    old = Front.build(checked)
    old.groups["api"].mark_down(old.groups["api"].states[0])
    assert Front.build(checked, previous=old).groups["api"].states[0].held_down
    assert not Front.build(config_of(api=(1,)), previous=old).groups["api"].states[0].held_down


def test_a_smaller_max_fails_cuts_the_failure_window() -> None:
    wide = attrs.evolve(
        config_of(api=(1, 2)),
        upstreams=(GroupSpec(name="api", servers=(server(1), server(2)), max_fails=5),),
    )
    old = Front.build(wide)
    for now in (0.0, 1.0, 2.0):
        attempt = old.groups["api"].pick(now)
        assert attempt is not None
        old.groups["api"].report(attempt, ok=False, now=now)
        old.groups["api"].finished(attempt)
    new = Front.build(config_of(api=(1, 2)), previous=old)
    assert all(state.failure_window.maxlen == 1 for state in new.groups["api"].states)


def test_apply_reload_keeps_what_needs_a_restart(caplog: pytest.LogCaptureFixture) -> None:
    """``listen`` and ``max_connections`` keep their values, each with a
    warning; the rest (routes, groups, timeouts, pool caps) is applied."""
    live = LiveFront.of(config_of(one=(1,)))
    pool = UpstreamPool(max_idle=256, max_idle_per_server=32)
    new = attrs.evolve(
        config_of(two=(2,)),
        listen_port=9999,
        max_connections=5,
        idle_timeout=3.0,
        upstream_pool_size=4,
    )
    front = apply_reload(live, new, pool)
    assert live.current is front
    assert (front.config.listen_port, front.config.max_connections) == (8080, 1024)
    assert front.config.idle_timeout == 3.0
    assert set(front.groups) == {"two"}
    assert (pool.max_idle, pool.max_idle_per_server) == (256, 4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "reload: listen: changing it needs a restart; keeping 127.0.0.1:8080",
        "reload: max_connections: changing it needs a restart; keeping 1024",
    ]


def test_apply_reload_does_not_switch_modes() -> None:
    live = LiveFront.of(config_of(one=(1,)))
    front = apply_reload(live, ProxyConfig(), UpstreamPool(max_idle=1))
    assert front.reverse
    assert set(front.groups) == {"one"}


# ---- Origins and a client that reads a download in steps ----


@attrs.define
class NamedOrigin:
    """A loopback origin that answers every request with its name, keeps
    connections alive, and counts the connections it saw close."""

    name: bytes
    port: int = 0
    requests: int = 0
    closed: int = 0
    closing: trio.Event = attrs.Factory(trio.Event)
    hold: trio.Event | None = None  # set: answers wait for it
    held: trio.Event = attrs.Factory(trio.Event)  # a request waits for ``hold``

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                await read_h11_message(stream, conn)
                self.requests += 1
                if self.hold is not None:
                    self.held.set()
                    await self.hold.wait()
                response = h11.Response(
                    status_code=200, headers=[("Content-Length", str(len(self.name)))]
                )
                await send_h11_message(stream, conn, response, self.name)
                conn.start_next_cycle()
        except (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.closed += 1
            self.closing.set()
            self.closing = trio.Event()
            await stream.aclose()


async def get(port: int, target: str = "/who") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=target, headers=[("Host", "site.test"), ("Connection", "close")]
        )
        await send_h11_message(stream, conn, request)
        response, body = await read_h11_message(stream, conn)
        assert isinstance(response, h11.Response)
        return response.status_code, body


@attrs.define
class Download:
    """A GET of ``/bytes/N`` through the proxy, read in steps and hashed."""

    stream: trio.SocketStream
    conn: h11.Connection = attrs.Factory(lambda: h11.Connection(h11.CLIENT))
    digest: hashlib._Hash = attrs.Factory(hashlib.sha256)
    received: int = 0
    done: bool = False

    @classmethod
    async def start(cls, port: int, size: int) -> Download:
        download = cls(await trio.open_tcp_stream("127.0.0.1", port))
        request = h11.Request(
            method="GET", target=f"/bytes/{size}", headers=[("Host", "site.test")]
        )
        await send_h11_message(download.stream, download.conn, request)
        return download

    async def read(self, at_least: int) -> None:
        """Read until ``at_least`` body bytes arrived in all, or the end."""
        while not self.done and self.received < at_least:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(1 << 20))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200
            elif isinstance(event, h11.Data):
                self.digest.update(event.data)
                self.received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
            else:
                raise AssertionError(f"the download broke: {event!r}")

    async def finish(self) -> tuple[int, str]:
        await self.read(1 << 62)
        await self.stream.aclose()
        return self.received, self.digest.hexdigest()


# ---- A server fed new configurations ----


async def test_a_reload_during_a_download_changes_routes_for_new_exchanges_only(
    nursery: trio.Nursery,
) -> None:
    """While a download and a slow request run on the old groups' servers, a
    reload sends new requests to the new group's server; the download
    finishes byte-exact and the slow response arrives; the idle connection
    to a removed server is closed at the reload, and the slow request's
    connection when its exchange ends (it is not pooled)."""
    log = OriginLog()
    streaming = await nursery.start(serve_streaming_origin, log)
    old, slow, new = NamedOrigin(b"old"), NamedOrigin(b"slow"), NamedOrigin(b"new")
    for origin in (old, slow, new):
        await nursery.start(origin.serve)
    slow.hold = trio.Event()
    config = ProxyConfig(
        upstreams=(
            GroupSpec(name="files", servers=(server(streaming),)),
            GroupSpec(name="slow", servers=(server(slow.port),)),
            GroupSpec(name="one", servers=(server(old.port),)),
        ),
        routes=RouteTable(
            (
                Route(upstream="files", path_prefix="/bytes/"),
                Route(upstream="slow", path_prefix="/slow/"),
                Route(upstream="one"),
            )
        ),
    )
    meters = ProxyMeters.for_config(config)
    send, receive = trio.open_memory_channel[ProxyConfig](1)
    port = await start_proxy(nursery, config, reloads=receive, meters=meters)
    download = await Download.start(port, DOWNLOAD)
    await download.read(1 << 20)  # under way
    assert await get(port) == (200, b"old")
    answers: list[tuple[int, bytes]] = []
    nursery.start_soon(lambda: append(answers, get(port, "/slow/x")))
    await slow.held.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert old.closed == 0  # its connection is idle in the pool
    await send.send(config_of(two=(new.port,)))
    with trio.fail_after(PROMPTLY):
        await old.closing.wait()  # the reload closed the idle connection to a removed server
    for target in ("/who", "/slow/y", "/bytes/1"):
        assert await get(port, target) == (200, b"new")
    slow.hold.set()
    with trio.fail_after(PROMPTLY):
        await slow.closing.wait()  # answered, then closed by the proxy: not pooled
    assert answers == [(200, b"slow")]
    assert await download.finish() == (DOWNLOAD, expected_sha256(DOWNLOAD))
    await trio.testing.wait_all_tasks_blocked()
    assert meters.pooled_upstreams() == 1  # to "new" only
    assert (old.requests, slow.requests, new.requests) == (1, 1, 3)
    assert [request.target for request in log.requests] == [f"/bytes/{DOWNLOAD}".encode()]


async def append(answers: list[tuple[int, bytes]], answer: Awaitable[tuple[int, bytes]]) -> None:
    answers.append(await answer)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


# ---- SIGHUP to a real process ----

CONFIG = """\
log_level = "info"
access_log = "off"

[upstream.{name}]
servers = [{servers}]

[[route]]
upstream = "{name}"
"""


def write_config(path: Path, name: str, *ports: int) -> None:
    servers = ", ".join(f'"http://127.0.0.1:{port}"' for port in ports)
    path.write_text(CONFIG.format(name=name, servers=servers))


@asynccontextmanager
async def origins() -> AsyncIterator[tuple[int, NamedOrigin]]:
    """A streaming origin (for the download) and an origin named ``new``."""
    async with trio.open_nursery() as nursery:
        streaming = await nursery.start(serve_streaming_origin, OriginLog())
        new = NamedOrigin(b"new")
        await nursery.start(new.serve)
        yield streaming, new
        nursery.cancel_scope.cancel()


async def sighup_during_a_download(tmp_path: Path, *, workers: int) -> None:
    """The SIGHUP scenario of issue #12, for one process or a supervisor of
    ``workers`` workers (see the two tests)."""
    path = tmp_path / "trioproxy.toml"
    async with origins() as (streaming, new):
        write_config(path, "one", streaming)
        args = ["--config", str(path), "--workers", str(workers)]
        async with proxy_process(*args) as proxy:
            download = await Download.start(proxy.port, DOWNLOAD)
            await download.read(1 << 20)
            write_config(path, "two", new.port)
            proxy.process.send_signal(signal.SIGHUP)
            with trio.fail_after(PROMPTLY):
                for _ in range(workers):
                    await proxy.stderr.until("reload: configuration applied")
            for _ in range(4 * workers):  # new connections land on every worker
                assert await get(proxy.port) == (200, b"new")
            path.write_text(path.read_text().replace('upstream = "two"', 'upstream = "three"'))
            proxy.process.send_signal(signal.SIGHUP)
            with trio.fail_after(PROMPTLY):
                [refused] = (await proxy.stderr.until("reload refused"))[-1:]
            assert f"{path}:8: route 1: upstream 'three' is not defined" in refused
            for _ in range(2 * workers):
                assert await get(proxy.port) == (200, b"new")
            assert await download.finish() == (DOWNLOAD, expected_sha256(DOWNLOAD))
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(PROMPTLY):
                assert await proxy.process.wait() == 0
            rest = await proxy.stderr.rest()
            assert "reload: configuration applied" not in rest  # the bad file changed nothing
            assert "Traceback" not in rest


async def test_sighup_reloads_the_file_during_a_download(tmp_path: Path) -> None:
    """A download under way when SIGHUP comes finishes byte-exact while new
    requests already follow the new routes; a bad file on SIGHUP is one error
    line naming its line and key, and the running configuration stays."""
    await sighup_during_a_download(tmp_path, workers=1)


async def test_sighup_with_workers_validates_once_and_reloads_each_worker(
    tmp_path: Path,
) -> None:
    """The same with ``--workers 2``: the supervisor validates the file and
    passes SIGHUP on, each worker reloads; a bad file stops at the
    supervisor."""
    await sighup_during_a_download(tmp_path, workers=2)
