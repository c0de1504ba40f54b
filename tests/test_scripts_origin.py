"""Tests for the stress suite's origin and naive relay (scripts/).

The stress figures are only worth something if the origin serves exactly the
payload it promises and the relay under comparison relays it byte for byte, so
these check both with an independent HTTP client (the stdlib's http.client, run
in a thread) on 127.0.0.1 port 0, with small bodies and no timing assertions.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import sys
from pathlib import Path

import trio

# scripts/ is not a package: its modules import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import naive_relay
import origin
from _stresskit import PatternVerifier, expected_sha256, payload

Reply = tuple[int, dict[str, str], bytes]


def _request(
    port: int, method: str, path: str, body: bytes | None = None, repeat: int = 1
) -> list[Reply]:
    """Send `repeat` identical requests on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        replies = []
        for _ in range(repeat):
            conn.request(method, path, body=body)
            response = conn.getresponse()
            data = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            replies.append((response.status, headers, data))
        return replies
    finally:
        conn.close()


async def fetch(port: int, method: str, path: str, body: bytes | None = None) -> Reply:
    (reply,) = await trio.to_thread.run_sync(_request, port, method, path, body)
    return reply


async def start_origin(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(origin.serve_origin, "127.0.0.1", 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def start_relay(nursery: trio.Nursery, upstream_port: int) -> int:
    upstream = ("127.0.0.1", upstream_port)
    listeners = await nursery.start(naive_relay.serve_naive_relay, upstream, "127.0.0.1", 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def test_payload_helpers_agree() -> None:
    """expected_sha256, payload() and the verifier describe the same byte stream,
    and the verifier reports the offset of the first corrupted window."""
    n = 3 * 65536 + 123
    data = payload(0, n)
    assert hashlib.sha256(data).hexdigest() == expected_sha256(n)
    assert payload(70000, 10) == data[70000:70010]
    verifier = PatternVerifier()
    assert verifier.feed(data[:1000])
    assert verifier.feed(data[1000:])
    assert verifier.ok
    assert verifier.offset == n
    corrupt = bytearray(data)
    corrupt[140000] ^= 0xFF
    verifier = PatternVerifier()
    verifier.feed(bytes(corrupt))
    assert verifier.first_mismatch == 131072  # start of the window holding the flip


async def test_origin_serves_content_length_payload(nursery: trio.Nursery) -> None:
    """/bytes/N: status 200, Content-Length N, and exactly the first N payload bytes."""
    port = await start_origin(nursery)
    status, headers, body = await fetch(port, "GET", "/bytes/300001")
    assert status == 200
    assert headers["content-length"] == "300001"
    assert hashlib.sha256(body).hexdigest() == expected_sha256(300001)


async def test_origin_serves_chunked_payload(nursery: trio.Nursery) -> None:
    """/chunked/N: the same bytes, framed with Transfer-Encoding: chunked."""
    port = await start_origin(nursery)
    status, headers, body = await fetch(port, "GET", "/chunked/300001")
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert body == payload(0, 300001)


async def test_origin_keep_alive_and_errors(nursery: trio.Nursery) -> None:
    """Several requests share one connection; unknown paths get 404, bad sizes 400."""
    port = await start_origin(nursery)
    replies = await trio.to_thread.run_sync(_request, port, "GET", "/small", None, 3)
    assert [(status, len(body)) for status, _, body in replies] == [(200, 1024)] * 3
    assert (await fetch(port, "GET", "/nope"))[0] == 404
    assert (await fetch(port, "GET", "/bytes/lots"))[0] == 400


async def test_origin_reads_uploads(nursery: trio.Nursery) -> None:
    """/upload answers with the byte count and SHA-256 of what it read, and says
    whether the body was the payload pattern; ?rate= (slow reading) changes
    nothing in the answer."""
    port = await start_origin(nursery)
    body = payload(0, 200_000)
    for path in ("/upload", "/upload?rate=20MB"):
        status, _, answer = await fetch(port, "POST", path, body)
        assert status == 200
        assert json.loads(answer) == {
            "bytes": 200_000,
            "sha256": hashlib.sha256(body).hexdigest(),
            "pattern_ok": True,
        }
    status, _, answer = await fetch(port, "PUT", "/upload", b"not the pattern")
    assert json.loads(answer)["pattern_ok"] is False


async def test_naive_relay_is_byte_exact(nursery: trio.Nursery) -> None:
    """Through the naive relay: downloads (both framings) and uploads arrive
    byte for byte, and the client connection is kept alive between requests."""
    relay_port = await start_relay(nursery, await start_origin(nursery))
    status, headers, body = await fetch(relay_port, "GET", "/bytes/250000")
    assert (status, headers["content-length"]) == (200, "250000")
    assert body == payload(0, 250000)
    status, headers, body = await fetch(relay_port, "GET", "/chunked/250000")
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert body == payload(0, 250000)
    status, _, answer = await fetch(relay_port, "POST", "/upload", payload(0, 150_000))
    assert json.loads(answer)["sha256"] == expected_sha256(150_000)
    replies = await trio.to_thread.run_sync(_request, relay_port, "GET", "/small", None, 2)
    assert [body for _, _, body in replies] == [payload(0, 1024)] * 2


async def test_naive_relay_answers_502_without_upstream(nursery: trio.Nursery) -> None:
    """An unreachable upstream becomes a 502 for the client, not a hang."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    dead_port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    relay_port = await start_relay(nursery, dead_port)
    assert (await fetch(relay_port, "GET", "/small"))[0] == 502
