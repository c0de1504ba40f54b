"""The bounded pump: the one place where payload bytes wait in user space.

A reader task and a writer task share one ``trio.open_memory_channel(N)``.
The reader takes a chunk from the source and puts it into the channel; when
the channel is full, ``send`` blocks and the reader stops reading. That block
is the backpressure: a slow sink slows the reader down to its own pace, so
nothing piles up however large the transfer. EOF is the closing of the channel
(``with send_channel:``), never a sentinel. If either task fails, the nursery
cancels the other: a client that goes away cancels the upstream read at once.

The bound, per pump: at most ``(N + 2) * read_size`` payload bytes are held at
any moment: N chunks in the channel, one in the reader's hand (blocked on a
full channel), one in the writer's (being written). ``BufferGauge`` counts
exactly those bytes so tests and metrics can check the bound.

A ``MemoryBudget`` (``_budget``) caps the sum over all pumps: given one, the
reader reserves ``read_size`` before each read, gives back the unused part
right after it, and the writer gives back the chunk after writing it. Each
pump's account is closed when it ends, so nothing leaks on cancellation or
errors (chunks still in the channel are returned with it).

Counted is not enough: RSS follows what is *alive*. So no hand keeps a
reference to a chunk after giving its bytes back (no loop variable outlives
its write; the reader's chunk lives in a frame of its own), the body bytes
read with a message head travel in a ``PendingBody`` that the writer empties,
and the h11 body reader (``_body.BodyReader``) leaves no body bytes in h11's
buffer between reads.
Measured with 200 slow clients (docs/memory.md), each of these had pinned
about one chunk per connection outside the budget.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import attrs
import trio

from ._budget import BudgetAccount, MemoryBudget
from ._config import DEFAULT_BUFFER_CHUNKS, DEFAULT_READ_SIZE
from ._errors import collapse_single_error

# A chunk of payload: bytes from a stream, or the bytearray h11 extracted for a
# Data event (typed bytes by h11), handed on as it is: a copy would only double
# what is held. Both have len() and the buffer protocol, all the pump needs.
Chunk = bytes
ReadChunk = Callable[[], Awaitable[Chunk]]
WriteChunk = Callable[[Chunk], Awaitable[object]]


@attrs.frozen
class RelayStatistics:
    """What one pump did.

    Attributes:
        bytes_relayed: payload bytes written to the sink.
        chunks_relayed: chunks written to the sink.
        sink_waits: how often the reader found the channel full and had to
            wait for the sink.
        sink_wait_seconds: how long, in total, it waited (trio's clock).
        buffered_chunks: chunks in the channel right now.
        buffer_capacity: the channel's capacity, N.
    """

    bytes_relayed: int
    chunks_relayed: int
    sink_waits: int
    sink_wait_seconds: float
    buffered_chunks: int
    buffer_capacity: int


@attrs.define
class BufferGauge:
    """Payload bytes held between read and write, now and at the peak.

    Shared by many pumps (one per direction, or one for a whole server), it
    counts every byte from the moment a reader has it until the writer has
    written it (or the pump ends), and, for metrics, the bytes written and the
    time readers waited for a slow sink.
    """

    held: int = 0
    peak: int = 0
    relayed: int = 0
    sink_wait_seconds: float = 0.0

    def add(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def remove(self, size: int) -> None:
        self.held -= size


@attrs.define
class Progress:
    """How far one pump has got, for watchers such as a stall watchdog.

    The pump writes these plain counters as chunks move; other tasks read
    them. No callback runs inside the pump, so a watcher cannot slow it down
    or break it.

    Attributes:
        bytes_read: payload bytes taken from the source.
        bytes_written: payload bytes written to the sink.
        last_moved: ``trio.current_time()`` when a chunk was last read or
            written, or when the pump started.
        running: True between the pump's start and its end.
    """

    bytes_read: int = 0
    bytes_written: int = 0
    last_moved: float = -math.inf
    running: bool = False

    def moved(self) -> None:
        self.last_moved = trio.current_time()


@attrs.define
class PendingBody:
    """Body bytes pulled ahead of a pump (``send_buffered``), handed over once.

    A plain ``bytes`` passed down a chain of calls stays alive in every
    caller's frame until the whole body has been relayed: 64 KiB pinned per
    download, outside the budget. The pump's writer ``take``s the bytes out
    of this holder instead, so they die as soon as the sink has them.

    Memory: holds at most what h11 had received with the message head, one
    ``read_size``; nothing once taken.
    """

    data: bytes = b""

    def take(self) -> bytes:
        """The bytes, leaving the holder empty."""
        data, self.data = self.data, b""
        return data

    def __len__(self) -> int:
        return len(self.data)


class Pump:
    """One bounded transfer from a read callable to a write callable.

    Single-use: create, ``await run(read, write)``, then read ``statistics()``
    (also while it runs, from another task).

    Memory: holds at most ``(buffer_chunks + 2) * largest_chunk`` payload bytes,
    where ``largest_chunk`` is the most ``read`` returns at once.

    Args:
        buffer_chunks: the channel's capacity, N >= 1 (never ``math.inf``).
        gauge: counts the bytes held; shared between pumps if given.
        budget: a global budget to reserve from before each read, if any.
        read_size: the most ``read`` may return; required with ``budget``.
        progress: updated as chunks move, for watchers in other tasks.
    """

    def __init__(
        self,
        *,
        buffer_chunks: int,
        gauge: BufferGauge | None = None,
        budget: MemoryBudget | None = None,
        read_size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        if not 1 <= buffer_chunks < math.inf:
            raise ValueError(f"buffer_chunks must be a finite number >= 1, got {buffer_chunks}")
        if budget is not None and read_size is None:
            raise ValueError("a pump with a budget needs read_size")
        self._budget = budget
        self._read_size = read_size or 0
        self._gauged = 0  # this pump's share of gauge.held
        self._send_channel, self._receive_channel = trio.open_memory_channel[Chunk](buffer_chunks)
        self._capacity = buffer_chunks
        self.gauge = gauge if gauge is not None else BufferGauge()
        self.progress = progress if progress is not None else Progress()
        self._bytes = 0
        self._chunks = 0
        self._waits = 0
        self._wait_seconds = 0.0

    def statistics(self) -> RelayStatistics:
        """The pump's counters and the channel's fill, at this moment."""
        return RelayStatistics(
            bytes_relayed=self._bytes,
            chunks_relayed=self._chunks,
            sink_waits=self._waits,
            sink_wait_seconds=self._wait_seconds,
            buffered_chunks=self._send_channel.statistics().current_buffer_used,
            buffer_capacity=self._capacity,
        )

    async def run(
        self, read: ReadChunk, write: WriteChunk, first_chunk: PendingBody | None = None
    ) -> RelayStatistics:
        """Move chunks from ``read`` (``b""`` means EOF) to ``write`` until EOF.

        ``first_chunk``, bytes already read and counted on ``gauge`` but not
        on the budget, is written first, by the writer, while the reader
        already reserves and reads: it never waits behind the budget, and it
        is freed once written (``PendingBody``).

        Error handling: the first exception of either side cancels the other
        and is raised as itself (not wrapped in an ExceptionGroup).
        """
        account = self._budget.open_account() if self._budget is not None else None
        first = first_chunk if first_chunk is not None else PendingBody()
        self._gauged += len(first)  # already on gauge.held; this pump owns it now
        self.progress.running = True
        self.progress.moved()
        try:
            with collapse_single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_side, read, account)
                    nursery.start_soon(self._write_side, write, account, first)
        finally:
            # Chunks left in the channel or in a task's hand are gone now.
            first.take()
            self.gauge.remove(self._gauged)
            self._gauged = 0
            if account is not None:
                account.close()
            self.progress.running = False
        return self.statistics()

    async def _read_side(self, read: ReadChunk, account: BudgetAccount | None) -> None:
        with self._send_channel:
            while await self._read_one(read, account):
                pass

    async def _read_one(self, read: ReadChunk, account: BudgetAccount | None) -> bool:
        """Read one chunk and hand it to the channel; False at EOF or a failed writer.

        A function of its own so that the chunk dies with its frame: a loop
        variable would keep the last chunk alive while the next read waits for
        the budget, long after the writer wrote it and gave its bytes back.
        """
        chunk = await self._read_counted(read, account)
        if not chunk:
            return False
        try:
            self._send_channel.send_nowait(chunk)
        except trio.WouldBlock:
            return await self._wait_for_sink(chunk)
        except trio.BrokenResourceError:
            return False  # the writer failed and closed its end; its error says why
        return True

    async def _wait_for_sink(self, chunk: bytes) -> bool:
        self._waits += 1
        started = trio.current_time()
        try:
            await self._send_channel.send(chunk)
        except trio.BrokenResourceError:
            # The writer failed and closed its end while we waited; its own
            # error is the one the nursery raises (not a group of two).
            return False
        finally:
            waited = trio.current_time() - started
            self._wait_seconds += waited
            self.gauge.sink_wait_seconds += waited
        return True

    async def _read_counted(self, read: ReadChunk, account: BudgetAccount | None) -> bytes:
        """Read one chunk, reserved from the budget beforehand if there is one."""
        if account is None:
            chunk = await read()
        else:
            try:  # the usual case, without the scheduler round trip of acquire
                account.acquire_nowait(self._read_size)
            except trio.WouldBlock:
                await account.acquire(self._read_size)
            chunk = await read()
            if len(chunk) > self._read_size:
                raise ValueError(f"read returned {len(chunk)} bytes, over {self._read_size}")
            account.release(self._read_size - len(chunk))
        self.gauge.add(len(chunk))
        self._gauged += len(chunk)
        self.progress.bytes_read += len(chunk)
        self.progress.moved()
        return chunk

    async def _write_side(
        self, write: WriteChunk, account: BudgetAccount | None, first: PendingBody
    ) -> None:
        with self._receive_channel:
            if first:
                await self._write_first(write, first)
            while await self._write_one(write, account):
                pass

    async def _write_one(self, write: WriteChunk, account: BudgetAccount | None) -> bool:
        """Write the next chunk from the channel; False at its end.

        A chunk already waiting is taken without the scheduler round trip of
        ``receive``: the write is this step's schedule point. The chunk dies
        with this frame, before its bytes go back to the budget, not while
        the writer waits for the next one.
        """
        try:
            chunk = self._receive_channel.receive_nowait()
        except trio.WouldBlock:
            try:
                chunk = await self._receive_channel.receive()
            except trio.EndOfChannel:
                return False
        except trio.EndOfChannel:
            return False
        size = len(chunk)
        await write(chunk)
        del chunk
        self._written(size, account)
        return True

    async def _write_first(self, write: WriteChunk, first: PendingBody) -> None:
        """Write the pending first chunk; it dies with this frame, not the pump."""
        chunk = first.take()
        self.progress.bytes_read += len(chunk)
        await write(chunk)
        self._written(len(chunk), None)

    def _written(self, size: int, account: BudgetAccount | None) -> None:
        self.gauge.remove(size)
        self.gauge.relayed += size
        self._gauged -= size
        if account is not None:
            account.release(size)
        self._bytes += size
        self._chunks += 1
        self.progress.bytes_written += size
        self.progress.moved()


async def relay(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    *,
    read_size: int = DEFAULT_READ_SIZE,
    buffer_chunks: int = DEFAULT_BUFFER_CHUNKS,
    max_buffer_bytes: int | None = None,
    gauge: BufferGauge | None = None,
    budget: MemoryBudget | None = None,
) -> RelayStatistics:
    """Pump every byte of ``source`` into ``sink`` with bounded memory.

    Reads at most ``read_size`` bytes at a time and lets at most
    ``buffer_chunks`` chunks wait for the sink. Returns at ``source``'s EOF,
    leaving both streams open (call ``sink.send_eof()`` or ``aclose()`` as
    your protocol wants).

    Memory: at most ``(buffer_chunks + 2) * read_size`` bytes are held at any
    moment, whatever the transfer's size and however slow the sink. With the
    defaults: (4 + 2) x 64 KiB = 384 KiB.

    Args:
        source: any trio receive stream (TCP, TLS, Unix, in-memory).
        sink: any trio send stream.
        read_size: the largest chunk, in bytes.
        buffer_chunks: the channel's capacity N, at least 1.
        max_buffer_bytes: instead of choosing the two above, the bound you
            want; ``buffer_chunks`` and, if needed, ``read_size`` are derived
            so that ``(buffer_chunks + 2) * read_size <= max_buffer_bytes``.
        gauge: a shared counter of bytes held, for metrics and tests.
        budget: a memory budget shared with other pumps; each read waits
            until ``read_size`` bytes of it are free (see ``MemoryBudget``).

    Returns:
        RelayStatistics: bytes moved, and how often and how long the reader
        waited for the sink.

    Raises:
        ValueError: for sizes that cannot hold one chunk.
        Whatever ``source.receive_some`` or ``sink.send_all`` raise, after
        the other side has been cancelled.
    """
    if max_buffer_bytes is not None:
        read_size, buffer_chunks = chunking_for(max_buffer_bytes, read_size)
    if read_size < 1:
        raise ValueError(f"read_size must be at least 1, got {read_size}")

    async def read() -> bytes:
        return bytes(await source.receive_some(read_size))  # no copy when already bytes

    pump = Pump(buffer_chunks=buffer_chunks, gauge=gauge, budget=budget, read_size=read_size)
    return await pump.run(read, sink.send_all)


def chunking_for(max_buffer_bytes: int, read_size: int) -> tuple[int, int]:
    """Choose ``(read_size, buffer_chunks)`` whose bound fits ``max_buffer_bytes``.

    Keeps ``read_size`` if at least one channel slot fits beside the two
    in-hand chunks, else shrinks it to a third of the budget.

    Raises:
        ValueError: if ``max_buffer_bytes`` is below 3 bytes.
    """
    if max_buffer_bytes < 3:
        raise ValueError(f"max_buffer_bytes must be at least 3, got {max_buffer_bytes}")
    read_size = min(read_size, max_buffer_bytes // 3)
    return read_size, max_buffer_bytes // read_size - 2
