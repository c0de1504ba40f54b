"""The access log: record building and formatting (sync), and one line per
request from the running handler (caplog, in-memory streams, autojump clock)."""

from __future__ import annotations

import json
import logging

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy import handle_connection
from trioproxy._accesslog import (
    MAX_LOGGED_TARGET,
    AccessRecord,
    JsonFormatter,
    format_text,
    log_access,
    logged_exchange,
)
from trioproxy._errors import BadGateway, ClientGone, GatewayTimeout

from .helpers import UpstreamPort, read_h11_message, send_h11_message

ACCESS = "trioproxy.access"


def finished_record() -> AccessRecord:
    record = AccessRecord(client="192.0.2.7", started=10.0)
    record.set_request(
        h11.Request(method="POST", target="http://a.test/up?x=1", headers=[("Host", "a.test")])
    )
    record.set_upstream("a.test", 80)
    record.status = 201
    record.request_body.bytes_read = 12
    record.response_body.bytes_written = 34
    return record


def test_text_line_has_every_field_in_order() -> None:
    """A success is one logfmt line: client, method, target, status, bytes each
    way, duration, upstream; no reason field."""
    fields = finished_record().fields(now=10.25)
    assert format_text(fields) == (
        'client=192.0.2.7 method=POST target="http://a.test/up?x=1" status=201 '
        "bytes_in=12 bytes_out=34 duration=0.25 upstream=a.test:80"
    )


@pytest.mark.parametrize(
    ("client_tls", "upstream_tls", "shown"),
    [(True, False, "client"), (False, True, "upstream"), (True, True, "client,upstream")],
)
def test_tls_legs_are_named_after_the_upstream(
    client_tls: bool, upstream_tls: bool, shown: str
) -> None:
    """A TLS leg adds ``tls=`` after ``upstream=``, in text and in JSON; a
    plain exchange has no such field at all (the line above is unchanged)."""
    record = finished_record()
    record.client_tls = client_tls
    record.set_upstream("a.test", 443, tls=upstream_tls)
    fields = record.fields(now=10.25)
    assert format_text(fields) == (
        'client=192.0.2.7 method=POST target="http://a.test/up?x=1" status=201 '
        f"bytes_in=12 bytes_out=34 duration=0.25 upstream=a.test:443 tls={shown}"
    )
    assert list(fields)[8:] == ["group", "tls", "ended", "reason"]
    assert "tls" not in finished_record().fields(now=10.25)


def test_unknown_fields_show_as_dash_and_reason_is_quoted() -> None:
    """Before a request is known, the line still parses: ``-`` for unknowns; the
    reason is JSON-quoted so quotes and spaces in it cannot break the line."""
    record = AccessRecord(client=None, started=0.0)
    record.set_error(BadGateway('said "no" twice'), answered=True)
    assert format_text(record.fields(now=1.0)) == (
        "client=- method=- target=- status=502 bytes_in=0 bytes_out=0 duration=1.0 "
        'upstream=- reason="said \\"no\\" twice"'
    )


def test_error_after_response_began_keeps_status_and_says_aborted() -> None:
    """An error after the head was sent does not overwrite the status sent."""
    record = finished_record()
    record.set_error(GatewayTimeout("no byte moved for 120 s"), answered=False)
    assert (record.status, record.reason) == (201, "response aborted: no byte moved for 120 s")


def test_long_target_is_cut_to_the_bound() -> None:
    """A target longer than MAX_LOGGED_TARGET is cut, so one request cannot
    write a 64 KiB log line."""
    record = AccessRecord(client=None, started=0.0)
    record.set_request(h11.Request(method="GET", target="/" + "a" * 5000, headers=[("Host", "a")]))
    assert record.target is not None
    assert len(record.target) == MAX_LOGGED_TARGET + len("...")


def test_ipv6_upstream_in_brackets() -> None:
    """An IPv6 upstream is written ``[addr]:port`` so the port stays unambiguous."""
    record = AccessRecord(client=None, started=0.0)
    record.set_upstream("2001:db8::1", 8080)
    assert record.upstream == "[2001:db8::1]:8080"


def test_json_formatter_puts_access_fields_on_one_line() -> None:
    """JSON output is one object per line with the access fields as keys."""
    fields = finished_record().fields(now=11.0)
    record = logging.LogRecord(ACCESS, logging.INFO, __file__, 1, "%s", ("x",), None)
    record.access = fields
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["status"] == 201
    assert data["bytes_out"] == 34
    assert data["duration"] == 1.0
    assert data["logger"] == ACCESS
    assert "message" not in data


def test_json_formatter_wraps_other_messages() -> None:
    """Diagnostic records become ``{"message": ...}`` with their level."""
    record = logging.LogRecord("trioproxy", logging.WARNING, __file__, 1, "hi %d", (3,), None)
    data = json.loads(JsonFormatter().format(record))
    assert (data["level"], data["message"]) == ("warning", "hi 3")


async def test_log_access_skips_work_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    """With the access logger above info, nothing is formatted or emitted."""
    caplog.set_level(logging.WARNING, logger=ACCESS)
    log_access(finished_record())
    assert [r for r in caplog.records if r.name == ACCESS] == []


# --- one line per request from the running handler --------------------------


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ACCESS]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.exc_info] == []


