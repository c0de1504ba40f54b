"""Upgrade (101): protocol switches pass through the proxy in both modes.

The client's ``Connection: upgrade`` + ``Upgrade`` go upstream; the upstream's
101 comes back with its pair; then the connection is a tunnel, and bytes that
either side sent right after its head are kept. Any other answer to an
upgrade request is an ordinary response. All tests run ``handle_connection``
on in-memory streams with the injected connector.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial

import h11
import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Request,
    TextMessage,
)

import trioproxy
from trioproxy._connection import handle_connection
from trioproxy._http import upgrade_fields, upstream_request_headers

from .helpers import UpstreamPort, read_h11_message, send_h11_message

FORWARD = trioproxy.ProxyConfig()
REVERSE = trioproxy.ProxyConfig(upstream="http://origin.test:8080")
MODES = pytest.mark.parametrize("config", [FORWARD, REVERSE], ids=["forward", "reverse"])


def target_for(config: trioproxy.ProxyConfig, path: str) -> str:
    """The request target a client sends: absolute-form to a forward proxy."""
    return f"http://origin.test:8080{path}" if config.upstream is None else path


def field(message: h11.Request | h11.InformationalResponse, name: bytes) -> bytes | None:
    """The values of the field ``name`` (lower case) in ``message``, joined."""
    values = [value for field_name, value in message.headers if field_name == name]
    return b", ".join(values) if values else None


# --- sans-I/O: which fields pass --------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], b"websocket"),
        ([(b"Connection", b"keep-alive, upgrade"), (b"Upgrade", b"h2c")], b"h2c"),
        ([(b"Upgrade", b"websocket")], None),
        ([(b"Connection", b"upgrade")], None),
        ([(b"Connection", b"close"), (b"Upgrade", b"websocket")], None),
    ],
)
def test_upgrade_fields_need_both_connection_upgrade_and_upgrade(
    headers: list[tuple[bytes, bytes]], expected: bytes | None
) -> None:
    """Only a message that lists ``upgrade`` in Connection and has an Upgrade
    field switches; then exactly ``Connection: upgrade`` and its Upgrade pass."""
    fields = upgrade_fields(headers)
    if expected is None:
        assert fields == []
    else:
        assert fields == [(b"Connection", b"upgrade"), (b"Upgrade", expected)]


def test_upgrade_does_not_let_other_connection_fields_through() -> None:
    """Fields named by Connection stay hop-by-hop even in an upgrade request."""
    headers = [
        (b"Host", b"origin.test"),
        (b"Connection", b"upgrade, x-secret"),
        (b"Upgrade", b"websocket"),
        (b"X-Secret", b"for the proxy only"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    target = trioproxy._http.forward_target(b"http://origin.test/chat")
    sent = upstream_request_headers(headers, target=target, client_host=None, reverse=False)
    sent += upgrade_fields(headers)
    names = [name.lower() for name, _ in sent]
    assert b"x-secret" not in names
    assert names.count(b"connection") == 1
    assert (b"Connection", b"upgrade") in sent
    assert (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==") in sent


# --- WebSocket through the proxy ----------------------------------------------


async def ws_events(stream: trio.abc.ReceiveStream, ws: WSConnection) -> Iterator[Event]:
    """Read until wsproto yields at least one event; return the events."""
    while True:
        events = list(ws.events())
        if events:
            return iter(events)
        data = await stream.receive_some(65536)
        ws.receive_data(bytes(data) if data else None)


async def websocket_origin(port: UpstreamPort, seen: list[Request]) -> None:
    """A wsproto server: accepts, greets in the same write as its 101, then
    answers each text message with its upper case until the client closes."""
    stream = await port.accept()
    ws = WSConnection(ConnectionType.SERVER)
    async with stream:
        [request] = await ws_events(stream, ws)
        assert isinstance(request, Request)
        seen.append(request)
        greeting = ws.send(AcceptConnection()) + ws.send(TextMessage(data="hello from origin"))
        await stream.send_all(greeting)
        while True:
            for event in await ws_events(stream, ws):
                if isinstance(event, TextMessage):
                    await stream.send_all(ws.send(TextMessage(data=event.data.upper())))
                elif isinstance(event, CloseConnection):
                    await stream.send_all(ws.send(event.response()))
                    return


@MODES
async def test_websocket_through_the_proxy(
    config: trioproxy.ProxyConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """A WebSocket opens through the proxy, messages flow both ways (including
    one the origin sent in the same write as its 101), and it closes cleanly."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    seen: list[Request] = []
    ws = WSConnection(ConnectionType.CLIENT)
    with trio.fail_after(5):  # virtual time: fails at once if anything hangs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(handle_connection, server, config, open_upstream=port.open_upstream)
            )
            nursery.start_soon(websocket_origin, port, seen)
            await client.send_all(
                ws.send(Request(host="origin.test:8080", target=target_for(config, "/chat")))
            )
            events = list(await ws_events(client, ws))
            assert isinstance(events[0], AcceptConnection)
            if len(events) == 1:
                events += await ws_events(client, ws)
            assert isinstance(events[1], TextMessage)
            assert events[1].data == "hello from origin"
            for text in ("ping", "through the tunnel"):
                await client.send_all(ws.send(TextMessage(data=text)))
                [reply] = await ws_events(client, ws)
                assert isinstance(reply, TextMessage)
                assert reply.data == text.upper()
            await client.send_all(ws.send(CloseConnection(code=1000)))
            [closed] = await ws_events(client, ws)
            assert isinstance(closed, CloseConnection)
            assert closed.code == 1000
            await client.aclose()
    assert port.connects == [("origin.test", 8080)]
    [request] = seen
    assert request.target == "/chat"


