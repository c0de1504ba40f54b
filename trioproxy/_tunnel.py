"""Raw two-way tunnels: CONNECT and Upgrade (101) become byte pipes.

A tunnel is two bounded pumps (``_relay.Pump``), one per direction, in one
nursery. Nothing here knows HTTP: the server answers the CONNECT or forwards
the 101, then hands both streams to ``tunnel``.

Half-close is passed on. TCP lets a peer say "I have nothing more to send"
while it keeps reading (``shutdown(SHUT_WR)``); protocols rely on it (an old
client that half-closes after its request, TLS close_notify followed by FIN).
So when one direction reaches EOF, the tunnel calls ``send_eof()`` on the
other stream and keeps the opposite direction flowing. A sink that cannot
half-close (a TLS stream, say) simply gets nothing; its direction waits for
the other one to end. The tunnel ends when both directions have ended.

Failure containment: a broken or closed stream on either side is a normal way
for a tunnel to end, not a bug. It cancels both directions, both streams are
closed, and the reason is reported in the statistics instead of being raised.
Any other exception is a bug and propagates.

Bytes that h11 has already read past a head (``conn.trailing_data``: a TLS
ClientHello pipelined after CONNECT, a WebSocket frame right after the 101)
are passed in as a prefix and go out before anything read later, so no byte
is lost.

Zero-copy: given ``splice_pipe_size``, each direction is a ``_splice.SplicePump``
instead of a channel pump (the caller checks ``can_splice`` first). Half-close,
prefixes and failure containment are the same; the per-direction bound is
then the pipe's size, in the kernel, with no payload bytes in user space.
"""

from __future__ import annotations

import attrs
import trio

from ._errors import STREAM_ERRORS
from ._relay import BufferGauge, Progress, Pump, ReadChunk, RelayStatistics
from ._splice import SplicePump


@attrs.frozen
class TunnelStatistics:
    """What one tunnel did.

    Attributes:
        a_to_b: the pump from stream ``a`` to stream ``b``.
        b_to_a: the pump from stream ``b`` to stream ``a``.
        error: why the tunnel broke off (a stream error on either side), or
            None if both directions reached EOF.
        first_eof: which stream sent EOF first, ``"a"`` or ``"b"``, or None
            if neither did (an error, or cancellation, ended it).
    """

    a_to_b: RelayStatistics
    b_to_a: RelayStatistics
    error: str | None
    first_eof: str | None = None


