"""1xx responses: 100 Continue and 103 Early Hints reach the client.

An upstream's 1xx is forwarded to an HTTP/1.1 client as it arrives, while the
request body is still being pumped, so a client that waits for ``100
Continue`` before sending its body is not left waiting. In-memory tests show
the order of events; loopback tests take curl and http.client uploads with
``Expect: 100-continue`` through the real server.
"""

from __future__ import annotations

import http.client
import shutil
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._connection import handle_connection

from .helpers import UpstreamPort, read_h11_message, start_proxy


async def next_event(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> h11.Event:
    """h11's next event, reading from ``stream`` as needed."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            assert isinstance(event, h11.Event)
            return event
        conn.receive_data(bytes(await stream.receive_some(65536)))


def field(
    event: h11.Request | h11.Response | h11.InformationalResponse, name: bytes
) -> bytes | None:
    return next((v for n, v in event.headers.raw_items() if n.lower() == name), None)


async def continue_origin(
    stream: trio.abc.Stream,
    informational: list[h11.InformationalResponse],
    requests: list[h11.Request] | None = None,
) -> None:
    """Read a request head (appended to ``requests``), send ``informational``
    (e.g. 100, 103), then read the body and answer ``got <body>``. One
    exchange, then close."""
    conn = h11.Connection(h11.SERVER)
    async with stream:
        request = await next_event(stream, conn)
        assert isinstance(request, h11.Request)
        if requests is not None:
            requests.append(request)
        for response in informational:
            await stream.send_all(conn.send(response) or b"")
        body = bytearray()
        while not isinstance(event := await next_event(stream, conn), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
        answer = b"got " + body
        headers = [(b"Content-Length", str(len(answer)).encode())]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        await stream.send_all(conn.send(h11.Data(data=answer)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def test_100_continue_reaches_the_client_before_it_sends_the_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that sends only its head with Expect: 100-continue receives the
    upstream's 100 Continue (Expect itself passed upstream), then sends its body
    and gets the final response."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    conn = h11.Connection(h11.CLIENT)
    hundred = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
    with trio.fail_after(5):  # virtual time: fails at once if the 100 never comes
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server,
                    trioproxy.ProxyConfig(),
                    open_upstream=port.open_upstream,
                )
            )
            request = h11.Request(
                method=b"PUT",
                target=b"http://origin.test/upload",
                headers=[
                    (b"Host", b"origin.test"),
                    (b"Content-Length", b"5"),
                    (b"Expect", b"100-continue"),
                ],
            )
            await client.send_all(conn.send(request) or b"")
            origin = await port.accept()
            requests: list[h11.Request] = []
            nursery.start_soon(continue_origin, origin, [hundred], requests)
            informational = await next_event(client, conn)
            assert isinstance(informational, h11.InformationalResponse)
            assert (informational.status_code, informational.reason) == (100, b"Continue")
            assert field(requests[0], b"expect") == b"100-continue"
            await client.send_all(conn.send(h11.Data(data=b"hello")) or b"")
            await client.send_all(conn.send(h11.EndOfMessage()) or b"")
            response, body = await read_h11_message(client, conn)
            assert isinstance(response, h11.Response)
            assert (response.status_code, body) == (200, b"got hello")
            await client.aclose()


@pytest.mark.parametrize(("http_version", "forwarded"), [(b"1.1", True), (b"1.0", False)])
async def test_103_early_hints_reach_http_11_clients_only(
    http_version: bytes, forwarded: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """103 Early Hints pass with their fields (and Via) before the final response
    to an HTTP/1.1 client; an HTTP/1.0 client, which cannot parse 1xx, gets
    only the final response."""
    port = UpstreamPort()
    client, server = trio.testing.memory_stream_pair()
    hints = h11.InformationalResponse(
        status_code=103, headers=[(b"Link", b"</style.css>; rel=preload; as=style")]
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    handle_connection,
                    server,
                    trioproxy.ProxyConfig(),
                    open_upstream=port.open_upstream,
                )
            )
            head = b"GET http://origin.test/ HTTP/%s\r\nHost: origin.test\r\n\r\n" % http_version
            await client.send_all(head)
            nursery.start_soon(continue_origin, await port.accept(), [hints])
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]))
            conn.send(h11.EndOfMessage())
            first = await next_event(client, conn)
            if forwarded:
                assert isinstance(first, h11.InformationalResponse)
                assert first.status_code == 103
                assert field(first, b"link") == b"</style.css>; rel=preload; as=style"
                assert field(first, b"via") == b"1.1 trioproxy"
                first = await next_event(client, conn)
            assert isinstance(first, h11.Response)
            assert first.status_code == 200
            await client.aclose()


# --- loopback: real uploads with Expect: 100-continue ---------------------------


async def serve_continue_origin(
    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A loopback origin that answers Expect: 100-continue with 100 Continue."""

    async def handle(stream: trio.SocketStream) -> None:
        hundred = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
        try:
            await continue_origin(stream, [hundred])
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_upload_with_expect_100_continue(tmp_path: Path) -> None:
    """curl, told to wait a minute for 100 Continue, gets it through the proxy
    (its verbose log shows the 100) and completes the upload at once."""
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"u" * 200_000)
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_continue_origin)
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig())
        # A guard, not a timing assertion: without the 100, curl would wait 60 s.
        with trio.fail_after(30):
            result = await trio.run_process(
                [
                    "curl",
                    "--silent",
                    "--show-error",
                    "--verbose",
                    "--noproxy",
                    "",
                    "--expect100-timeout",
                    "60",
                    "-x",
                    f"http://127.0.0.1:{proxy_port}",
                    "-H",
                    "Expect: 100-continue",
                    "--data-binary",
                    f"@{upload}",
                    f"http://127.0.0.1:{origin_port}/upload",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 0, result.stderr
        assert b"< HTTP/1.1 100 Continue" in result.stderr, result.stderr.decode()
        assert result.stdout == b"got " + b"u" * 200_000
        nursery.cancel_scope.cancel()


async def test_http_client_upload_with_expect_100_continue() -> None:
    """http.client, which sends its body without waiting for 100 Continue,
    completes an Expect: 100-continue upload through the proxy: the body is
    relayed whole and the interleaved 100 does not disturb the exchange."""
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_continue_origin)
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig())

        def upload() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
            try:
                connection.request(
                    "POST",
                    f"http://127.0.0.1:{origin_port}/upload",
                    body=b"payload",
                    headers={"Expect": "100-continue"},
                )
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        assert await trio.to_thread.run_sync(upload) == (200, b"got payload")
        nursery.cancel_scope.cancel()
