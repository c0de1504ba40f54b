"""A large Content-Length body through the pump past h11 (``_body.bypass_body``).

On in-memory streams: exactly the declared length moves and the bytes after
it stay in the source stream; the sink's h11 frames the body (Content-Length
or chunked) and ends it; a short or broken source leaves the sink's message
unfinished; through the whole proxy, a download past h11 ends its upstream
connection while the client's keeps serving.
"""

from __future__ import annotations

import hashlib

import h11
import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._body import BYPASS_MIN_BODY_FROM_TLS, bypass_body
from trioproxy._endpoint import UpstreamEndpoint
from trioproxy._errors import BadGateway
from trioproxy._pool import UpstreamPool
from trioproxy._relay import BufferGauge, PendingBody, Progress

from .helpers import UpstreamPort, pattern, read_h11_message, upstream_endpoint_with

# Each test takes well under a second; only a hang (a broken bypass) reaches this.
SAFETY_SECONDS = 20
SIZE = 300_000  # bypass_body takes any length; the exchange asks for more (bypass_min_body)
READ_SIZE = 4096
CHUNK = 3 * READ_SIZE  # bypass_body's own, as ProxyConfig.bypass_chunk_size gives it


async def sink_with_head(framing: tuple[str, str]) -> tuple[UpstreamEndpoint, trio.abc.Stream]:
    """An endpoint that sent a POST head with ``framing`` and no body yet, and
    the far end its bytes arrive at."""
    stream, far = trio.testing.memory_stream_pair()
    sink = UpstreamEndpoint(stream, read_size=READ_SIZE, max_head_size=64 * 1024)
    head = h11.Request(method="POST", target="/", headers=[("Host", "sink"), framing])
    await sink.send_head(head)
    return sink, far


async def received_body(far: trio.abc.Stream) -> tuple[bytes, bool]:
    """The body the far end got, and whether its message ended."""
    conn = h11.Connection(h11.SERVER)
    try:
        _, body = await read_h11_message(far, conn)
    except (h11.RemoteProtocolError, EOFError):
        return b"", False
    return body, conn.their_state is h11.DONE


