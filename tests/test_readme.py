"""The README's embedding example runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
import trio
import trio.testing

from .helpers import serve_origin

README = Path(__file__).resolve().parent.parent / "README.md"


def load_example() -> ModuleType:
    """Take the python block after the embedding marker and import it as a module."""
    text = README.read_text()
    match = re.search(r"<!-- embedding-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match is not None, "the README lost its embedding example"
    module = ModuleType("readme_example")
    exec(compile(match.group(1), str(README), "exec"), module.__dict__)
    return module


async def answer(request: h11.Request, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, [], b"from origin: " + request.target


async def test_copy_stream_relays_everything_with_its_bound() -> None:
    """The example's copy_stream moves every byte between in-memory streams."""
    example: Any = load_example()
    writer, source = trio.testing.memory_stream_pair()
    sink, reader = trio.testing.memory_stream_pair()
    await writer.send_all(b"z" * 1_000_000)
    await writer.aclose()
    assert await example.copy_stream(source, sink) == 1_000_000
    received = bytearray()
    while len(received) < 1_000_000:
        received += await reader.receive_some()
    assert received == b"z" * 1_000_000


async def test_serve_reverse_proxy_serves_requests() -> None:
    """The example's own accept loop with handle_connection proxies a request."""
    example: Any = load_example()
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, answer)
        port = await nursery.start(
            example.serve_reverse_proxy, f"http://127.0.0.1:{origin_port}", 0
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /hi?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(b"from origin: /hi?x=1")
        nursery.cancel_scope.cancel()


def test_copy_mode_of_the_example_as_a_program(tmp_path: Path) -> None:
    """Run as a program, the example copies stdin to stdout byte-exact."""
    text = README.read_text()
    match = re.search(r"<!-- embedding-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match is not None
    program = tmp_path / "example.py"
    program.write_text(match.group(1))
    data = bytes(range(256)) * 4000
    result = subprocess.run(
        [sys.executable, str(program), "copy"],
        input=data,
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == data
    assert b"1024000 bytes" in result.stderr
