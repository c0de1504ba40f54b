"""The PROXY protocol wired in: the address a balancer's header carries is the
client (allow list, X-Forwarded-For, access log), a bad or untrusted header
closes only its connection, and ``--upstream-send-proxy`` puts the client's
address first on each upstream connection, which no other client reuses.

In memory (``handle_connection`` with ``client_address`` as the peer) and on
an autojump clock; the parser itself is tested in test_proxy_protocol."""

from __future__ import annotations

import logging
from functools import partial

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import handle_connection
from trioproxy._proxy_protocol import encode_v1, encode_v2, encode_v2_local

from .helpers import UpstreamPort, read_h11_message, send_h11_message

REVERSE = dict(upstream="http://origin.test:80", proxy_protocol=True)
CARRIED = ("192.0.2.9", 5555)
LISTENER = ("198.51.100.1", 443)
GET = h11.Request(method="GET", target="/x", headers=[("Host", "front.test")])


async def answer(origin: trio.abc.Stream, times: int = 1) -> list[h11.Request]:
    """Answer ``times`` requests on ``origin``; return them."""
    conn = h11.Connection(h11.SERVER)
    seen = []
    for _ in range(times):
        request, _ = await read_h11_message(origin, conn)
        assert isinstance(request, h11.Request)
        seen.append(request)
        response = h11.Response(status_code=200, headers=[("Content-Length", "2")])
        await send_h11_message(origin, conn, response, b"ok")
        conn.start_next_cycle()
    return seen


async def one_exchange(
    config: trioproxy.ProxyConfig, preface: bytes, *, peer: str = "127.0.0.1", request: bool = True
) -> tuple[h11.Response | None, list[h11.Request]]:
    """Send ``preface`` and (if ``request``) a GET on one connection from
    ``peer``; return the response (None if the connection closed without one)
    and what the origin saw."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    seen: list[h11.Request] = []
    response: h11.Response | None = None
    with trio.fail_after(60):  # virtual time: fails, does not hang
        async with trio.open_nursery() as nursery:
            run = partial(handle_connection, server, config, open_upstream=port.open_upstream)
            nursery.start_soon(partial(run, client_address=peer))

            async def origin() -> None:
                seen.extend(await answer(await port.accept()))

            nursery.start_soon(origin)
            conn = h11.Connection(h11.CLIENT)
            try:
                await client.send_all(preface)
                if request:
                    await send_h11_message(client, conn, GET)
                head, _ = await read_h11_message(client, conn)
            except (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError):
                pass  # closed without an answer
            else:
                assert isinstance(head, h11.Response)
                response = head
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # an origin never connected to
    return response, seen


@pytest.mark.parametrize(
    "preface",
    [encode_v1(CARRIED, LISTENER), encode_v2(CARRIED, LISTENER)],
    ids=["v1", "v2"],
)
async def test_the_carried_address_is_the_client(
    preface: bytes, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """X-Forwarded-For and the access log name the carried client, and the
    allow list is applied to it (loopback only by default: 403)."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    config = trioproxy.ProxyConfig(**REVERSE, allow=["192.0.2.0/24"])  # type: ignore[arg-type]
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server,
                    config,
                    open_upstream=port.open_upstream,
                    client_address="127.0.0.1",
                )
            )
            conn = h11.Connection(h11.CLIENT)
            await client.send_all(preface)
            await send_h11_message(client, conn, GET)
            [request] = await answer(await port.accept())
            head, body = await read_h11_message(client, conn)
            await client.aclose()
    assert dict(request.headers)[b"x-forwarded-for"] == b"192.0.2.9"
    assert isinstance(head, h11.Response)
    assert (head.status_code, body) == (200, b"ok")
    [line] = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert line.startswith("client=192.0.2.9 ")
    refused, seen = await one_exchange(trioproxy.ProxyConfig(**REVERSE), preface)  # type: ignore[arg-type]
    assert refused is not None
    assert refused.status_code == 403
    assert seen == []


