"""The small-response path: a response that arrived whole goes out in one write.

``send_buffered`` sends head, body and end in one ``send_all`` when the upstream's
read already brought the whole message, and starts no pump; otherwise the head
goes alone and the pump relays the body, beginning with the bytes already
received. Both paths keep the watchdog and the gauge exact.
"""

from __future__ import annotations

import h11
import trio
import trio.testing

import trioproxy
from trioproxy._metrics import ProxyMeters

from .helpers import UpstreamPort, pattern, read_h11_message, send_h11_message

CONFIG = trioproxy.ProxyConfig(upstream="http://origin.test", stall_timeout=120.0)
GET = h11.Request(method="GET", target="/small", headers=[("Host", "x")])


class WriteCounter(trio.abc.Stream):
    """Wraps the proxy's end of the client connection; counts its writes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def exchange(origin_writes: list[bytes]) -> tuple[WriteCounter, bytes, ProxyMeters]:
    """One GET through the proxy; the origin answers with ``origin_writes``
    (raw bytes, one ``send_all`` each, the test waiting for the proxy between
    them). Returns the client writes, the body the client got, and meters."""
    port = UpstreamPort()
    meters = ProxyMeters()
    client, proxy_side = trio.testing.memory_stream_pair()
    counter = WriteCounter(proxy_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.handle_connection(
                counter, CONFIG, open_upstream=port.open_upstream, meters=meters
            )
        )
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        origin = await port.accept()
        await read_h11_message(origin, h11.Connection(h11.SERVER))
        for data in origin_writes:
            await origin.send_all(data)
            await trio.testing.wait_all_tasks_blocked()
        head, body = await read_h11_message(client, conn)
        assert isinstance(head, h11.Response)
        assert head.status_code == 200
        nursery.cancel_scope.cancel()
    return counter, body, meters


async def test_a_response_that_arrived_whole_is_sent_in_one_write() -> None:
    """Head, 1 KiB body and end reach the client in a single ``send_all``,
    byte-exact, and the gauge of held bytes is back to zero."""
    payload = pattern(1024)
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + payload
    counter, body, meters = await exchange([whole])
    assert body == payload
    assert len(counter.writes) == 1
    assert counter.writes[0].endswith(payload)
    assert meters.response_bodies.held == 0
    assert meters.response_bodies.peak == 1024


async def test_a_response_that_arrives_in_pieces_is_relayed_whole() -> None:
    """When the head comes with only part of the body, the head goes alone,
    the part already received is relayed first, and the rest follows:
    byte-exact, chunked framing included, with the gauge back to zero."""
    payload = pattern(5000)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = b"%x\r\n%s\r\n" % (1000, payload[:1000])
    rest = b"%x\r\n%s\r\n0\r\n\r\n" % (4000, payload[1000:])
    counter, body, meters = await exchange([head + first, rest])
    assert body == payload
    assert len(counter.writes) >= 3  # head, the early part, the rest (and the end)
    assert meters.response_bodies.held == 0


async def test_a_client_that_reads_nothing_of_a_small_response_is_cut(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The single write of a whole small response is watched too: a client
    that never reads is cut exactly ``stall_timeout`` after its request."""
    port = UpstreamPort()
    client, proxy_side = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def proxy() -> None:
        await trioproxy.handle_connection(proxy_side, CONFIG, open_upstream=port.open_upstream)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy)
        conn = h11.Connection(h11.CLIENT)
        await send_h11_message(client, conn, GET)
        sent = trio.current_time()
        origin = await port.accept()
        await read_h11_message(origin, h11.Connection(h11.SERVER))
        await origin.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + pattern(1024))
        with trio.move_on_after(10_000):
            await done.wait()
        assert trio.current_time() == sent + 120.0
        nursery.cancel_scope.cancel()
