"""Zero-copy relay on Linux: socket -> kernel pipe -> socket with splice(2).

The channel relay (``_relay``) copies every byte twice across the kernel
boundary: ``recv`` into a Python bytes object, ``send`` out of it. splice(2)
moves pages between a socket and a pipe inside the kernel, so a byte going
socket -> pipe -> socket never enters this process. Measured on this kind of
machine (issue 5), a plain trio read/write loop reached about 0.33 x the
direct transfer rate and a splice loop 0.55-0.62 x.

The pipe is the buffer, and its size is the bound. Each ``SplicePump`` owns
one pipe and alternates strictly: when the pipe is empty it splices whatever
the source socket has (at most the pipe size, and never past ``max_bytes``)
into it, then splices the pipe out to the sink until it is empty again. So at
most ``pipe_size`` bytes wait in the kernel on behalf of one direction, and
while the sink is slow nothing more is taken from the source: the source's
socket buffer fills and TCP flow control slows the sender, exactly the
backpressure the channel relay gets from its full channel. User-space bytes
on this path: zero.

Waiting is trio's: the sockets are non-blocking (trio makes them so) and the
pipe is opened non-blocking, and every splice also carries
``SPLICE_F_NONBLOCK``; on EAGAIN the pump parks in
``trio.lowlevel.wait_readable`` (source) or ``wait_writable`` (sink) on the
socket's descriptor. One checkpoint per cycle keeps a fast transfer from
starving the other tasks.

Failures are told apart by side, because the callers translate them
differently (client side: ClientGone, upstream side: BadGateway): an error
while splicing in is a ``SourceBroken``, one while splicing out a
``SinkBroken``. Both are ``trio.BrokenResourceError`` so code written for
trio streams (the tunnel) treats them as any broken stream.

Where splice cannot work (not Linux, no ``os.splice``, a TLS stream or any
stream that is not a plain socket, such as the in-memory streams of the
tests) or does not pay (a body below ``SPLICE_MIN_BODY``), ``can_splice``
says no and the callers use the channel relay.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import sys
import termios
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import cache

import trio

from ._config import MiB, ProxyConfig
from ._errors import STREAM_ERRORS
from ._relay import Progress, RelayStatistics

# Below this many body bytes the channel relay is used: such a body is a few
# 64 KiB reads, and the splice path's fixed cost (pipe2, fcntl and two closes
# per transfer, and a non-reusable upstream) is larger than the copies saved.
SPLICE_MIN_BODY = 1 * MiB

# Linux's default /proc/sys/fs/pipe-max-size, used if that file cannot be read.
_DEFAULT_PIPE_MAX_SIZE = 1 * MiB

# MOVE: a hint to move pages rather than copy them. NONBLOCK: the pipe side
# never blocks (the sockets are non-blocking already), so EAGAIN comes back
# to us and we wait with trio instead of blocking the whole thread.
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

_SPLICEABLE_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})


class SourceBroken(trio.BrokenResourceError):
    """Splicing from the source socket failed (reset, closed, bad descriptor)."""


class SinkBroken(trio.BrokenResourceError):
    """Splicing into the sink socket failed (reset, broken pipe, closed)."""


def splice_supported() -> bool:
    """True on Linux with ``os.splice`` and ``fcntl.F_SETPIPE_SZ`` (Python 3.10+)."""
    return sys.platform == "linux" and hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


def can_splice(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, length: int | None
) -> bool:
    """Whether ``source`` -> ``sink`` can go by splice rather than the channel relay.

    Args:
        source: the stream bytes come from.
        sink: the stream they go to.
        length: the body's length in bytes, or None for a tunnel (no end known).

    Returns:
        True if splice is supported here, both streams are plain stream
        sockets (not TLS, not in-memory) and the transfer is a tunnel or a
        body of at least ``SPLICE_MIN_BODY`` bytes.
    """
    if length is not None and length < SPLICE_MIN_BODY:
        return False
    return splice_supported() and _is_plain_socket(source) and _is_plain_socket(sink)


def splice_pipe_size(
    config: ProxyConfig,
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    length: int | None,
) -> int | None:
    """The pipe size to splice ``source`` -> ``sink`` with, or None for the channel relay.

    None when ``config.splice`` is off or ``can_splice`` says no.
    """
    if not config.splice or not can_splice(source, sink, length):
        return None
    return pipe_size_for(config.max_buffered_per_direction)


def _is_plain_socket(stream: object) -> bool:
    if not isinstance(stream, trio.SocketStream):
        return False
    sock = stream.socket
    return sock.type == socket.SOCK_STREAM and sock.family in _SPLICEABLE_FAMILIES


def pipe_size_for(max_buffered: int) -> int:
    """The pipe size for a per-direction bound of ``max_buffered`` bytes.

    The channel relay's bound, ``(buffer_chunks + 2) * read_size``, rounded
    down to whole pages (at least one) and capped by the system's
    ``/proc/sys/fs/pipe-max-size``, which unprivileged processes cannot exceed.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    return min(max(page, max_buffered // page * page), pipe_max_size())


@cache
def pipe_max_size() -> int:
    """``/proc/sys/fs/pipe-max-size``, or Linux's default if it cannot be read."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as file:
            return int(file.read())
    except (OSError, ValueError):
        return _DEFAULT_PIPE_MAX_SIZE


class KernelPipe:
    """A non-blocking pipe, resized towards ``size`` bytes.

    Attributes:
        read_fd: the read end.
        write_fd: the write end.
        capacity: the bytes the pump lets into it: the requested size, or
            less if the kernel refused to grow the pipe (a user over
            ``/proc/sys/fs/pipe-user-pages-soft`` keeps small pipes).
    """

    def __init__(self, size: int) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            granted = fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        except OSError:  # EPERM over the per-user limit: keep the default size
            granted = fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ)
        # The kernel rounds up to a power of two pages; we never fill past size.
        self.capacity = min(size, granted)

    def bytes_held(self) -> int:
        """The bytes in the pipe now, as the kernel counts them (FIONREAD)."""
        count = array.array("i", [0])
        fcntl.ioctl(self.read_fd, termios.FIONREAD, count)
        return count[0]

    def close(self) -> None:
        try:
            os.close(self.read_fd)
        finally:
            os.close(self.write_fd)


@contextmanager
def _open_pipe(size: int) -> Iterator[KernelPipe]:
    pipe = KernelPipe(size)
    try:
        yield pipe
    finally:
        pipe.close()


class SplicePump:
    """One zero-copy transfer from a socket stream to a socket stream.

    Single-use: create, ``await run(source, sink)``, then read
    ``statistics()`` (also while it runs, from another task).

    Memory: zero payload bytes in user space (except ``prefix``, which the
    caller already holds); in the kernel, at most ``pipe_size`` bytes wait in
    this pump's pipe, per direction, whatever the transfer's size and however
    slow the sink. The sockets' own buffers are the kernel's, bounded per
    socket as for any connection.

    Args:
        pipe_size: the pipe's capacity in bytes, the bound (see
            ``pipe_size_for``); the kernel may grant less, never more is used.
        progress: updated as bytes move, for watchers such as the stall
            watchdog.
    """

    def __init__(self, *, pipe_size: int, progress: Progress | None = None) -> None:
        if pipe_size < 1:
            raise ValueError(f"pipe_size must be at least 1, got {pipe_size}")
        self.pipe_size = pipe_size
        self.progress = progress if progress is not None else Progress()
        self.pipe: KernelPipe | None = None  # while running, for tests and metrics
        self.in_pipe = 0
        self.peak_in_pipe = 0
        self._read = 0
        self._written = 0
        self._splices_out = 0
        self._waits = 0
        self._wait_seconds = 0.0

    def statistics(self) -> RelayStatistics:
        """The counters in the channel relay's terms.

        ``chunks_relayed`` counts splices into the sink; ``buffered_chunks``
        is 1 while the pipe holds bytes, and ``buffer_capacity`` is 1: the pipe
        is the one buffer.
        """
        return RelayStatistics(
            bytes_relayed=self._written,
            chunks_relayed=self._splices_out,
            sink_waits=self._waits,
            sink_wait_seconds=self._wait_seconds,
            buffered_chunks=1 if self.in_pipe else 0,
            buffer_capacity=1,
        )

    async def run(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        *,
        max_bytes: int | None = None,
        prefix: bytes = b"",
    ) -> int:
        """Move bytes until ``source``'s EOF, or until ``max_bytes`` have moved.

        Args:
            source: a plain socket stream (see ``can_splice``).
            sink: a plain socket stream.
            max_bytes: stop exactly after this many bytes (a Content-Length
                body's rest), or None to run to EOF.
            prefix: bytes already read from ``source``; sent first with
                ``sink.send_all`` and counted.

        Returns:
            The bytes delivered to ``sink`` (with the prefix). Less than
            ``max_bytes`` means the source reached EOF first.

        Raises:
            SourceBroken: reading from ``source`` failed.
            SinkBroken: writing to ``sink`` failed.
        """
        self.progress.running = True
        self.progress.moved()
        try:
            if prefix:
                await self._send_prefix(sink, prefix)
            with _open_pipe(self.pipe_size) as pipe:
                self.pipe = pipe
                await self._pump(source.socket.fileno(), sink.socket.fileno(), pipe, max_bytes)
        finally:
            self.pipe = None
            self.progress.running = False
        return self._written

    async def _send_prefix(self, sink: trio.SocketStream, prefix: bytes) -> None:
        try:
            await sink.send_all(prefix)
        except STREAM_ERRORS as exc:
            raise SinkBroken(f"sink failed: {exc!r}") from exc
        self._read += len(prefix)
        self._written += len(prefix)
        self.progress.bytes_read += len(prefix)
        self.progress.bytes_written += len(prefix)
        self.progress.moved()

    async def _pump(self, source: int, sink: int, pipe: KernelPipe, max_bytes: int | None) -> None:
        """Fill the empty pipe from ``source``, drain it into ``sink``, repeat."""
        while max_bytes is None or self._read < max_bytes:
            room = (
                pipe.capacity if max_bytes is None else min(pipe.capacity, max_bytes - self._read)
            )
            if not await self._fill(source, pipe, room):
                return  # EOF
            await self._drain(pipe, sink)
            await trio.lowlevel.checkpoint()

    async def _fill(self, source: int, pipe: KernelPipe, room: int) -> int:
        """Splice up to ``room`` bytes from ``source`` into the empty pipe; 0 at EOF."""
        while True:
            try:
                moved = os.splice(source, pipe.write_fd, room, flags=_FLAGS)
            except BlockingIOError:
                await _wait(trio.lowlevel.wait_readable, source, SourceBroken)
                continue
            except OSError as exc:
                raise SourceBroken(f"source failed: {exc!r}") from exc
            self._read += moved
            self.in_pipe += moved
            self.peak_in_pipe = max(self.peak_in_pipe, self.in_pipe)
            self.progress.bytes_read += moved
            self.progress.moved()
            return moved

    async def _drain(self, pipe: KernelPipe, sink: int) -> None:
        """Splice everything in the pipe into ``sink``, waiting while it is full."""
        while self.in_pipe:
            try:
                moved = os.splice(pipe.read_fd, sink, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                await self._wait_for_sink(sink)
                continue
            except OSError as exc:
                raise SinkBroken(f"sink failed: {exc!r}") from exc
            self.in_pipe -= moved
            self._written += moved
            self._splices_out += 1
            self.progress.bytes_written += moved
            self.progress.moved()

    async def _wait_for_sink(self, sink: int) -> None:
        self._waits += 1
        started = trio.current_time()
        try:
            await _wait(trio.lowlevel.wait_writable, sink, SinkBroken)
        finally:
            self._wait_seconds += trio.current_time() - started


async def _wait(
    wait: Callable[[int], Awaitable[None]],
    fd: int,
    broken: type[SourceBroken] | type[SinkBroken],
) -> None:
    """Park in trio until ``fd`` is ready; a socket closed meanwhile is broken."""
    try:
        await wait(fd)
    except trio.ClosedResourceError as exc:
        raise broken(f"socket closed while waiting: {exc!r}") from exc


async def splice_relay(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    *,
    max_bytes: int | None,
    pipe_size: int,
    progress: Progress | None = None,
) -> int:
    """Move bytes from ``source`` to ``sink`` with splice(2), never through user space.

    Memory: zero payload bytes in user space; at most ``pipe_size`` bytes
    (the pipe's capacity) wait in the kernel for this direction, however
    large the transfer and however slow ``sink``.

    Args:
        source: a plain socket stream (check with ``can_splice``).
        sink: a plain socket stream.
        max_bytes: stop exactly after this many bytes (the rest of a
            Content-Length body, so the HTTP state can be completed), or None
            to run until ``source``'s EOF. Neither stream is closed or
            half-closed here.
        pipe_size: the pipe's capacity in bytes, the per-direction bound.
        progress: updated as bytes move.

    Returns:
        The bytes delivered to ``sink``; less than ``max_bytes`` means the
        source reached EOF first.

    Raises:
        SourceBroken: reading from ``source`` failed.
        SinkBroken: writing to ``sink`` failed.
    """
    pump = SplicePump(pipe_size=pipe_size, progress=progress)
    return await pump.run(source, sink, max_bytes=max_bytes)
