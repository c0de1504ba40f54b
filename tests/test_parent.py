"""A parent proxy in forward mode: the rules (plain tests) and a real chain on
127.0.0.1 (client -> trioproxy -> trioproxy --auth -> origin), plus tinyproxy
as the parent where it is installed."""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import h11
import pytest
import trio

import trioproxy
from trioproxy._parent import ParentProxy, goes_direct, parent_refusal, parse_no_parent

from .helpers import serve_origin, start_proxy

PARENT_AUTH = "parent-user:s3cret"
CLIENT_AUTH = "Basic " + base64.b64encode(b"client:own").decode()


# --- rules ---------------------------------------------------------------------


def test_parent_url_carries_host_port_and_escaped_credentials() -> None:
    """User and password may be percent-escaped; they become one Basic value
    that never shows in repr."""
    parent = ParentProxy.from_url("http://us%40r:p%3Ass@proxy.corp.test:3128")
    assert parent.address == ("proxy.corp.test", 3128)
    assert parent.fields() == [(b"Proxy-Authorization", b"Basic " + base64.b64encode(b"us@r:p:ss"))]
    assert "p:ss" not in repr(parent)
    assert ParentProxy.from_url("http://[::1]:8080").fields() == []


@pytest.mark.parametrize(
    "url",
    ["https://p:1", "http://p", "http://p:1/path", "http://p:99999", "p:1", "http://u:pw@:1"],
)
def test_bad_parent_urls_are_refused_without_their_password(url: str) -> None:
    with pytest.raises(ValueError, match="parent proxy") as error:
        ParentProxy.from_url(url)
    assert "pw" not in str(error.value)


def test_no_parent_rules_match_hosts_domains_and_networks() -> None:
    rules = parse_no_parent(["Intranet", ".corp.test", "10.0.0.0/8", "::1"])
    assert goes_direct("intranet", rules)
    assert goes_direct("INTRANET.", rules)
    assert goes_direct("a.b.corp.test", rules)
    assert goes_direct("corp.test", rules)
    assert goes_direct("10.1.2.3", rules)
    assert goes_direct("::1", rules)
    assert not goes_direct("notcorp.test", rules)
    assert not goes_direct("11.0.0.1", rules)
    assert not goes_direct("intranet.example", rules)
    for bad in ["", "host:80", "10.0.0.0/99", "."]:
        with pytest.raises(ValueError, match="no-parent-for"):
            parse_no_parent([bad])


def test_parent_refusals() -> None:
    """407 is our failure to authenticate: 502. CONNECT needs a 2xx."""
    refusal = parent_refusal(407, tunnel=False)
    assert refusal is not None
    assert refusal.status_code == 502
    assert "credentials" in refusal.message
    assert parent_refusal(404, tunnel=False) is None  # the origin's answer: passed on
    assert parent_refusal(200, tunnel=True) is None
    assert parent_refusal(403, tunnel=True) is not None


def test_parent_proxy_is_for_forward_mode_only() -> None:
    with pytest.raises(ValueError, match="forward mode"):
        trioproxy.ProxyConfig(upstream="http://o:1", parent_proxy="http://p:1")


# --- a real chain on 127.0.0.1 ----------------------------------------------------


@attrs.define
class Chain:
    origin_port: int
    proxy_port: int
    seen: list[h11.Request]


async def respond(
    seen: list[h11.Request], request: h11.Request, body: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    seen.append(request)
    if request.method == b"POST":
        return 200, [], hashlib.sha256(body).hexdigest().encode()
    return 200, [], b"hello " + request.target


@asynccontextmanager
async def chain(parent_url: str | None, **child: object) -> AsyncIterator[Chain]:
    """An origin, a parent trioproxy with --auth, and a child trioproxy whose
    parent is ``parent_url`` ("{parent}" is the parent's address)."""
    seen: list[h11.Request] = []
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, lambda r, b: respond(seen, r, b))
        ports = f"{origin_port}"
        parent_port = await start_proxy(
            nursery, trioproxy.ProxyConfig(auth=PARENT_AUTH, connect_ports=ports)
        )
        if parent_url is not None:
            parent_url = parent_url.format(parent=f"127.0.0.1:{parent_port}")
        config = trioproxy.ProxyConfig(
            parent_proxy=parent_url,
            connect_ports=ports,
            **child,  # type: ignore[arg-type]
        )
        proxy_port = await start_proxy(nursery, config)
        yield Chain(origin_port, proxy_port, seen)
        nursery.cancel_scope.cancel()


