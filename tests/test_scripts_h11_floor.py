"""Tests for scripts/h11_floor.py, the minimal trio + h11 relay bench.py measures
trioproxy against.

A yardstick is only worth something if it does the whole job it stands for: its
CLI announces its address, it relays both framings in both directions byte for
byte, and it keeps the client connection alive (a floor that closed after each
response would pay a TCP connect per request and measure something else). One
subprocess against an in-process origin on 127.0.0.1 port 0; no timing asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h11
import psutil
import pytest
import trio

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# scripts/ is not a package: its modules import each other as top-level modules.
sys.path.insert(0, str(SCRIPTS))

import origin  # noqa: E402
from _stresskit import expected_sha256, payload  # noqa: E402

from tests.helpers import read_h11_message, send_h11_message  # noqa: E402

RUN_LIMIT = 60  # seconds: a bound on each step, not a performance claim
ANNOUNCE = b"floor listening on http://127.0.0.1:"


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            break
        line += chunk
    return line


async def exchange(
    stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request and its whole response on `conn`, left ready for the next."""
    await send_h11_message(stream, conn, request, body)
    response, data = await read_h11_message(stream, conn)
    assert isinstance(response, h11.Response)
    assert conn.our_state is h11.DONE
    assert conn.their_state is h11.DONE, "the floor closed the client connection"
    conn.start_next_cycle()
    return response.status_code, dict(response.headers), data


@pytest.mark.parametrize("workers", [1, 2])
async def test_floor_relays_both_framings_on_one_keep_alive_connection(
    nursery: trio.Nursery, workers: int
) -> None:
    """`h11_floor.py` prints 'floor listening on URL' (with ``--workers 2``,
    once both processes listen); through it, on ONE client connection: a
    chunked response arrives whole and chunked, a chunked upload and a
    Content-Length upload reach the origin byte for byte. Stopped with
    SIGTERM, it leaves no process behind."""
    listeners = await nursery.start(origin.serve_origin, "127.0.0.1", 0)
    origin_port = listeners[0].socket.getsockname()[1]
    argv = [sys.executable, str(SCRIPTS / "h11_floor.py"), "--listen", "127.0.0.1:0"]
    argv += ["--upstream", f"http://127.0.0.1:{origin_port}", "--workers", str(workers)]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        with trio.fail_after(RUN_LIMIT):
            line = await read_line(process.stderr)
        assert line.startswith(ANNOUNCE), line
        port = int(line.decode().rsplit(":", 1)[1])
        upload = payload(0, 200_001)
        host = ("Host", f"127.0.0.1:{port}")
        with trio.fail_after(RUN_LIMIT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                get = h11.Request(method="GET", target="/chunked/300001", headers=[host])
                status, headers, body = await exchange(stream, conn, get)
                assert (status, headers[b"transfer-encoding"]) == (200, b"chunked")
                assert body == payload(0, 300_001)
                for framing in (("Transfer-Encoding", "chunked"), ("Content-Length", "200001")):
                    post = h11.Request(method="POST", target="/upload", headers=[host, framing])
                    status, _, answer = await exchange(stream, conn, post, upload)
                    assert status == 200
                    assert json.loads(answer) == {
                        "bytes": 200_001,
                        "sha256": expected_sha256(200_001),
                        "pattern_ok": True,
                    }
        children = psutil.Process(process.pid).children()
        assert len(children) == (workers if workers > 1 else 0)
    finally:
        process.terminate()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()
    _, alive = psutil.wait_procs(children, timeout=RUN_LIMIT)
    assert alive == []
