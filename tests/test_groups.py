"""Upstream groups wired into the exchange: balancing, passive and active
health, the retry on the next server, 502 when every server is out.

In memory: ``handle_connection`` serves each client on a memory stream,
every connection shares one front (as under ``serve``), and an injected
``open_upstream`` hands out in-memory servers (``FakeServers``) that answer
with their port, can be stopped (connections refused), held (responses
wait), or made to break. With the ``autojump_clock`` every time below is
exact virtual time: no test sleeps for real.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing

from trioproxy import ProxyConfig
from trioproxy._balance import GroupSpec, UpstreamServer
from trioproxy._configfile import load_settings
from trioproxy._connection import handle_connection
from trioproxy._errors import BadGateway
from trioproxy._front import LiveFront
from trioproxy._health import check_front_forever
from trioproxy._metrics import ProxyMeters, render_prometheus
from trioproxy._pool import UpstreamPool
from trioproxy._routes import Route, RouteTable

from .helpers import read_h11_message, send_h11_message, serve_origin, start_proxy

PORTS = (9001, 9002, 9003)


@attrs.define
class FakeServers:
    """In-memory servers on 127.0.0.1, one per port: each answers ``port``
    (or the status ``health`` says, for ``/healthz``) on a keep-alive
    connection. ``stopped`` ports refuse connections; ``held`` ports answer
    only once their event is set; ``breaking`` ports close after reading a
    request, without a byte of response."""

    nursery: trio.Nursery
    connects: Counter[int] = attrs.Factory(Counter)
    requests: Counter[int] = attrs.Factory(Counter)
    bodies: list[bytes] = attrs.Factory(list)
    stopped: set[int] = attrs.Factory(set)
    breaking: set[int] = attrs.Factory(set)
    held: dict[int, trio.Event] = attrs.Factory(dict)
    health: dict[int, int] = attrs.Factory(dict)

    async def open_upstream(self, host: str, port: int) -> trio.abc.Stream:
        self.connects[port] += 1
        if port in self.stopped:
            raise BadGateway(f"cannot connect to {host}:{port}: Connection refused")
        proxy_side, server_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, port, server_side)
        return proxy_side

    async def _serve(self, port: int, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                try:
                    request, body = await read_h11_message(stream, conn)
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                assert isinstance(request, h11.Request)
                if port in self.breaking:
                    return
                if request.target == b"/healthz":
                    status, answer = self.health.get(port, 200), b"health"
                else:
                    self.requests[port] += 1
                    self.bodies.append(body)
                    if port in self.held:
                        await self.held[port].wait()
                    status, answer = 200, str(port).encode()
                response = h11.Response(
                    status_code=status, headers=[("Content-Length", str(len(answer)))]
                )
                await send_h11_message(stream, conn, response, answer)
                if conn.our_state is not h11.DONE:
                    return  # the request said Connection: close
                conn.start_next_cycle()


@attrs.define
class Front:
    """A reverse proxy of one group ``api`` over the fake servers."""

    nursery: trio.Nursery
    servers: FakeServers
    config: ProxyConfig
    live: LiveFront
    meters: ProxyMeters
    pool: UpstreamPool

    async def request(
        self, method: str = "GET", body: bytes = b"", host: str = "a.test", target: str = "/"
    ) -> tuple[int, bytes]:
        """One request on a new client connection; returns (status, body)."""
        client, proxy_side = trio.testing.memory_stream_pair()
        self.nursery.start_soon(
            lambda: handle_connection(
                proxy_side,
                self.config,
                open_upstream=self.servers.open_upstream,
                meters=self.meters,
                pool=self.pool,
                fronts=self.live,
            )
        )
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", host), ("Connection", "close")]
        if body or method == "POST":
            headers.append(("Content-Length", str(len(body))))
        await send_h11_message(
            client, conn, h11.Request(method=method, target=target, headers=headers), body
        )
        response, answer = await read_h11_message(client, conn)
        await client.aclose()
        assert isinstance(response, h11.Response)
        return response.status_code, answer

    def state(self, port: int) -> Any:
        [state] = [s for s in self.live.current.groups["api"].states if s.server.port == port]
        return state


def group_config(ports: tuple[int, ...] = PORTS, **settings: Any) -> ProxyConfig:
    servers = tuple(UpstreamServer("http", "127.0.0.1", port) for port in ports)
    return ProxyConfig(
        upstreams=(GroupSpec(name="api", servers=servers, **settings),),
        routes=RouteTable((Route(upstream="api"),)),
    )


@asynccontextmanager
async def front_of(config: ProxyConfig) -> AsyncIterator[Front]:
    async with trio.open_nursery() as nursery:
        servers = FakeServers(nursery)
        meters = ProxyMeters.for_config(config)
        live = LiveFront.of(config)
        meters.groups = lambda: live.current.groups.values()
        pool = UpstreamPool(max_idle=8, max_idle_per_server=2)
        yield Front(nursery, servers, config, live, meters, pool)
        nursery.cancel_scope.cancel()


async def spread(front: Front, count: int) -> Counter[int]:
    """Send ``count`` requests one after another; which port answered each."""
    answered: Counter[int] = Counter()
    for _ in range(count):
        status, body = await front.request()
        assert status == 200
        answered[int(body)] += 1
    return answered


async def test_round_robin_spreads_requests_evenly(autojump_clock: trio.abc.Clock) -> None:
    """30 requests over three servers: 10, 10 and 10."""
    async with front_of(group_config()) as front:
        assert await spread(front, 30) == {9001: 10, 9002: 10, 9003: 10}


async def test_least_conn_sends_new_requests_away_from_a_busy_server(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While one server holds two slow responses, least_conn sends every new
    request to the other two, evenly; round robin would send it a third."""
    async with front_of(group_config(balance="least_conn")) as front:
        release = front.servers.held[9001] = trio.Event()
        slow: list[tuple[int, bytes]] = []

        async def slow_request() -> None:
            slow.append(await front.request())

        front.nursery.start_soon(slow_request)
        await trio.testing.wait_all_tasks_blocked()
        assert await spread(front, 1) == {9002: 1}  # 9001 is busy, 9002 is next
        front.servers.held[9003] = release
        front.nursery.start_soon(slow_request)  # 9003 and 9002 are idle: ties go in turn
        await trio.testing.wait_all_tasks_blocked()
        assert front.state(9001).in_flight + front.state(9003).in_flight == 2
        assert await spread(front, 20) == {9002: 20}  # the only server with nothing in flight
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(slow) == [(200, b"9001"), (200, b"9003")]
        assert await spread(front, 3) == {9001: 1, 9002: 1, 9003: 1}