def fetch(proxy_port: int, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
    try:
        method = "GET" if body is None else "POST"
        connection.request(method, url, body=body, headers={"Proxy-Authorization": CLIENT_AUTH})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def test_get_and_a_50_mib_post_go_through_the_parent() -> None:
    """Requests reach the origin through the parent, which accepted our
    credentials; the client's own proxy credentials go no further than us."""
    async with chain(f"http://{PARENT_AUTH}@{{parent}}") as setup:
        url = f"http://127.0.0.1:{setup.origin_port}/file?x=1"
        status, body = await trio.to_thread.run_sync(fetch, setup.proxy_port, url)
        assert (status, body) == (200, b"hello /file?x=1")
        upload = bytes(range(256)) * (50 * 1024 * 4)  # 50 MiB
        status, body = await trio.to_thread.run_sync(fetch, setup.proxy_port, url, upload)
        assert (status, body) == (200, hashlib.sha256(upload).hexdigest().encode())
    for request in setup.seen:
        names = {name.lower() for name, _ in request.headers.raw_items()}
        assert b"proxy-authorization" not in names
        via = dict(request.headers)[b"via"]  # h11's headers: names lowercased
        assert via == b"1.1 trioproxy, 1.1 trioproxy"  # both hops


async def connect_through(proxy_port: int, authority: bytes) -> tuple[int, trio.SocketStream]:
    """Send CONNECT to the proxy; return the status and the open stream."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    await stream.send_all(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, head
        head += chunk
    return int(head.split(b" ", 2)[1]), stream


async def test_connect_tunnels_through_the_parent() -> None:
    """A CONNECT becomes a CONNECT to the parent; bytes then flow both ways."""
    async with chain(f"http://{PARENT_AUTH}@{{parent}}") as setup:
        authority = b"127.0.0.1:%d" % setup.origin_port
        status, stream = await connect_through(setup.proxy_port, authority)
        assert status == 200
        async with stream:
            await stream.send_all(
                b"GET /tunnelled HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := await stream.receive_some(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b"hello /tunnelled")


async def test_wrong_parent_credentials_are_502_with_the_reason_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The parent's 407 is our failure, not the client's: 502 for a request
    and for a CONNECT, and the log says the parent refused our credentials."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    async with chain("http://parent-user:wrong@{parent}") as setup:
        url = f"http://127.0.0.1:{setup.origin_port}/"
        status, _ = await trio.to_thread.run_sync(fetch, setup.proxy_port, url)
        assert status == 502
        status, stream = await connect_through(
            setup.proxy_port, b"127.0.0.1:%d" % setup.origin_port
        )
        await stream.aclose()
        assert status == 502
    refusals = [r for r in caplog.records if "refused our credentials (407)" in r.getMessage()]
    assert len(refusals) >= 2  # the child's two lines (the parent logs its own 407s)
    assert setup.seen == []


async def test_parent_down_is_502_and_no_parent_for_goes_direct() -> None:
    """An unreachable parent: 502. A target in --no-parent-for never tries it."""
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
    try:
        async with chain(dead) as setup:
            url = f"http://127.0.0.1:{setup.origin_port}/"
            assert (await trio.to_thread.run_sync(fetch, setup.proxy_port, url))[0] == 502
        async with chain(dead, no_parent_for=("127.0.0.0/8",)) as setup:
            url = f"http://127.0.0.1:{setup.origin_port}/direct"
            assert await trio.to_thread.run_sync(fetch, setup.proxy_port, url) == (
                200,
                b"hello /direct",
            )
    finally:
        closed.close()


@pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed")
async def test_tinyproxy_as_the_parent(tmp_path: Path) -> None:
    """The chain works with a parent that is not trioproxy: tinyproxy with
    BasicAuth, for a GET and a CONNECT."""
    async with trio.open_nursery() as nursery:
        seen: list[h11.Request] = []
        origin_port = await nursery.start(serve_origin, lambda r, b: respond(seen, r, b))
        probe = trio.socket.socket()
        await probe.bind(("127.0.0.1", 0))
        tiny_port = probe.getsockname()[1]
        probe.close()
        conf = tmp_path / "tinyproxy.conf"
        conf.write_text(
            f"Port {tiny_port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 20\n"
            f"BasicAuth parent-user s3cret\nConnectPort {origin_port}\nLogLevel Error\n"
        )
        process = await trio.lowlevel.open_process(["tinyproxy", "-d", "-c", str(conf)])
        try:
            await wait_for_port(tiny_port)
            config = trioproxy.ProxyConfig(
                parent_proxy=f"http://{PARENT_AUTH}@127.0.0.1:{tiny_port}",
                connect_ports=f"{origin_port}",
            )
            proxy_port = await start_proxy(nursery, config)
            url = f"http://127.0.0.1:{origin_port}/tiny"
            assert await trio.to_thread.run_sync(fetch, proxy_port, url) == (200, b"hello /tiny")
            status, stream = await connect_through(proxy_port, b"127.0.0.1:%d" % origin_port)
            await stream.aclose()
            assert status == 200
        finally:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
        nursery.cancel_scope.cancel()


async def wait_for_port(port: int) -> None:
    """Until something accepts on 127.0.0.1:``port`` (at most 10 s)."""
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