# --- raw upgrades: every byte kept, ordinary answers stay ordinary ---------------


def upgrade_request(
    config: trioproxy.ProxyConfig, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> h11.Request:
    return h11.Request(
        method=b"GET",
        target=target_for(config, "/switch"),
        headers=[
            (b"Host", b"origin.test:8080"),
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"x-test/1"),
            *extra,
        ],
    )


@MODES
async def test_upgrade_keeps_bytes_sent_right_after_either_head(
    config: trioproxy.ProxyConfig,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Upgrade pair reaches the upstream; its 101 reaches the client with
    its Upgrade pair and Via; bytes the client wrote together with its request
    and bytes the upstream wrote together with its 101 both arrive, first.
    The access line has status 101 and the bytes the tunnel carried."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    client_conn = h11.Connection(h11.CLIENT)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(handle_connection, server, config, open_upstream=port.open_upstream)
            )
            head = client_conn.send(upgrade_request(config)) or b""
            head += client_conn.send(h11.EndOfMessage()) or b""
            await client.send_all(head + b"client-early")

            origin = await port.accept()
            origin_conn = h11.Connection(h11.SERVER)
            event: object = None
            while not isinstance(event, h11.EndOfMessage):
                event = origin_conn.next_event()
                if event is h11.NEED_DATA:
                    origin_conn.receive_data(bytes(await origin.receive_some(65536)))
                elif isinstance(event, h11.Request):
                    assert field(event, b"upgrade") == b"x-test/1"
                    assert field(event, b"connection") == b"upgrade"
            switch = h11.InformationalResponse(
                status_code=101, headers=[(b"Connection", b"upgrade"), (b"Upgrade", b"x-test/1")]
            )
            await origin.send_all((origin_conn.send(switch) or b"") + b"origin-early")
            early, _ = origin_conn.trailing_data
            assert early + await origin.receive_some(65536) == b"client-early"

            client_conn.receive_data(bytes(await client.receive_some(65536)))
            response = client_conn.next_event()
            assert isinstance(response, h11.InformationalResponse)
            assert response.status_code == 101
            assert field(response, b"upgrade") == b"x-test/1"
            assert field(response, b"connection") == b"upgrade"
            assert field(response, b"via") == b"1.1 trioproxy"
            assert client_conn.our_state is h11.SWITCHED_PROTOCOL
            early, _ = client_conn.trailing_data
            if early != b"origin-early":
                early += await client.receive_some(65536)
            assert early == b"origin-early"

            await client.send_all(b"up")
            assert await origin.receive_some(65536) == b"up"
            await origin.send_all(b"down")
            assert await client.receive_some(65536) == b"down"
            await client.aclose()
            await origin.aclose()
    [line] = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    # in: "client-early" + "up"; out: "origin-early" + "down".
    assert "status=101 bytes_in=14 bytes_out=16" in line


