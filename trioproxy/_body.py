"""Moving one message body between two endpoints: through h11, or past it.

The exchange decides which path a body takes (``_exchange.choose_body_path``);
this module carries it out. Every path ends the message on the sink side with
``finish``, and every path leaves the sink's message unfinished when the
source fails, so the receiver can tell a body is incomplete (a short
Content-Length body, a chunked body without its last chunk), never a
truncated body framed as complete.

**The pump through h11** (``pump_body``): h11 parses the body on the source
side and frames it anew for the sink's hop (Content-Length, chunked, or
close-delimited); the bytes move through ``_relay.Pump``'s bounded channel.
Trailers are dropped, as hop-by-hop ``Trailer`` is. Every body that is not
a large Content-Length one goes this way.

**Past h11** (``bypass_body``, ``splice_body``): a large Content-Length body
(``bypass_min_body``: 1 MiB from a plain socket, 4 MiB from TLS) moves
straight from the source stream to the sink stream: by ``_splice`` between two
plain sockets (never entering user space), else through the same bounded
pump, read from the source stream and written to the sink stream as they are.
Per chunk, the pump through h11 costs two copies of the chunk in h11's
receive buffer and two h11 calls on each side; through a TLS leg that was
about a quarter of the proxy's CPU (measured: 1 GiB from a TLS upstream,
64 KiB chunks either way, 2.5-2.9 s of CPU through h11, 2.0-2.2 s past it;
``ProxyConfig.bypass_chunk_size`` takes a fifth more off). Three things keep HTTP exact while the
bytes bypass h11:

1. What h11 already read. With the head, h11 may have read some body bytes
   (at most one ``read_size``). They are taken out as ordinary events,
   without reading the stream again, and go first (splice sends them through
   the sink's h11; the pump writes them as its first chunk), so the bypass
   starts exactly where h11 stopped and moves exactly the rest of the
   declared length. Bytes after the body stay in the stream, unread.
2. The sink's framing. ``frame_bypassed`` lets the sink's h11 count the
   bypassed bytes and frame them (nothing for Content-Length, chunk framing if
   the sink's head said chunked), so ``finish`` checks the length as always.
3. The source's state. The source's h11 never sees the bypassed bytes, so it
   stays in ``SEND_BODY``; it is marked ``body_bypassed`` and its connection
   is not reused (``_exchange.may_pool``, ``may_keep_alive``). A bypassed
   upload so always ends its client connection, which the exchange announces
   with ``Connection: close`` on the response; after a bypassed download the
   upstream connection is closed, not pooled: a later request pays a new TCP
   connection or TLS handshake, against the copies saved on at least
   ``bypass_min_body`` bytes. The sink's h11 counted every byte, so after
   the pump its connection may be used again; splice marks the sink too
   (issue #5's rule for a connection that carried a splice).

A source that closes before the declared length is a ``BadGateway`` from an
upstream, a ``BadRequest`` (400) from a client, as h11 reports a short body
on the pump.
"""

from __future__ import annotations

from typing import cast

import h11
import trio

from ._budget import MemoryBudget
from ._config import MiB
from ._endpoint import BypassedBytes, H11Endpoint
from ._errors import STREAM_ERRORS
from ._relay import BufferGauge, Chunk, PendingBody, Progress, Pump, RelayStatistics
from ._splice import SinkBroken, SourceBroken, splice_relay

# The smallest Content-Length body that goes past h11 (splice or the pump
# straight between the streams) from a plain TCP socket. Below it, the copies
# saved do not pay for the source connection that cannot be used again.
BYPASS_MIN_BODY = 1 * MiB
# The same from any other stream (TLS): the connection that cannot be used
# again costs a TLS handshake, about 3 ms of the proxy's CPU for a new
# upstream connection, where the pump past h11 saves about 1.1 ms per MiB
# (measured, 1 GiB and 200 x 2 MiB, 60 x 4 MiB and 60 x 8 MiB downloads in
# a row from a TLS upstream: 2 MiB bodies cost 2-9 % more CPU past h11, 4 MiB
# ones 12-16 % less, 8 MiB ones 16-29 % less).
BYPASS_MIN_BODY_FROM_TLS = 4 * MiB