async def test_a_stopped_server_is_taken_out_and_tried_again_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A server that refuses connections: after max_fails failures no request
    goes to it, and every client request still succeeds through the others
    (each failed connect is retried on the next server, at no cost in time);
    after fail_timeout exactly one request tries it again; once it answers,
    it is back in the rotation."""
    async with front_of(group_config(max_fails=2, fail_timeout=10.0)) as front:
        front.servers.stopped.add(9003)
        answered = await spread(front, 30)
        assert front.servers.connects[9003] == 2  # max_fails, then out
        assert answered == {9001: 15, 9002: 15}
        assert trio.current_time() == 0  # failing over waited for nothing
        assert front.state(9003).health() == "down"

        await trio.sleep(9.9)
        await spread(front, 10)
        assert front.servers.connects[9003] == 2  # still out
        await trio.sleep(0.1)
        await spread(front, 30)
        assert front.servers.connects[9003] == 3  # one probe at fail_timeout, which failed

        front.servers.stopped.clear()
        await trio.sleep(10)
        answered = await spread(front, 30)
        assert front.servers.connects[9003] >= 4  # the probe passed: back in
        assert answered[9003] == 10
        assert front.state(9003).health() == "up"


async def test_every_server_down_is_502_at_once(autojump_clock: trio.abc.Clock) -> None:
    """With every server of the group out, a request gets 502 without a
    connection attempt and without waiting."""
    async with front_of(group_config(ports=(9001, 9002))) as front:
        front.servers.stopped.update({9001, 9002})
        status, body = await front.request()
        assert status == 502  # the first server failed, then the next one: both out now
        assert front.servers.connects == {9001: 1, 9002: 1}
        status, body = await front.request()
        assert status == 502
        assert body.endswith(b"every server of upstream 'api' is down\n")
        assert front.servers.connects == {9001: 1, 9002: 1}
        assert trio.current_time() == 0


async def test_a_one_server_group_is_never_taken_out(autojump_clock: trio.abc.Clock) -> None:
    """The ``--upstream URL`` form: its one server is tried for every request."""
    config = ProxyConfig(upstream="http://127.0.0.1:9001")
    async with front_of(config) as front:
        front.servers.stopped.add(9001)
        for _ in range(3):
            assert (await front.request())[0] == 502
        assert front.servers.connects[9001] == 3


async def test_a_post_is_retried_on_the_next_server_only_when_connect_failed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A connect failure: the POST and its body go to the next server, once.
    A connection broken after the request went: a POST is not repeated (502),
    a GET is."""
    async with front_of(group_config(ports=(9001, 9002), max_fails=0)) as front:
        front.servers.stopped.add(9001)
        assert await front.request("POST", b"payload") == (200, b"9002")
        assert front.servers.bodies == [b"payload"]
        front.servers.stopped.clear()
        front.servers.breaking.add(9001)
        assert (await front.request("POST", b"again"))[0] == 502  # 9001 took it: not repeated
        assert await front.request("POST", b"") == (200, b"9002")
        assert (await front.request("POST", b""))[0] == 502  # 9001 again: no body, still unsafe
        assert await front.request("GET") == (200, b"9002")  # 9002's turn
        assert await front.request("GET") == (200, b"9002")  # 9001 broke: GET goes on to 9002
        assert front.servers.requests == {9002: 4}
        assert front.servers.connects[9001] == 4  # 1 refused, 3 broken, and no retry on it


