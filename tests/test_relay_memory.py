"""The bytes a pump holds are the bytes it counts: nothing lingers past its write.

The budget caps what the pumps *count*; RSS follows what they *keep alive*.
These tests check that the two agree at every quiescent point: a chunk that
has been written and given back is garbage at once (no loop variable, caller
frame or h11 buffer keeps it), and the body bytes h11 already holds are taken
out with each read instead of waiting outside the budget.
"""

from __future__ import annotations

import weakref
from typing import cast

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy._body import BodyReader
from trioproxy._budget import MemoryBudget
from trioproxy._endpoint import UpstreamEndpoint
from trioproxy._relay import BufferGauge, PendingBody, Pump

from .helpers import upstream_endpoint_with

# The longest framing h11 may keep between two reads of a chunked body: the
# CRLF closing a chunk plus an incomplete chunk-size line ("ffffffff" + CR).
MAX_FRAMING_LEFT = 2 + 8 + 1


class TrackedChunk:
    """A stand-in for a chunk whose liveness a test can see (bytes take no weakrefs).

    The pump only needs ``len()`` of a chunk; the write callable gets it as is.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


class ChunkSource:
    """Hands out ``count`` tracked chunks, then blocks for ever (a stalled upstream)."""

    def __init__(self, count: int, size: int) -> None:
        self.left = count
        self.size = size
        self.alive: list[weakref.ref[TrackedChunk]] = []

    async def read(self) -> bytes:
        if not self.left:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        self.left -= 1
        chunk = TrackedChunk(self.size)
        self.alive.append(weakref.ref(chunk))
        return cast(bytes, chunk)

    def live_chunks(self) -> int:
        return sum(ref() is not None for ref in self.alive)


class CountingSink:
    """Takes every chunk at once and keeps only its size."""

    def __init__(self) -> None:
        self.written = 0

    async def write(self, chunk: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += len(chunk)


async def test_written_chunks_are_garbage_while_the_pump_waits() -> None:
    """Once the writer has written a chunk and given its bytes back to the budget,
    no reference to it survives: neither in the writer waiting for the next
    chunk nor in the reader waiting for the next read. Bytes alive = bytes counted."""
    source = ChunkSource(count=3, size=1000)
    sink = CountingSink()
    gauge = BufferGauge()
    budget = MemoryBudget(10_000, reserve=0)
    pump = Pump(buffer_chunks=2, gauge=gauge, budget=budget, read_size=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, source.read, sink.write)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.written == 3000
        assert gauge.held == 0
        assert budget.statistics().held == 1000  # the read in progress, nothing else
        assert source.live_chunks() == 0
        nursery.cancel_scope.cancel()


async def test_pending_first_chunk_is_freed_once_written() -> None:
    """The body bytes pulled with the head (a PendingBody the callers keep
    referencing) are written first and freed then, not when the pump ends;
    they never wait for the budget. Bound: one chunk, nothing once taken."""
    source = ChunkSource(count=0, size=1000)
    sink = CountingSink()
    gauge = BufferGauge()
    budget = MemoryBudget(1000, reserve=0)
    blocker = budget.open_account()
    await blocker.acquire(1000)  # the budget is spent: the reader must wait
    first = TrackedChunk(700)
    first_alive = weakref.ref(first)
    pending = PendingBody(cast(bytes, first))
    del first
    gauge.add(700)  # as send_buffered leaves it
    pump = Pump(buffer_chunks=2, gauge=gauge, budget=budget, read_size=1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, source.read, sink.write, pending)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.written == 700
        assert budget.statistics().waiting == 1  # the reader, still waiting
        assert first_alive() is None
        assert len(pending) == 0
        assert gauge.held == 0
        assert pump.progress.bytes_read == pump.progress.bytes_written == 700
        nursery.cancel_scope.cancel()
    blocker.close()


async def test_pending_first_chunk_leaves_the_gauge_if_never_written() -> None:
    """A pump cancelled before it wrote the pending chunk takes it off the
    gauge and empties the holder: nothing stays counted or referenced."""
    gauge = BufferGauge()
    gauge.add(500)
    pending = PendingBody(b"x" * 500)

    async def stalled_write(chunk: bytes) -> None:
        await trio.sleep_forever()

    pump = Pump(buffer_chunks=1, gauge=gauge)
    with trio.move_on_after(0):
        await pump.run(ChunkSource(count=0, size=1).read, stalled_write, pending)
    assert gauge.held == 0
    assert len(pending) == 0


def _chunked_response(sizes: list[int]) -> tuple[bytes, bytes]:
    body = bytearray()
    wire = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for index, size in enumerate(sizes):
        piece = bytes([65 + index % 26]) * size
        body += piece
        wire += b"%x\r\n%b\r\n" % (size, piece)
    wire += b"0\r\n\r\n"
    return bytes(wire), bytes(body)


async def _upstream_with_response(wire: bytes, read_size: int) -> UpstreamEndpoint:
    return await upstream_endpoint_with(wire, read_size=read_size, eof=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=30),
    read_size=st.sampled_from([512, 4096, 16384]),
)
def test_body_reader_leaves_no_body_bytes_in_h11(sizes: list[int], read_size: int) -> None:
    """After every read, h11's receive buffer holds no body bytes, only at most
    MAX_FRAMING_LEFT bytes of framing; each chunk is at most read_size bytes;
    the chunks add up to the body exactly, then b"" for ever."""

    async def main() -> None:
        wire, body = _chunked_response(sizes)
        upstream = await _upstream_with_response(wire, read_size)
        reader = BodyReader(upstream, read_size)
        received = bytearray()
        while chunk := await reader.read():
            assert len(chunk) <= read_size
            received += chunk
            assert upstream.unparsed_size <= MAX_FRAMING_LEFT
        assert bytes(received) == body
        assert await reader.read() == b""

    trio.run(main)


async def test_body_reader_joins_small_chunks_into_one_read() -> None:
    """Many small upstream chunks that came in one read leave as one chunk
    (h11 holds none of them for later), never above read_size."""
    wire, body = _chunked_response([1000] * 40)
    upstream = await _upstream_with_response(wire, 16384)
    reader = BodyReader(upstream, 16384)
    first = await reader.read()
    assert len(first) > 10_000
    assert upstream.unparsed_size <= MAX_FRAMING_LEFT
    rest = bytearray()
    while chunk := await reader.read():
        rest += chunk
    assert bytes(first) + bytes(rest) == body
