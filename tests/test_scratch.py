"""The shared scratch buffer for socket reads (trioproxy/_scratch.py)."""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing

from trioproxy import _scratch
from trioproxy._config import KiB
from trioproxy._endpoint import UpstreamEndpoint

from .helpers import socket_stream_pair


async def test_concurrent_readers_each_get_their_own_bytes() -> None:
    """Many connections reading through the one buffer at the same time each
    get exactly their peer's bytes: the read and its use happen with no task
    switch in between (a read that yielded after the syscall, as trio's
    ``recv_into`` does, would let another reader overwrite the buffer)."""
    pairs = [socket_stream_pair() for _ in range(8)]
    received: list[bytearray] = [bytearray() for _ in pairs]
    size = 40 * KiB

    async def read_all(index: int, stream: trio.SocketStream) -> None:
        sock = _scratch.scratch_socket(stream)
        assert sock is not None
        while len(received[index]) < size:
            view = await _scratch.read_into_scratch(sock, 4 * KiB)
            received[index] += view  # used before the next checkpoint

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index, (_, reader) in enumerate(pairs):
                nursery.start_soon(read_all, index, reader)
            for index, (writer, _) in enumerate(pairs):
                nursery.start_soon(writer.send_all, bytes([index]) * size)
    for index, data in enumerate(received):
        assert data == bytes([index]) * size
    for writer, reader in pairs:
        await writer.aclose()
        await reader.aclose()


async def test_buffer_is_the_largest_read_size_asked_for() -> None:
    """The buffer's bound: it is as large as the largest read asked for, no
    larger, however many reads and connections use it."""
    writer, reader = socket_stream_pair()
    sock = _scratch.scratch_socket(reader)
    assert sock is not None
    before = _scratch.scratch_size()
    for _ in range(20):
        await writer.send_all(b"x" * 100)
        assert bytes(await _scratch.read_into_scratch(sock, 1 * KiB)) == b"x" * 100
    assert _scratch.scratch_size() == max(before, 1 * KiB)
    larger = max(before, 1 * KiB) + 4 * KiB
    await writer.send_all(b"y")
    assert bytes(await _scratch.read_into_scratch(sock, larger)) == b"y"
    assert _scratch.scratch_size() == larger
    await writer.aclose()
    assert bytes(await _scratch.read_into_scratch(sock, 1 * KiB)) == b""  # EOF
    await reader.aclose()


async def test_a_cancelled_read_takes_nothing() -> None:
    """A read cancelled while it waits consumes no bytes: the next read gets
    everything the peer sent."""
    writer, reader = socket_stream_pair()
    sock = _scratch.scratch_socket(reader)
    assert sock is not None
    with trio.move_on_after(0) as waiting:
        await _scratch.read_into_scratch(sock, KiB)
    assert waiting.cancelled_caught
    await writer.send_all(b"hello")
    assert bytes(await _scratch.read_into_scratch(sock, KiB)) == b"hello"
    await writer.aclose()
    await reader.aclose()


async def test_only_plain_sockets_read_through_the_scratch_buffer() -> None:
    """TLS or in-memory streams keep ``receive_some``; an endpoint on a plain
    socket reads through the scratch buffer and h11 still gets the bytes."""
    memory_stream, _ = trio.testing.memory_stream_pair()
    assert _scratch.scratch_socket(memory_stream) is None
    writer, reader = socket_stream_pair()
    assert _scratch.scratch_socket(reader) is reader.socket
    endpoint = UpstreamEndpoint(reader, read_size=KiB, max_head_size=64 * KiB)
    await endpoint.send_head(
        h11.Request(method="GET", target="/", headers=[("Host", "x")]), end=True
    )
    await writer.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    event = await endpoint.next_event()
    assert isinstance(event, h11.Response)
    data = await endpoint.next_event()
    assert isinstance(data, h11.Data)
    assert bytes(data.data) == b"ok"
    await writer.aclose()
    await reader.aclose()


async def test_without_readv_every_stream_keeps_receive_some(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where os.readv does not exist (Windows), no stream reads through the
    scratch buffer."""
    writer, reader = socket_stream_pair()
    monkeypatch.setattr(_scratch, "READV_AVAILABLE", False)
    assert _scratch.scratch_socket(reader) is None
    writer.socket.close()
    reader.socket.close()