async def test_a_reset_before_the_response_counts_as_a_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A server that closes without answering is taken out like one that refuses."""
    async with front_of(group_config(ports=(9001, 9002), max_fails=1)) as front:
        front.servers.breaking.add(9001)
        assert await spread(front, 4) == {9002: 4}
        assert front.state(9001).health() == "down"
        assert front.state(9001).failures == 1


async def test_a_slow_response_head_is_no_failure(autojump_clock: trio.abc.Clock) -> None:
    """A response head that does not come within upstream_timeout gets 504,
    is not retried elsewhere, and does not take the server out."""
    config = attrs.evolve(group_config(ports=(9001, 9002), max_fails=1), upstream_timeout=5.0)
    async with front_of(config) as front:
        front.servers.held[9001] = trio.Event()
        assert (await front.request())[0] == 504
        assert trio.current_time() == 5.0
        assert front.state(9001).health() == "up"
        assert front.servers.requests == {9001: 1}


async def test_routes_choose_the_group_and_unmatched_requests_get_404(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = {port: UpstreamServer("http", "127.0.0.1", port) for port in PORTS}
    config = ProxyConfig(
        upstreams=(
            GroupSpec(name="api", servers=(server[9001],)),
            GroupSpec(name="static", servers=(server[9002],)),
        ),
        routes=RouteTable(
            (
                Route(upstream="api", host="api.example.test", path_prefix="/v1/"),
                Route(upstream="static", host="*.static.test"),
            )
        ),
    )
    async with front_of(config) as front:
        assert await front.request(host="API.example.test:8080", target="/v1/x") == (200, b"9001")
        assert await front.request(host="cdn.static.test", target="/v1/x") == (200, b"9002")
        status, body = await front.request(host="api.example.test", target="/v2/x")
        assert status == 404
        assert body.endswith(b"no route matches this host and path\n")
        assert (await front.request(host="static.test"))[0] == 404


async def test_active_health_checks_hold_a_failing_server_out_until_it_passes(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A server that answers its health check with 503 is out from the first
    round (at once), and back in the round after it answers 200."""
    config = group_config(health_check="/healthz", health_interval=5.0, health_timeout=1.0)
    async with front_of(config) as front:
        front.servers.health[9002] = 503
        front.nursery.start_soon(
            check_front_forever, front.live.current, front.servers.open_upstream
        )
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == 0
        assert front.state(9002).health() == "down"
        assert await spread(front, 10) == {9001: 5, 9003: 5}
        front.servers.health[9002] = 200
        await trio.sleep(4.9)
        assert front.state(9002).health() == "down"
        await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert front.state(9002).health() == "up"
        assert (await spread(front, 30))[9002] == 10