def bypass_min_body(source: trio.abc.ReceiveStream) -> int:
    """The smallest Content-Length body from ``source`` that goes past h11:
    ``BYPASS_MIN_BODY`` from a plain TCP socket, else (TLS, in-memory
    streams) ``BYPASS_MIN_BODY_FROM_TLS``."""
    return BYPASS_MIN_BODY if isinstance(source, trio.SocketStream) else BYPASS_MIN_BODY_FROM_TLS


async def send_buffered(
    source: H11Endpoint,
    sink: H11Endpoint,
    head: h11.Response,
    *,
    gauge: BufferGauge,
    progress: Progress,
) -> tuple[PendingBody, bool]:
    """Send ``head``, and the whole body too if ``source`` already holds it.

    Pulls h11 events without reading from the stream, so it holds at most
    what h11 had received (one read's worth of body). When that includes the
    ``EndOfMessage``, head, body and end go out in one write: the usual small
    response needs no pump, no task and no nursery. Otherwise the head goes
    alone, and the body bytes pulled are returned for the pump's first write,
    so the pump reads ahead from the start and the backpressure bound is the
    pump's. ``progress`` runs during the write, so a stall watchdog sees a
    receiver that takes nothing.

    Returns:
        The body bytes pulled but not sent (still counted on ``gauge``: pass
        them on as ``first_chunk``), and True if the message ended.
    """
    body, ended = _held_body(source)
    held = len(body)
    gauge.add(held)
    progress.running = True
    progress.moved()
    try:
        await sink.send_head(head, body=body if ended else b"", end=ended)
    except BaseException:
        gauge.remove(held)
        raise
    finally:
        progress.running = False
    if not ended:
        return PendingBody(body), False  # still on the gauge: the pump takes it over
    gauge.remove(held)
    progress.bytes_read += held
    progress.bytes_written += held
    progress.moved()
    return PendingBody(), True


async def pump_body(
    source: H11Endpoint,
    sink: H11Endpoint,
    *,
    buffer_chunks: int,
    gauge: BufferGauge,
    progress: Progress,
    budget: MemoryBudget | None = None,
    first_chunk: PendingBody | None = None,
) -> RelayStatistics:
    """Pump one message body from ``source`` to ``sink`` through a bounded channel, then end it.

    Memory: the pump's bound, ``(buffer_chunks + 2) * source.read_size``
    (``BodyReader``: each read takes out every body byte h11 holds, so none
    waits in h11's buffer outside the budget). ``first_chunk``, bytes
    ``send_buffered`` pulled and left on ``gauge``, is written first and freed
    then (``PendingBody``).

    Raises:
        ProxyError or ClientGone: from either side, as its endpoint translates
        them; the sink's message is then left unfinished.
    """
    limit = source.read_size
    pump = Pump(
        buffer_chunks=buffer_chunks, gauge=gauge, budget=budget, read_size=limit, progress=progress
    )
    statistics = await pump.run(BodyReader(source, limit).read, sink.send_data, first_chunk)
    await sink.finish()
    return statistics


