"""Raw bytes into an in-memory proxy connection, with a recording origin.

For attack and policy tests: the client side sends exact bytes (no h11 on the
client, which would refuse to produce them), and the origin records every
byte and every complete request it receives, answering each with 200 "ok".
"""

from __future__ import annotations

from typing import Any

import attrs
import h11
import trio
import trio.testing

import trioproxy
from trioproxy._connection import handle_connection

from .helpers import UpstreamPort


@attrs.define
class OriginRecord:
    """What one upstream connection carried to the origin."""

    raw: bytearray = attrs.Factory(bytearray)
    requests: list[h11.Request] = attrs.Factory(list)
    complete: int = 0


@attrs.define
class RawExchange:
    """The outcome: the client's received bytes and what reached the origin."""

    response: bytes
    upstream: UpstreamPort
    origins: list[OriginRecord]

    @property
    def status(self) -> int:
        """The status of the first response (0 if the proxy sent nothing)."""
        head = first_response(self.response)
        return 0 if head is None else head.status_code

    @property
    def headers(self) -> dict[bytes, bytes]:
        head = first_response(self.response)
        return {} if head is None else {n.lower(): v for n, v in head.headers.raw_items()}

    @property
    def forwarded_nothing(self) -> bool:
        """No upstream connection, or not a single byte sent on one."""
        return all(not origin.raw for origin in self.origins)

    @property
    def complete_requests(self) -> int:
        return sum(origin.complete for origin in self.origins)


def first_response(data: bytes) -> h11.Response | None:
    """Parse the first response head in ``data`` (h11, strict)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None


async def _record_origin(stream: trio.abc.Stream, record: OriginRecord) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                record.raw += data
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                record.requests.append(event)
            elif isinstance(event, h11.EndOfMessage):
                record.complete += 1
                response = h11.Response(status_code=200, headers=[(b"Content-Length", b"2")])
                await stream.send_all(conn.send(response) or b"")
                await stream.send_all(conn.send(h11.Data(data=b"ok")) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def raw_exchange(
    raw: bytes | list[bytes],
    config: trioproxy.ProxyConfig | None = None,
    **kwargs: Any,
) -> RawExchange:
    """Send ``raw`` (bytes, or pieces sent one by one), then EOF; collect everything.

    ``kwargs`` go to ``handle_connection`` (``client_address``...). Use with
    the ``autojump_clock`` fixture: the proxy's timeouts then cost no real time.
    """
    config = config or trioproxy.ProxyConfig()
    pieces = [raw] if isinstance(raw, bytes) else raw
    port = UpstreamPort()
    origins: list[OriginRecord] = []
    client, proxy_side = trio.testing.memory_stream_pair()
    received = bytearray()

    async def accept_all(nursery: trio.Nursery) -> None:
        while True:
            stream = await port.accept()
            origins.append(OriginRecord())
            nursery.start_soon(_record_origin, stream, origins[-1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_all, nursery)
        async with trio.open_nursery() as connection:
            connection.start_soon(
                lambda: handle_connection(
                    proxy_side, config, open_upstream=port.open_upstream, **kwargs
                )
            )
            for piece in pieces:
                await client.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()  # the proxy took it in alone
            await client.send_eof()
            while data := await client.receive_some(65536):
                received += data
        nursery.cancel_scope.cancel()
    return RawExchange(response=bytes(received), upstream=port, origins=origins)