class Tunnel:
    """A two-way, half-close-preserving relay between two streams.

    Single-use: create, ``await run(a, b)``, read ``statistics()`` (also while
    it runs, from another task). ``tunnel()`` does both in one call.

    Memory: at most ``2 * (buffer_chunks + 2) * read_size`` payload bytes held
    at any moment: two pumps, each bounded as ``_relay.Pump`` is. With
    ``splice_pipe_size``: none in user space (the prefixes aside), and at
    most ``2 * splice_pipe_size`` bytes in the kernel's pipes.

    Args:
        read_size: the largest chunk read at once, in bytes, at least 1.
        buffer_chunks: each direction's channel capacity N, at least 1.
        gauge: counts the bytes held by both directions; shared if given.
        splice_pipe_size: splice each direction through a pipe of this many
            bytes; both streams must then be plain ``trio.SocketStream``s
            (see ``_splice.can_splice``). None: the channel pumps.
    """

    def __init__(
        self,
        *,
        read_size: int,
        buffer_chunks: int,
        gauge: BufferGauge | None = None,
        splice_pipe_size: int | None = None,
    ) -> None:
        if read_size < 1:
            raise ValueError(f"read_size must be at least 1, got {read_size}")
        self.gauge = gauge if gauge is not None else BufferGauge()
        self._read_size = read_size
        self._a_to_b: Pump | SplicePump
        self._b_to_a: Pump | SplicePump
        if splice_pipe_size is None:
            self._a_to_b = Pump(buffer_chunks=buffer_chunks, gauge=self.gauge)
            self._b_to_a = Pump(buffer_chunks=buffer_chunks, gauge=self.gauge)
        else:
            self._a_to_b = SplicePump(pipe_size=splice_pipe_size)
            self._b_to_a = SplicePump(pipe_size=splice_pipe_size)
        self._error: str | None = None
        self._first_eof: str | None = None

    @property
    def progress(self) -> tuple[Progress, Progress]:
        """Both directions' progress counters, for an idle watchdog."""
        return self._a_to_b.progress, self._b_to_a.progress

    def statistics(self) -> TunnelStatistics:
        """Both pumps' counters and channel fill, and the error if any, now."""
        return TunnelStatistics(
            a_to_b=self._a_to_b.statistics(),
            b_to_a=self._b_to_a.statistics(),
            error=self._error,
            first_eof=self._first_eof,
        )

    async def run(
        self,
        a: trio.abc.Stream,
        b: trio.abc.Stream,
        *,
        a_prefix: bytes = b"",
        b_prefix: bytes = b"",
    ) -> TunnelStatistics:
        """Relay both ways until both directions end or one side breaks.

        Args:
            a, b: the two streams; closed when this returns, whatever happened.
            a_prefix: bytes already read from ``a``; they reach ``b`` first.
            b_prefix: bytes already read from ``b``; they reach ``a`` first.

        Resource handling: both streams are closed (forcefully) on return,
        on a stream error and on cancellation.

        Error handling: stream errors end the tunnel and are reported in
        ``TunnelStatistics.error``; other exceptions propagate.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._direction, nursery, a, b, a_prefix, self._a_to_b, "a")
                nursery.start_soon(self._direction, nursery, b, a, b_prefix, self._b_to_a, "b")
        finally:
            # Nested: under cancellation, the first close re-raises Cancelled.
            try:
                await trio.aclose_forcefully(a)
            finally:
                await trio.aclose_forcefully(b)
        return self.statistics()

    async def _direction(
        self,
        nursery: trio.Nursery,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        prefix: bytes,
        pump: Pump | SplicePump,
        name: str,
    ) -> None:
        """Pump ``prefix`` then ``source`` into ``sink``; pass EOF on as half-close."""
        try:
            if isinstance(pump, SplicePump):
                assert isinstance(source, trio.SocketStream), source
                assert isinstance(sink, trio.SocketStream), sink
                await pump.run(source, sink, prefix=prefix)
            else:
                await pump.run(_prefixed_reader(source, prefix, self._read_size), sink.send_all)
        # A peer that resets, breaks or is closed under us ends the tunnel:
        # reported in ``TunnelStatistics.error``, not raised.
        except* STREAM_ERRORS as group:
            if self._error is None:
                self._error = _describe(group.exceptions[0])
            nursery.cancel_scope.cancel()
        else:
            if self._first_eof is None:
                self._first_eof = name
            await _forward_eof(sink)


async def _forward_eof(sink: trio.abc.SendStream) -> None:
    """Half-close ``sink`` if it can be half-closed.

    A sink that is already gone (its peer reset the connection, as TCP peers
    do after closing) has no use for the EOF; that is not a failure of this
    direction, which did deliver everything, and the opposite direction,
    reading from the same peer, sees the end on its own.
    """
    if not isinstance(sink, trio.abc.HalfCloseableStream):
        return
    try:
        await sink.send_eof()
    except STREAM_ERRORS:
        return


def _prefixed_reader(source: trio.abc.ReceiveStream, prefix: bytes, read_size: int) -> ReadChunk:
    """A read callable: ``prefix`` in chunks of ``read_size``, then ``source``."""
    offset = 0

    async def read() -> bytes:
        nonlocal offset
        if offset < len(prefix):
            chunk = prefix[offset : offset + read_size]
            offset += len(chunk)
            return chunk
        return bytes(await source.receive_some(read_size))  # no copy when already bytes

    return read


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def tunnel(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    read_size: int,
    buffer_chunks: int,
    gauge: BufferGauge | None = None,
    a_prefix: bytes = b"",
    b_prefix: bytes = b"",
    splice_pipe_size: int | None = None,
) -> TunnelStatistics:
    """Relay bytes both ways between ``a`` and ``b`` with bounded memory.

    Each direction is a bounded pump: it reads at most ``read_size`` bytes at
    a time and lets at most ``buffer_chunks`` chunks wait for its sink. When
    one side reaches EOF, ``send_eof()`` is called on the other side (if it is
    a ``trio.abc.HalfCloseableStream``) and the opposite direction keeps
    flowing. Returns when both directions have reached EOF, or as soon as
    either side breaks (then the other direction is cancelled).

    Memory: at most ``2 * (buffer_chunks + 2) * read_size`` payload bytes are
    held at any moment, however fast one side sends and however slow the
    other reads; with the defaults 2 x (4 + 2) x 64 KiB = 768 KiB. The
    prefixes are the caller's bytes; they pass through in ``read_size``
    chunks under the same bound.

    Args:
        a, b: the two streams (TCP, TLS, Unix, in-memory).
        read_size: the largest chunk, in bytes.
        buffer_chunks: each direction's channel capacity N, at least 1.
        gauge: a shared counter of bytes held, for metrics and tests.
        a_prefix: bytes already read from ``a`` (for example h11's
            ``trailing_data``); they reach ``b`` before anything else.
        b_prefix: the same for ``b``.
        splice_pipe_size: move bytes with splice(2) through a pipe of this
            size per direction (both streams must be plain sockets, see
            ``_splice.can_splice``); None for the channel pumps.

    Returns:
        TunnelStatistics: bytes moved each way, and why it broke off, if it did.

    Resource handling: both streams are closed when this returns or is
    cancelled.

    Raises:
        ValueError: for sizes that cannot hold one chunk.
        Nothing for stream errors: they end the tunnel and are reported in
        ``TunnelStatistics.error``.
    """
    return await Tunnel(
        read_size=read_size,
        buffer_chunks=buffer_chunks,
        gauge=gauge,
        splice_pipe_size=splice_pipe_size,
    ).run(a, b, a_prefix=a_prefix, b_prefix=b_prefix)