async def test_success_is_logged_once_with_sizes(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A POST through the proxy gives one access line with request body bytes
    in, response body bytes out, status, upstream and the exact duration."""
    caplog.set_level(logging.INFO, logger=ACCESS)
    port = UpstreamPort()

    async def origin() -> None:
        stream = await port.accept()
        conn = h11.Connection(h11.SERVER)
        await read_h11_message(stream, conn)
        await trio.sleep(3)
        response = h11.Response(status_code=200, headers=[("Content-Length", "7")])
        await send_h11_message(stream, conn, response, b"1234567")

    async with trio.open_nursery() as nursery:
        client, proxy_side = trio.testing.memory_stream_pair()
        config = trioproxy.ProxyConfig()
        nursery.start_soon(
            lambda: handle_connection(proxy_side, config, open_upstream=port.open_upstream)
        )
        nursery.start_soon(origin)
        conn = h11.Connection(h11.CLIENT)
        post = h11.Request(
            method="POST",
            target="http://origin.test:8081/up",
            headers=[("Host", "origin.test"), ("Content-Length", "5")],
        )
        await send_h11_message(client, conn, post, b"hello")
        await read_h11_message(client, conn)
        await client.aclose()
    [line] = access_records(caplog)
    assert line.getMessage() == (
        'client=- method=POST target="http://origin.test:8081/up" status=200 '
        "bytes_in=5 bytes_out=7 duration=3.0 upstream=origin.test:8081"
    )
    assert_no_tracebacks(caplog)


async def test_refused_upstream_is_one_502_line(caplog: pytest.LogCaptureFixture) -> None:
    """An upstream that refuses gives one access line with 502 and the reason,
    and no traceback anywhere in the log."""
    caplog.set_level(logging.DEBUG)

    async def refuses(host: str, port: int) -> trio.abc.Stream:
        raise BadGateway(f"cannot connect to {host}:{port}: Connection refused")

    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: handle_connection(proxy_side, trioproxy.ProxyConfig(), open_upstream=refuses)
        )
        conn = h11.Connection(h11.CLIENT)
        get = h11.Request(method="GET", target="http://down.test/", headers=[("Host", "down.test")])
        await send_h11_message(client, conn, get)
        response, _ = await read_h11_message(client, conn)
        assert isinstance(response, h11.Response)
        assert response.status_code == 502
        await client.aclose()
    [line] = access_records(caplog)
    assert "status=502" in line.getMessage()
    assert "upstream=down.test:80" in line.getMessage()
    assert 'reason="cannot connect to down.test:80: Connection refused"' in line.getMessage()
    assert_no_tracebacks(caplog)


async def test_client_leaving_mid_download_is_one_line(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A client that closes during the body gives one access line with the
    status it got, the bytes it was sent, and "client gone"; no traceback."""
    caplog.set_level(logging.DEBUG)
    port = UpstreamPort()

    async def endless_origin() -> None:
        stream = await port.accept()
        conn = h11.Connection(h11.SERVER)
        await read_h11_message(stream, conn)
        head = h11.Response(status_code=200, headers=[("Content-Length", "1000000")])
        await stream.send_all(conn.send(head) or b"")
        for _ in range(1000):
            await stream.send_all(conn.send(h11.Data(data=b"x" * 1000)) or b"")
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(endless_origin)
        client, proxy_side = trio.testing.memory_stream_pair()
        config = trioproxy.ProxyConfig()
        async with trio.open_nursery() as proxying:  # ends when handle_connection does
            proxying.start_soon(
                lambda: handle_connection(proxy_side, config, open_upstream=port.open_upstream)
            )
            conn = h11.Connection(h11.CLIENT)
            target = "http://o.test/big"
            await send_h11_message(
                client, conn, h11.Request(method="GET", target=target, headers=[("Host", "o.test")])
            )
            while not isinstance(conn.next_event(), h11.Data):
                conn.receive_data(bytes(await client.receive_some(65536)))
            await client.aclose()
        nursery.cancel_scope.cancel()
    [line] = access_records(caplog)
    message = line.getMessage()
    assert "status=200" in message
    assert 'reason="client gone: ' in message
    bytes_out = int(message.split("bytes_out=")[1].split()[0])
    assert 0 < bytes_out < 1000000
    assert_no_tracebacks(caplog)


async def test_slow_head_logs_408_without_request_line(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A head that misses its deadline is logged once as 408 with its reason."""
    caplog.set_level(logging.INFO, logger=ACCESS)
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_connection, proxy_side, trioproxy.ProxyConfig())
        await client.send_all(b"GET http://o.test/ HTTP/1.1\r\n")
        while await client.receive_some(65536):
            pass
    [line] = access_records(caplog)
    assert line.getMessage() == (
        "client=- method=- target=- status=408 bytes_in=0 bytes_out=0 duration=20.0 "
        'upstream=- reason="the request head took over 20 s"'
    )


async def test_connection_without_request_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that connects and closes without a byte leaves no access line."""
    caplog.set_level(logging.INFO, logger=ACCESS)
    client, proxy_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_connection, proxy_side, trioproxy.ProxyConfig())
        await client.aclose()
    assert access_records(caplog) == []


async def test_logged_exchange_reasons_for_each_ending(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever ends the block, exactly one line is logged and the exception
    passes on: client gone, a bug (internal error), and cancellation."""
    caplog.set_level(logging.INFO, logger=ACCESS)
    with pytest.raises(ClientGone), logged_exchange("192.0.2.1"):
        raise ClientGone("reset by peer")
    with pytest.raises(ZeroDivisionError), logged_exchange("192.0.2.1"):
        raise ZeroDivisionError
    with trio.CancelScope() as scope, logged_exchange("192.0.2.1"):
        scope.cancel()
        await trio.lowlevel.checkpoint()
    reasons = [line.getMessage().split("reason=")[1] for line in access_records(caplog)]
    assert reasons == [
        '"client gone: reset by peer"',
        '"internal error: ZeroDivisionError"',
        '"cancelled"',
    ]