def response_head(length: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length


@pytest.mark.parametrize(
    "framing",
    [("Content-Length", str(SIZE)), ("Transfer-Encoding", "chunked")],
    ids=["content-length", "chunked"],
)
@pytest.mark.parametrize("first", [b"", b"first bytes pulled with the head"], ids=["", "first"])
async def test_exactly_the_declared_length_moves_and_the_next_bytes_stay(
    framing: tuple[str, str], first: bytes
) -> None:
    """The body's first bytes (pulled with the head, and what h11 holds) and
    then the stream's, exactly the declared length, framed for the sink,
    within the pump's bound; the source is marked, the sink is not."""
    with trio.fail_after(SAFETY_SECONDS):
        payload = pattern(SIZE)
        sent = response_head(SIZE) + payload[len(first) :] + b"NEXT MESSAGE"
        source = await upstream_endpoint_with(sent, read_size=READ_SIZE)
        assert source.has_unparsed_data  # h11 read body bytes with the head
        sink, far = await sink_with_head(framing)
        gauge, progress = BufferGauge(), Progress()
        gauge.add(len(first))  # as send_buffered leaves them
        await bypass_body(
            source,
            sink,
            length=SIZE,
            chunk_size=CHUNK,
            buffer_chunks=1,
            gauge=gauge,
            progress=progress,
            first_chunk=PendingBody(first),
        )
        body, ended = await received_body(far)
        assert ended
        assert (
            hashlib.sha256(body).digest() == hashlib.sha256(first + payload[len(first) :]).digest()
        )
        assert await source.stream.receive_some(100) == b"NEXT MESSAGE"  # never read
        assert gauge.held == 0
        assert gauge.peak <= 3 * CHUNK
        assert progress.bytes_written == SIZE
        assert source.state().body_bypassed
        assert not sink.state().body_bypassed  # its h11 counted every byte
        assert sink.state().unparsed is False


async def failing_source_leaves_the_sink_unfinished(source: UpstreamEndpoint, error: str) -> None:
    """``bypass_body`` from ``source`` raises a 502 matching ``error``, and
    the sink's message does not end: its receiver sees a short body."""
    sink, far = await sink_with_head(("Content-Length", str(SIZE)))
    with pytest.raises(BadGateway, match=error):
        await bypass_body(
            source,
            sink,
            length=SIZE,
            chunk_size=CHUNK,
            buffer_chunks=1,
            gauge=BufferGauge(),
            progress=Progress(),
        )
    await sink.stream.aclose()  # the far end reads to the end of what came
    _, ended = await received_body(far)
    assert not ended


async def test_a_short_source_is_a_502_and_the_sink_is_left_unfinished() -> None:
    with trio.fail_after(SAFETY_SECONDS):
        sent = response_head(SIZE) + pattern(SIZE // 2)
        source = await upstream_endpoint_with(sent, read_size=READ_SIZE, eof=True)
        error = f"upstream closed the body after {SIZE // 2} of {SIZE} bytes"
        await failing_source_leaves_the_sink_unfinished(source, error)


class BreakingStream(trio.abc.Stream):
    """Delivers ``data``, then every receive fails as a reset would."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._data:
            raise trio.BrokenResourceError("connection reset")
        size = max_bytes or len(self._data)
        data, self._data = self._data[:size], self._data[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_broken_source_is_a_502_and_the_sink_is_left_unfinished() -> None:
    with trio.fail_after(SAFETY_SECONDS):
        breaking = BreakingStream(response_head(SIZE) + pattern(SIZE // 3))
        source = await upstream_endpoint_with(b"", stream=breaking, read_size=READ_SIZE)
        await failing_source_leaves_the_sink_unfinished(source, "upstream connection lost")


async def test_a_download_past_h11_closes_its_upstream_and_keeps_the_client() -> None:
    """Through the proxy: a large download goes past h11, byte-exact; the
    client's connection then serves the next request, on a new upstream
    connection (the first one's h11 never saw the body). A small download
    before it leaves its upstream connection pooled, for comparison."""
    with trio.fail_after(SAFETY_SECONDS):
        config = trioproxy.ProxyConfig(upstream="http://origin.test", read_size=READ_SIZE)
        port = UpstreamPort()
        pool = UpstreamPool(max_idle=4)
        sizes = [1000, BYPASS_MIN_BODY_FROM_TLS, 1000]
        client, proxy_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: trioproxy.handle_connection(
                    proxy_side, config, open_upstream=port.open_upstream, pool=pool
                )
            )
            nursery.start_soon(_origin, port, sizes)
            conn = h11.Connection(h11.CLIENT)
            for size in sizes:
                request = h11.Request(method="GET", target=f"/{size}", headers=[("Host", "x")])
                await client.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                response, body = await read_h11_message(client, conn)
                assert isinstance(response, h11.Response)
                assert response.status_code == 200
                assert body == pattern(size)
                conn.start_next_cycle()
            assert len(port.connects) == 2  # the small one's reused, the large one's not
            nursery.cancel_scope.cancel()


async def _origin(port: UpstreamPort, sizes: list[int]) -> None:
    """Answer ``sizes`` in order, on as many connections as the proxy opens."""
    pending = list(sizes)
    while pending:
        stream = await port.accept()
        conn = h11.Connection(h11.SERVER)
        while pending:
            try:
                await read_h11_message(stream, conn)
            except (EOFError, h11.RemoteProtocolError, trio.BrokenResourceError):
                break  # the proxy closed this one
            size = pending.pop(0)
            head = h11.Response(status_code=200, headers=[("Content-Length", str(size))])
            await stream.send_all(conn.send(head) + conn.send(h11.Data(data=pattern(size))))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()
