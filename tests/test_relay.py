"""The bounded pump: relay() holds at most (N + 2) x read_size and resumes."""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

import trioproxy
from trioproxy._relay import Pump, chunking_for

from .helpers import pattern


class EndlessSource(trio.abc.ReceiveStream):
    """A fast upstream: every receive_some returns a full chunk at once.

    ``pulled`` counts the bytes taken from it; ``limit`` ends it with EOF.
    """

    def __init__(self, limit: int) -> None:
        self.payload = pattern(limit)
        self.pulled = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        size = max_bytes or 65536
        chunk = self.payload[self.pulled : self.pulled + size]
        self.pulled += len(chunk)
        return chunk

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(("read_size", "buffer_chunks"), [(1024, 1), (4096, 4), (65536, 8)])
async def test_stalled_sink_stops_the_reader_at_the_bound(
    read_size: int, buffer_chunks: int
) -> None:
    """With a sink that reads nothing, relay pulls exactly (N + 2) x read_size
    from the source and blocks: N chunks in the channel, one in each hand."""
    source = EndlessSource(limit=10_000_000)
    sink, _sink_reader = trio.testing.lockstep_stream_pair()
    gauge = trioproxy.BufferGauge()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trioproxy.relay(
                source, sink, read_size=read_size, buffer_chunks=buffer_chunks, gauge=gauge
            )
        )
        await trio.testing.wait_all_tasks_blocked()
        bound = (buffer_chunks + 2) * read_size
        assert source.pulled == bound
        assert gauge.held == bound
        await trio.testing.wait_all_tasks_blocked()
        assert source.pulled == bound  # still blocked: nothing more was read
        nursery.cancel_scope.cancel()


async def test_channel_statistics_show_a_full_channel_while_stalled() -> None:
    """The Pump's statistics report a full channel and one wait on the sink
    while the sink is stalled, and every byte once it drains."""
    source = EndlessSource(limit=200_000)
    sink, sink_reader = trio.testing.lockstep_stream_pair()
    pump = Pump(buffer_chunks=3)

    async def read() -> bytes:
        return await source.receive_some(1000)

    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump.run, read, sink.send_all)
        await trio.testing.wait_all_tasks_blocked()
        stalled = pump.statistics()
        assert stalled.buffered_chunks == stalled.buffer_capacity == 3
        assert stalled.sink_waits == 1
        assert source.pulled == 5 * 1000
        while len(received) < 200_000:
            received += await sink_reader.receive_some()
    final = pump.statistics()
    assert bytes(received) == source.payload
    assert final.bytes_relayed == 200_000
    assert final.chunks_relayed == 200
    assert final.buffered_chunks == 0


async def test_relay_resumes_and_delivers_every_byte() -> None:
    """After a stall, a sink that starts reading gets the whole stream byte-exact."""
    size = 3_000_000
    source = EndlessSource(limit=size)
    sink, sink_reader = trio.testing.lockstep_stream_pair()
    digest = hashlib.sha256()
    delivered = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trioproxy.relay(source, sink, read_size=4096, buffer_chunks=2))
        await trio.testing.wait_all_tasks_blocked()
        assert source.pulled == 4 * 4096
        while delivered < size:
            data = await sink_reader.receive_some(10_000)
            digest.update(data)
            delivered += len(data)
    assert digest.hexdigest() == hashlib.sha256(source.payload).hexdigest()


async def test_sink_failure_cancels_the_reader_and_raises_itself() -> None:
    """A sink that breaks ends the relay with its own exception, not a group,
    and the reader stops pulling."""
    source = EndlessSource(limit=10_000_000)
    sink, sink_reader = trio.testing.lockstep_stream_pair()
    await sink_reader.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await trioproxy.relay(source, sink, read_size=1024, buffer_chunks=2)
    assert source.pulled <= 4 * 1024


def test_max_buffer_bytes_derives_a_fitting_chunking() -> None:
    """max_buffer_bytes yields (N + 2) x read_size <= the requested bound."""
    for budget in (3, 100, 256 * 1024, 1_000_000):
        read_size, chunks = chunking_for(budget, 65536)
        assert chunks >= 1
        assert (chunks + 2) * read_size <= budget
    assert chunking_for(256 * 1024, 65536) == (65536, 2)
    with pytest.raises(ValueError, match="at least 3"):
        chunking_for(2, 65536)


def test_infinite_channel_is_refused() -> None:
    """The pump never becomes the unbounded relay of the story."""
    with pytest.raises(ValueError, match="finite"):
        Pump(buffer_chunks=float("inf"))  # type: ignore[arg-type]