@pytest.mark.parametrize(
    "preface", [b"PROXY UNKNOWN\r\n", encode_v2_local()], ids=["v1-unknown", "v2-local"]
)
async def test_unknown_and_local_keep_the_peer(
    preface: bytes, autojump_clock: trio.abc.Clock
) -> None:
    """UNKNOWN (v1) and LOCAL (v2) carry no client: the peer stays the client."""
    response, seen = await one_exchange(trioproxy.ProxyConfig(**REVERSE), preface)  # type: ignore[arg-type]
    assert response is not None
    assert response.status_code == 200
    assert dict(seen[0].headers)[b"x-forwarded-for"] == b"127.0.0.1"


@pytest.mark.parametrize(
    ("preface", "peer", "logged"),
    [
        (encode_v1(CARRIED, LISTENER), "203.0.113.5", "may not send a PROXY header"),
        (b"", "127.0.0.1", "bad PROXY header"),  # plain HTTP, no header
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "127.0.0.1", "bad PROXY header"),
        (b"PROXY " + b"x" * 120, "127.0.0.1", "bad PROXY header"),
        (b"PROXY TCP4 1.2.3.4", "127.0.0.1", "no PROXY header within 20 s"),
    ],
    ids=["untrusted-peer", "plain-http", "bad-port", "v1-too-long", "slow-header"],
)
async def test_a_bad_header_closes_only_its_connection(
    preface: bytes,
    peer: str,
    logged: str,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An untrusted sender, a malformed or overlong header, or one not complete
    within header_timeout: closed without an answer, one log line, nothing
    forwarded."""
    caplog.set_level(logging.WARNING, logger="trioproxy")
    config = trioproxy.ProxyConfig(**REVERSE)  # type: ignore[arg-type]
    slow = logged.startswith("no PROXY")
    response, seen = await one_exchange(config, preface, peer=peer, request=not slow)
    assert response is None
    assert seen == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1
    assert logged in lines[0]


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_upstream_gets_the_client_first_and_no_other_client_reuses_it(
    version: str, autojump_clock: trio.abc.Clock
) -> None:
    """With --upstream-send-proxy each upstream connection starts with the
    exact header for its client, then HTTP. A client's keep-alive requests
    reuse its own connection; another client gets a new one."""
    config = trioproxy.ProxyConfig(
        **REVERSE,  # type: ignore[arg-type]
        upstream_send_proxy=version,
        upstream_pool_size=8,
        allow=["192.0.2.0/24"],
    )
    encode = encode_v1 if version == "v1" else encode_v2
    port = UpstreamPort()
    pool = trioproxy.UpstreamPool(max_idle=8)
    headers_seen: list[bytes] = []

    async def origin(requests: int, header_size: int) -> None:
        stream = await port.accept()
        header = b""
        while len(header) < header_size:
            header += await stream.receive_some(header_size - len(header))
        headers_seen.append(header)
        await answer(stream, requests)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for client_port, requests in ((1111, 2), (2222, 1)):
                carried = ("192.0.2.9", client_port)
                expected = encode(carried, LISTENER)
                nursery.start_soon(origin, requests, len(expected))
                client, server = trio.testing.memory_stream_pair()
                nursery.start_soon(
                    partial(
                        handle_connection,
                        server,
                        config,
                        open_upstream=port.open_upstream,
                        client_address="127.0.0.1",
                        pool=pool,
                    )
                )
                conn = h11.Connection(h11.CLIENT)
                await client.send_all(encode(carried, LISTENER))
                for _ in range(requests):
                    await send_h11_message(client, conn, GET)
                    head, _ = await read_h11_message(client, conn)
                    assert isinstance(head, h11.Response)
                    assert head.status_code == 200
                    conn.start_next_cycle()
                await client.aclose()
                await trio.testing.wait_all_tasks_blocked()
    assert len(port.connects) == 2  # one per client, not one per request
    assert headers_seen == [
        encode(("192.0.2.9", 1111), LISTENER),
        encode(("192.0.2.9", 2222), LISTENER),
    ]