async def test_a_silent_health_check_fails_after_health_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = group_config(health_check="/healthz", health_interval=5.0, health_timeout=1.0)
    async with front_of(config) as front:
        front.servers.stopped.add(9001)
        front.servers.breaking.add(9002)
        front.nursery.start_soon(
            check_front_forever, front.live.current, front.servers.open_upstream
        )
        await trio.testing.wait_all_tasks_blocked()
        assert [front.state(port).health() for port in PORTS] == ["down", "down", "up"]


async def test_metrics_and_the_access_log_name_the_group_and_server(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trioproxy.access")
    async with front_of(group_config(ports=(9001, 9002), max_fails=1)) as front:
        front.servers.stopped.add(9002)
        await spread(front, 3)
        await trio.testing.wait_all_tasks_blocked()  # the last exchange gave its server back
        text = render_prometheus(front.meters, rss=0)
    labels = '{group="api",server="http://127.0.0.1:9001"}'
    down = '{group="api",server="http://127.0.0.1:9002"}'
    assert f"trioproxy_upstream_server_up{labels} 1\n" in text
    assert f"trioproxy_upstream_server_up{down} 0\n" in text
    assert f"trioproxy_upstream_server_requests_total{labels} 3\n" in text
    assert f"trioproxy_upstream_server_failures_total{down} 1\n" in text
    assert f"trioproxy_upstream_server_in_flight{labels} 0\n" in text
    lines = [record.getMessage() for record in caplog.records if record.name == "trioproxy.access"]
    assert len(lines) == 3
    assert all("upstream=127.0.0.1:9001 group=api" in line for line in lines)


# ---- Loopback: the real server and real origins, from a config file ----


async def test_loopback_routes_and_round_robin_from_a_config_file(tmp_path: Path) -> None:
    """Three loopback origins behind ``serve``, configured by a TOML file:
    routes by exact host and path prefix, wildcard host, and a default; 30
    requests spread 10/10/10 by round robin; a file without a default route
    answers 404 for what matches nothing."""
    async with trio.open_nursery() as nursery:
        ports = []
        for name in (b"a", b"b", b"c", b"static"):

            async def respond(
                request: h11.Request, body: bytes, name: bytes = name
            ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
                return 200, [], name

            ports.append(await nursery.start(serve_origin, respond))
        servers = ", ".join(f'"http://127.0.0.1:{port}"' for port in ports[:3])
        text = (
            f"[upstream.api]\nservers = [{servers}]\n"
            f'[upstream.static]\nservers = ["http://127.0.0.1:{ports[3]}"]\n'
            '[[route]]\nhost = "api.example.test"\npath_prefix = "/v1/"\nupstream = "api"\n'
            '[[route]]\nhost = "*.static.test"\nupstream = "static"\n'
        )
        path = tmp_path / "routes.toml"
        path.write_text(text)
        port = await start_proxy(nursery, load_settings(str(path), {}).config)
        answers = Counter(
            [await loopback_get(port, "api.example.test", "/v1/x") for _ in range(30)]
        )
        assert answers == {b"a": 10, b"b": 10, b"c": 10}
        assert await loopback_get(port, "img.static.test", "/v1/x") == b"static"
        assert await loopback_get(port, "api.example.test", "/v2/") == b"404"
        path.write_text(text + '[[route]]\nupstream = "static"\n')
        port = await start_proxy(nursery, load_settings(str(path), {}).config)
        assert await loopback_get(port, "api.example.test", "/v2/") == b"static"
        nursery.cancel_scope.cancel()


async def loopback_get(port: int, host: str, target: str) -> bytes:
    """The body of a 200, else the status as text."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("Host", host), ("Connection", "close")]
        await send_h11_message(
            stream, conn, h11.Request(method="GET", target=target, headers=headers)
        )
        response, body = await read_h11_message(stream, conn)
    assert isinstance(response, h11.Response)
    return body if response.status_code == 200 else str(response.status_code).encode()
