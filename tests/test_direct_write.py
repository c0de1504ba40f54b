"""Writes on plain sockets (``H11Endpoint.send_framed``): one writev at once,
send_all for the rest, one yield after, and trio's errors as before (issue #14)."""

from __future__ import annotations

import socket

import h11
import pytest
import trio

from trioproxy._config import KiB
from trioproxy._endpoint import ClientEndpoint, UpstreamEndpoint
from trioproxy._errors import BadGateway, ClientGone


class TaskSteps(trio.abc.Instrument):
    """Counts how often trio resumes one task: a yield is one more step."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


GET = h11.Request(method="GET", target="/", headers=[("Host", "origin.test")])


def endpoint_pair() -> tuple[socket.socket, UpstreamEndpoint]:
    """A plain socket for the test's peer and an upstream endpoint on the other end."""
    ours, theirs = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    return ours, UpstreamEndpoint(stream, read_size=64 * KiB, max_head_size=64 * KiB)


def read_available(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except BlockingIOError:
        pass
    return data


async def test_a_write_the_socket_takes_yields_once() -> None:
    """Head, body and end go out in one writev, then the task yields exactly
    once, as send_all does: that schedule point keeps the connections fair."""
    ours, upstream = endpoint_pair()
    post = h11.Request(method="POST", target="/", headers=[("Host", "o"), ("Content-Length", "2")])
    counter = TaskSteps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        await upstream.send_head(post, body=b"hi", end=True)
    finally:
        trio.lowlevel.remove_instrument(counter)
    assert counter.steps == 1
    assert read_available(ours).endswith(b"\r\n\r\nhi")
    ours.close()
    await upstream.stream.aclose()


async def test_what_the_socket_cannot_take_follows_through_send_all() -> None:
    """A body larger than the socket's buffers arrives whole and in order:
    the part writev could not write waits for the reader."""
    ours, upstream = endpoint_pair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
    body = bytes(range(256)) * 4096  # 1 MiB, far over the socket buffers
    head = h11.Request(
        method="POST", target="/", headers=[("Host", "o"), ("Content-Length", str(len(body)))]
    )
    received = bytearray()

    async def reader() -> None:
        ours.setblocking(False)
        sock = trio.socket.from_stdlib_socket(ours)
        while len(received) < len(body) or b"\r\n\r\n" not in received:
            received.extend(await sock.recv(64 * KiB))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await upstream.send_head(head)
            nursery.start_soon(reader)
            await upstream.send_data(body)
            await upstream.finish()
    assert bytes(received).partition(b"\r\n\r\n")[2] == body
    ours.close()
    await upstream.stream.aclose()


async def test_a_broken_connection_is_the_error_it_was() -> None:
    """A peer that left: 502 from an upstream, ClientGone from a client, both
    carrying trio's BrokenResourceError as before; h11 sends no more."""
    ours, upstream = endpoint_pair()
    ours.close()
    with pytest.raises(BadGateway, match="BrokenResourceError") as raised:
        await upstream.send_head(GET, end=True)
    assert isinstance(raised.value.__cause__, trio.BrokenResourceError)
    assert "socket connection broken" in str(raised.value.__cause__)
    with pytest.raises(h11.LocalProtocolError):
        await upstream.finish()
    await upstream.stream.aclose()

    ours, theirs = socket.socketpair()
    client = ClientEndpoint(
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
        read_size=KiB,
        max_head_size=KiB,
    )
    ours.close()
    with pytest.raises(ClientGone, match="BrokenResourceError"):
        await client.send_framed(b"HTTP/1.1 200 OK\r\n\r\n")
    await client.stream.aclose()


async def test_a_closed_socket_is_a_closed_resource() -> None:
    """Writing after our own side closed raises trio's ClosedResourceError,
    translated like any stream error."""
    ours, upstream = endpoint_pair()
    await upstream.stream.aclose()
    with pytest.raises(BadGateway, match="ClosedResourceError") as raised:
        await upstream.send_head(GET, end=True)
    assert isinstance(raised.value.__cause__, trio.ClosedResourceError)
    ours.close()


async def test_a_cancelled_write_writes_nothing() -> None:
    """In a cancelled scope nothing goes out, and the connection sends no
    more HTTP (its framing on the wire is unknown to its peer's eyes)."""
    ours, upstream = endpoint_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await upstream.send_head(GET, end=True)
    assert scope.cancelled_caught
    assert read_available(ours) == b""
    with pytest.raises(h11.LocalProtocolError):
        await upstream.send_head(GET, end=True)
    ours.close()
    await upstream.stream.aclose()
