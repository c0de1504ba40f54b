"""Reads from TCP sockets into one buffer that every connection shares.

Why: trio's ``receive_some(n)`` allocates an ``n``-byte object for every read
(64 KiB by default) and shrinks it to what arrived. Hundreds of connections
doing that interleave big short-lived blocks with small long-lived ones in
the malloc heap, so freed space ends up in pieces that neither new reads nor
``malloc_trim`` can use: measured with 200 clients through the channel relay
(docs/memory.md), RSS grew by more than the budgeted payload explains. Most
reads are not kept anyway: h11 copies them into its own receive buffer at
once. So a read can land in a scratch buffer that the next read reuses.

Why one buffer for all connections is safe: trio runs one task at a time, and
``read_into_scratch`` does its checkpoint *before* the read, then reads with
a plain synchronous syscall (``os.readv``) and returns. The bytes stay valid
until the caller's next checkpoint, and the caller hands them to h11 (which
copies them) before it awaits anything. trio's own ``recv_into`` would not do:
it yields once more after the syscall, and another task could overwrite the
buffer in between.

Why that checkpoint yields even when the bytes are already there: it keeps
the connections fair. Without it (tried twice for issue #14), a task whose
next request was waiting ran on through its read ahead of tasks that had
waited longer. Behind nginx at 50 connections (wrk, alternating runs) the
p99 latency rose from 119 to 190 ms for the same CPU per request when
every read skipped it, and from 34-37 to 58-127 ms when only the read of
a waiting next request did (``receive_nowait`` before the idle clock).

Only plain ``trio.SocketStream``s read this way, and only where sockets are
file descriptors that ``os.readv`` takes (POSIX); TLS and in-memory streams,
and Windows, go through ``receive_some`` as before (``scratch_socket``).

Memory: one buffer of the largest ``size`` asked for in this process (the
``read_size``, 64 KiB by default), allocated once and never freed.
"""

from __future__ import annotations

import os

import trio

_buffer = bytearray()

# os.readv exists where sockets are file descriptors (not on Windows).
READV_AVAILABLE = hasattr(os, "readv")


def scratch_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket to read with ``read_into_scratch``, or None to use ``receive_some``."""
    if READV_AVAILABLE and type(stream) is trio.SocketStream:
        return stream.socket
    return None


async def read_into_scratch(sock: trio.socket.SocketType, size: int) -> memoryview:
    """Read at most ``size`` bytes from ``sock``; empty at EOF.

    The result is a view of the shared buffer: valid only until the caller's
    next checkpoint (the next ``await`` that may switch tasks). Cancelling
    loses no data: a cancelled call has read nothing.

    Raises:
        OSError: what the read raised (a reset, or a socket closed meanwhile).
    """
    await trio.lowlevel.checkpoint()
    view = _view(size)
    fd = sock.fileno()
    while True:
        try:
            received = os.readv(fd, [view])
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        return view[:received]


def _view(size: int) -> memoryview:
    """The first ``size`` bytes of the shared buffer, grown once if needed."""
    global _buffer
    if len(_buffer) < size:
        _buffer = bytearray(size)
    return memoryview(_buffer)[:size]


def scratch_size() -> int:
    """Bytes the shared buffer holds now (for tests of its bound)."""
    return len(_buffer)
