"""One connection's failure never disturbs another, nor the server.

A large download is held open (its client pauses reading, so the transfer is
mid-body and backpressured) while other connections fail in every way the
proxy knows; then the download resumes and must complete byte-exact, and the
server must still serve a fresh request.
"""

from __future__ import annotations

import hashlib

import h11
import trio
import trio.testing

import trioproxy

from .helpers import start_proxy
from .streaming_origin import OriginLog, expected_sha256, serve_streaming_origin

SIZE = 50 * 1024 * 1024


async def exchange(port: int, raw: bytes, *, read_all: bool = True) -> bytes:
    """Send raw bytes on a new connection; return what came back until close."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        received = bytearray()
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
                if not read_all:
                    break
        except trio.BrokenResourceError:
            pass
        return bytes(received)


async def closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def timed_out_exchange(
    port: int, raw: bytes, log: OriginLog, clock: trio.testing.MockClock, seconds: float
) -> bytes:
    """``exchange`` a request for the origin's /hang; once the origin holds
    it, jump the clock by ``seconds`` (the proxy's head timeout)."""
    answer: list[bytes] = []
    answered = trio.Event()

    async def run() -> None:
        answer.append(await exchange(port, raw))
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await log.hanging.wait()
        await trio.testing.wait_all_tasks_blocked()  # the proxy waits for the head
        clock.jump(seconds)
        with trio.fail_after(30):  # a bound on a hang: the answer is due now
            await answered.wait()
    return answer[0]


async def test_failures_elsewhere_leave_a_running_download_intact(
    mock_clock: trio.testing.MockClock,
) -> None:
    """400, 431, 502 (refused and unresolvable), 504, an upstream dying
    mid-body and a client leaving mid-body, all while a download is paused
    mid-body: the download then completes byte-exact and serving goes on."""
    # Real sockets, so the clock runs at real speed; the proxy's timeouts are
    # its defaults (60 s for a response head, 120 s of stall), which no step
    # reaches by itself on however loaded a machine. The 504 comes when the
    # test jumps the clock past the head timeout, which stays within the
    # paused download's stall timeout.
    mock_clock.rate = 1
    log = OriginLog()
    config = trioproxy.ProxyConfig()
    assert config.upstream_timeout < config.stall_timeout
    async with trio.open_nursery() as nursery:
        origin = await nursery.start(serve_streaming_origin, log)
        port = await start_proxy(nursery, config)

        download = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=f"http://127.0.0.1:{origin}/bytes/{SIZE}", headers=[("Host", "o")]
        )
        await download.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        digest = hashlib.sha256()
        received = 0
        while received < 1_000_000:  # well into the body, then pause
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await download.receive_some(65536))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                received += len(event.data)

        def get(target: str) -> bytes:
            return f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()

        answers = {
            "malformed": await exchange(port, b"GARBAGE\x00\r\n\r\n"),
            "too large": await exchange(
                port, b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 300_000 + b"\r\n\r\n"
            ),
            "refused": await exchange(port, get(f"http://127.0.0.1:{await closed_port()}/")),
            "unresolvable": await exchange(port, get(f"http://{'b' * 64}.invalid/")),
            "timeout": await timed_out_exchange(
                port,
                get(f"http://127.0.0.1:{origin}/hang"),
                log,
                mock_clock,
                config.upstream_timeout,
            ),
            "dies": await exchange(port, get(f"http://127.0.0.1:{origin}/die/5000000/2000000")),
            "leaves": await exchange(
                port, get(f"http://127.0.0.1:{origin}/bytes/1000000000"), read_all=False
            ),
        }
        assert answers["malformed"].startswith(b"HTTP/1.1 400 ")
        assert answers["too large"].startswith(b"HTTP/1.1 431 ")
        assert answers["refused"].startswith(b"HTTP/1.1 502 ")
        assert answers["unresolvable"].startswith(b"HTTP/1.1 502 ")
        assert answers["timeout"].startswith(b"HTTP/1.1 504 ")
        head, _, body = answers["dies"].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert len(body) < 5_000_000  # cut short, and the connection closed
        assert answers["leaves"].startswith(b"HTTP/1.1 200 ")

        while True:  # resume the paused download
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await download.receive_some(65536))
            elif isinstance(event, h11.Data):
                digest.update(event.data)
                received += len(event.data)
            else:
                break
        assert isinstance(event, h11.EndOfMessage)
        assert received == SIZE
        assert digest.hexdigest() == expected_sha256(SIZE)
        await download.aclose()

        after = await exchange(port, get(f"http://127.0.0.1:{origin}/bytes/10"))
        assert after.startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()