class BodyReader:
    """Reads a message body from an endpoint in chunks of at most ``limit``.

    Each ``read`` reads the stream at most once (``limit`` bytes, what the
    pump reserved from the budget for it) and then takes out every Data event
    h11 can parse from what it holds, joined into one chunk. So h11's receive
    buffer is empty between reads, but for the few bytes of an incomplete
    chunk header: body bytes never wait there, outside the budget, while the
    pump waits for the budget or the sink. Many small upstream chunks become
    one chunk of up to ``limit`` bytes.

    Memory: holds nothing between reads but a rest over ``limit`` (the
    incomplete framing bytes of a previous read, at most a few bytes, when a
    join exceeds ``limit``) and h11's unparsed framing bytes.

    Args:
        source: the endpoint whose message body is read.
        limit: the largest chunk, in bytes: the endpoint's ``read_size``.
    """

    def __init__(self, source: H11Endpoint, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._rest: Chunk = b""
        self._ended = False
        self._needs_data = False  # h11 said NEED_DATA last: read before parsing

    async def read(self) -> Chunk:
        """The next chunk of the body, or ``b""`` after its end."""
        while not self._rest:
            if self._ended:
                return b""
            self._rest, self._ended = await self._receive()
        chunk, self._rest = self._rest, b""
        if len(chunk) > self._limit:
            chunk, self._rest = chunk[: self._limit], chunk[self._limit :]
        return chunk

    async def _receive(self) -> tuple[Chunk, bool]:
        """Body bytes of one read and all h11 holds; True if the message ended."""
        pieces: list[Chunk] = []
        if self._needs_data:  # asking h11 first would only say NEED_DATA again
            await self._source.receive_once()
        event = await self._source.next_event()
        while isinstance(event, h11.Data):
            if event.data:
                pieces.append(event.data)
            event = self._source.next_event_nowait()
        if event is not h11.NEED_DATA and not isinstance(event, h11.EndOfMessage):
            raise AssertionError(f"unexpected h11 event in a body: {event!r}")  # pragma: no cover
        self._needs_data = event is h11.NEED_DATA
        # The usual single piece goes on as h11 made it; several are joined once.
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return data, isinstance(event, h11.EndOfMessage)


async def splice_body(
    source: H11Endpoint,
    sink: H11Endpoint,
    *,
    length: int,
    pipe_size: int,
    gauge: BufferGauge,
    progress: Progress,
    first_chunk: PendingBody | None = None,
) -> None:
    """Move a Content-Length body of ``length`` bytes by splice(2), then end it.

    ``first_chunk`` (body bytes ``send_buffered`` pulled, still on ``gauge``)
    goes first, then what the source's h11 holds, then exactly the rest by
    splice. Both endpoints are marked ``body_bypassed``.

    Memory: zero payload bytes in user space besides what h11 had already read
    with the head (at most ``read_size``), and at most ``pipe_size`` bytes in
    the kernel's pipe.

    Raises:
        BadGateway: the upstream broke, or closed before the body's end.
        BadRequest: the client closed before the body's end.
        ClientGone: the client connection broke.
    """
    sent = await _send_first_chunk(sink, first_chunk, gauge)
    sent += await _forward_buffered_body(source, sink)
    if sent < length:
        source.body_bypassed = sink.body_bypassed = True
        parts = sink.frame_bypassed(length - sent)
        try:
            for part in parts:
                if isinstance(part, BypassedBytes):
                    await _splice_exactly(source, sink, part.size, pipe_size, progress)
                else:
                    await sink.send_framed(part)  # chunked framing only
        except BaseException:
            sink.mark_broken()  # the sink's framing on the wire is unknown
            raise
    await sink.finish()


async def bypass_body(
    source: H11Endpoint,
    sink: H11Endpoint,
    *,
    length: int,
    chunk_size: int,
    buffer_chunks: int,
    gauge: BufferGauge,
    progress: Progress,
    budget: MemoryBudget | None = None,
    first_chunk: PendingBody | None = None,
) -> None:
    """Move a Content-Length body of ``length`` bytes through the bounded
    pump, past both h11 connections, then end it.

    The body's first bytes, ``first_chunk`` (what ``send_buffered`` pulled,
    still on ``gauge``) and what the source's h11 still holds, are the pump's
    first chunk, written while the reader already reads, as ``pump_body``'s.
    The rest the pump reads from the source stream, at most ``chunk_size``
    bytes per read and never past the body's end, and hands each chunk as it
    is to the sink stream. The sink's h11 frames and counts the whole body
    at once (``frame_bypassed``), so it stays exact and the sink's connection
    may be used again; the source is marked ``body_bypassed``.

    Memory: the pump's bound, ``(buffer_chunks + 2) * chunk_size``
    (``_exchange.choose_body_path`` makes it the per-direction bound of
    ``pump_body``: by default one channel slot and chunks of a third of it,
    ``ProxyConfig.bypass_chunk_size``), the first chunk counted in it; h11
    buffers nothing meanwhile.

    Raises:
        BadGateway: the upstream broke, or closed before the body's end.
        BadRequest: the client closed before the body's end.
        ClientGone: the client connection broke.
    """
    first = _take_buffered_body(source, first_chunk, gauge)
    source.body_bypassed = True
    parts = sink.frame_bypassed(length)
    try:
        for part in parts:
            if isinstance(part, BypassedBytes):
                pump = Pump(
                    buffer_chunks=buffer_chunks,
                    gauge=gauge,
                    budget=budget,
                    read_size=chunk_size,
                    progress=progress,
                )
                reader = _ExactReader(source, start=len(first), length=length, limit=chunk_size)
                await pump.run(reader.read, sink.send_framed, first)
            else:
                await sink.send_framed(part)  # chunked framing only
    except BaseException:
        sink.mark_broken()  # the sink's framing on the wire is unknown
        raise
    await sink.finish()


def _take_buffered_body(
    source: H11Endpoint, first_chunk: PendingBody | None, gauge: BufferGauge
) -> PendingBody:
    """``first_chunk`` and the body bytes the source's h11 holds, as one
    pending chunk on ``gauge``; never reads the stream.

    At most one ``read_size`` (h11 holds what one read returned), and the
    usual case is no join: a response's bytes were all pulled by
    ``send_buffered``, an upload's are all still in h11.
    """
    first = first_chunk.take() if first_chunk is not None else b""
    held, _ = _held_body(source)  # the end, if it came, leaves the reader nothing to read
    gauge.add(len(held))
    return PendingBody(first + held if first and held else first or held)


def _held_body(source: H11Endpoint) -> tuple[bytes, bool]:
    """The body bytes ``source``'s h11 already holds, as one ``bytes``, and
    True if the message's end came with them; never reads the stream.

    At most what one read returned. A body cut short shows here as the
    endpoint's protocol error (h11 holds the EOF), or later, when the stream
    is read.
    """
    pieces: list[bytes] = []
    while isinstance(event := source.next_event_nowait(), h11.Data):
        pieces.append(event.data)
    return b"".join(pieces), isinstance(event, h11.EndOfMessage)


class _ExactReader:
    """Reads the rest of a ``length``-byte body, whose first ``start`` bytes
    came otherwise, from an endpoint's stream, past h11.

    Each ``read`` reads the stream once, at most ``limit`` bytes and never past
    the body's end (the next message's bytes stay in the stream); ``b""``
    once the body is complete. A stream that ends first is the endpoint's
    ``short_body``.

    Memory: holds nothing between reads.
    """

    def __init__(self, source: H11Endpoint, *, start: int, length: int, limit: int) -> None:
        self._source = source
        self._length = length
        self._remaining = length - start
        self._limit = limit

    async def read(self) -> Chunk:
        """The next chunk, at most ``limit`` bytes; ``b""`` after the body."""
        if not self._remaining:
            return b""
        try:
            chunk = await self._source.stream.receive_some(min(self._limit, self._remaining))
        except STREAM_ERRORS as exc:
            raise self._source.stream_error(exc) from exc
        if not chunk:
            moved = self._length - self._remaining
            raise self._source.short_body(f"closed the body after {moved} of {self._length} bytes")
        self._remaining -= len(chunk)
        return cast(Chunk, chunk)  # a TLS stream's bytearray, passed on as it is (see Chunk)


async def _send_first_chunk(
    sink: H11Endpoint, first_chunk: PendingBody | None, gauge: BufferGauge
) -> int:
    """Send the bytes ``send_buffered`` pulled; they die with this frame, not
    the splice's. Returns how many."""
    chunk = first_chunk.take() if first_chunk is not None else b""
    if chunk:
        await sink.send_data(chunk)
        gauge.remove(len(chunk))
    return len(chunk)


async def _forward_buffered_body(source: H11Endpoint, sink: H11Endpoint) -> int:
    """Send ``sink`` the body bytes ``source``'s h11 already holds; return how many.

    Never reads the source socket: only what h11 has buffered (at most one
    ``read_size``) is turned into events (a closed, empty buffer makes h11
    report the short body: a BadGateway from an upstream, a 400 from a client).
    """
    forwarded = 0
    while source.has_unparsed_data:
        event = await source.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data), event
        await sink.send_data(event.data)
        forwarded += len(event.data)
    return forwarded


async def _splice_exactly(
    source: H11Endpoint, sink: H11Endpoint, size: int, pipe_size: int, progress: Progress
) -> None:
    assert isinstance(source.stream, trio.SocketStream), source.stream
    assert isinstance(sink.stream, trio.SocketStream), sink.stream
    try:
        moved = await splice_relay(
            source.stream, sink.stream, max_bytes=size, pipe_size=pipe_size, progress=progress
        )
    except SourceBroken as exc:
        raise source.stream_error(exc.__cause__ or exc) from exc
    except SinkBroken as exc:
        raise sink.stream_error(exc.__cause__ or exc) from exc
    if moved < size:
        raise source.short_body(f"closed the body after {moved} of {size} spliced bytes")