@MODES
async def test_upgrade_refused_is_an_ordinary_response_and_keeps_the_connection(
    config: trioproxy.ProxyConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """An upstream that answers an upgrade request with a final response gives an
    ordinary exchange: the client gets the response and can send another request."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    client_conn = h11.Connection(h11.CLIENT)

    async def refusing_origin() -> None:
        for body in (b"no switching here", b"second"):
            stream = await port.accept()
            conn = h11.Connection(h11.SERVER)
            async with stream:
                await read_h11_message(stream, conn)
                headers = [(b"Content-Length", str(len(body)).encode())]
                await send_h11_message(
                    stream, conn, h11.Response(status_code=200, headers=headers), body
                )

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(handle_connection, server, config, open_upstream=port.open_upstream)
            )
            nursery.start_soon(refusing_origin)
            await send_h11_message(client, client_conn, upgrade_request(config))
            response, body = await read_h11_message(client, client_conn)
            assert isinstance(response, h11.Response)
            assert (response.status_code, body) == (200, b"no switching here")
            client_conn.start_next_cycle()
            request = h11.Request(
                method=b"GET",
                target=target_for(config, "/next"),
                headers=[(b"Host", b"origin.test:8080")],
            )
            await send_h11_message(client, client_conn, request)
            response, body = await read_h11_message(client, client_conn)
            assert (response.status_code, body) == (200, b"second")  # type: ignore[union-attr]
            await client.aclose()


async def test_a_101_nobody_asked_for_is_502(autojump_clock: trio.testing.MockClock) -> None:
    """An upstream that switches protocols without an Upgrade request is broken:
    the client gets 502, never a tunnel."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    client_conn = h11.Connection(h11.CLIENT)

    async def switching_origin() -> None:
        stream = await port.accept()
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            await trio.sleep_forever()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(handle_connection, server, FORWARD, open_upstream=port.open_upstream)
            )
            nursery.start_soon(switching_origin)
            request = h11.Request(
                method=b"GET", target=b"http://origin.test/", headers=[(b"Host", b"origin.test")]
            )
            await send_h11_message(client, client_conn, request)
            response, _ = await read_h11_message(client, client_conn)
            assert response.status_code == 502  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()


async def test_a_101_before_the_request_body_was_read_is_502(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An upstream that switches protocols and then goes away before reading the
    request body cannot be switched to: the client gets 502, never a 101."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    client_conn = h11.Connection(h11.CLIENT)
    request = upgrade_request(FORWARD, ((b"Content-Length", b"5"),))

    async def impatient_origin() -> None:
        stream = await port.accept()
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while not isinstance(conn.next_event(), h11.Request):
                conn.receive_data(bytes(await stream.receive_some(65536)))
            switch = h11.InformationalResponse(
                status_code=101, headers=[(b"Connection", b"upgrade"), (b"Upgrade", b"x-test/1")]
            )
            await stream.send_all(conn.send(switch) or b"")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(handle_connection, server, FORWARD, open_upstream=port.open_upstream)
            )
            nursery.start_soon(impatient_origin)
            await client.send_all(client_conn.send(request) or b"")
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(client_conn.send(h11.Data(data=b"12345")) or b"")
            await client.send_all(client_conn.send(h11.EndOfMessage()) or b"")
            event = client_conn.next_event()
            while event is h11.NEED_DATA:
                client_conn.receive_data(bytes(await client.receive_some(65536)))
                event = client_conn.next_event()
            assert isinstance(event, h11.Response)
            assert event.status_code == 502
            nursery.cancel_scope.cancel()
