"""The exchange's decisions, as plain functions: no streams are read or written.

Keep-alive, pooling, retry and the body path are decided from values
(``MessageState`` snapshots, a request head, stream types), so each rule is
checked here on its own, synchronously.
"""

from __future__ import annotations

import ssl

import attrs
import h11
import pytest
import trio.testing

import trioproxy
from trioproxy._body import BYPASS_MIN_BODY, BYPASS_MIN_BODY_FROM_TLS
from trioproxy._config import KiB, MiB
from trioproxy._endpoint import MessageState, UpstreamEndpoint
from trioproxy._exchange import (
    choose_body_path,
    client_head,
    may_keep_alive,
    may_pool,
    may_retry,
)
from trioproxy._pool import PooledUpstream
from trioproxy._splice import splice_supported
from trioproxy._tls import BoundedTLSStream

from .helpers import socket_stream_pair

DONE = MessageState(both_done=True, body_bypassed=False, unparsed=False)


def test_keep_alive_only_when_both_messages_ended() -> None:
    """A connection carries another request only when h11 saw both messages end."""
    assert may_keep_alive(DONE)
    assert not may_keep_alive(MessageState(both_done=False, body_bypassed=False, unparsed=False))


@pytest.mark.parametrize(
    ("state", "reusable"),
    [
        (DONE, True),
        (MessageState(both_done=False, body_bypassed=False, unparsed=False), False),
        (MessageState(both_done=True, body_bypassed=True, unparsed=False), False),
        (MessageState(both_done=True, body_bypassed=False, unparsed=True), False),
    ],
)
def test_pool_only_a_clean_connection(state: MessageState, reusable: bool) -> None:
    """Pooled only when both messages ended, nothing went by splice, and
    nothing was received past the response."""
    assert may_pool(state) is reusable


def test_retry_only_idempotent_bodiless_requests_on_reused_connections() -> None:
    """The retry rule: reused, GET/HEAD/OPTIONS, no body, no response byte."""
    stream, _ = trio.testing.memory_stream_pair()
    endpoint = UpstreamEndpoint(stream, read_size=1024, max_head_size=1024)
    upstream = PooledUpstream(endpoint, "h", 1)
    get = h11.Request(method="GET", target="/", headers=[("Host", "a")])
    post = h11.Request(method="POST", target="/", headers=[("Host", "a")])
    assert not may_retry(upstream, get, has_body=False)  # a new connection
    upstream.reused = True
    assert may_retry(upstream, get, has_body=False)
    assert not may_retry(upstream, get, has_body=True)
    assert not may_retry(upstream, post, has_body=False)
    endpoint.bytes_received += 1  # a byte of the response came
    assert not may_retry(upstream, get, has_body=False)


async def test_body_path_pumps_unless_both_ends_are_plain_sockets() -> None:
    """In-memory (or TLS) streams, unknown lengths and small bodies take the pump."""
    config = trioproxy.ProxyConfig()
    a, b = trio.testing.memory_stream_pair()
    assert not choose_body_path(config, a, b, 100 * MiB).spliced
    left, right = socket_stream_pair()
    try:
        assert not choose_body_path(config, left, right, None).spliced  # chunked, close-delimited
        assert not choose_body_path(config, left, right, 1024).spliced  # too small to pay
    finally:
        await left.aclose()
        await right.aclose()


@pytest.mark.skipif(not splice_supported(), reason="splice(2) is Linux-only")
async def test_body_path_splices_a_large_body_between_sockets_unless_turned_off() -> None:
    """Two plain sockets and a large Content-Length body: splice, with the
    per-direction bound as the pipe; --no-splice turns it off."""
    left, right = socket_stream_pair()
    try:
        path = choose_body_path(trioproxy.ProxyConfig(), left, right, 100 * MiB)
        assert path.spliced
        assert path.pipe_size is not None
        assert path.pipe_size <= 384 * 1024
        unspliced = trioproxy.ProxyConfig(splice=False)
        assert not choose_body_path(unspliced, left, right, 100 * MiB).spliced
    finally:
        await left.aclose()
        await right.aclose()


@pytest.mark.skipif(not splice_supported(), reason="splice(2) is Linux-only")
async def test_a_tls_leg_always_takes_the_pump() -> None:
    """TLS over a plain socket, on either side or both, never splices, for
    the same large body that two plain sockets splice (checked first, so
    the test would see a TLS leg taken for a socket)."""
    config = trioproxy.ProxyConfig()
    left, right = socket_stream_pair()
    context = ssl.create_default_context()
    tls_left = BoundedTLSStream(left, context, server_hostname="left.test")
    tls_right = BoundedTLSStream(right, context, server_hostname="right.test")
    try:
        assert choose_body_path(config, left, right, 100 * MiB).spliced
        for source, sink in [(tls_left, right), (left, tls_right), (tls_left, tls_right)]:
            path = choose_body_path(config, source, sink, 100 * MiB)
            assert not path.spliced
            assert path.bypass  # the pump, past h11
    finally:
        await left.aclose()
        await right.aclose()


async def test_a_large_body_that_cannot_splice_goes_past_h11() -> None:
    """A Content-Length body that does not splice (in-memory streams here, a
    TLS leg above, --no-splice) takes the pump past h11 from 4 MiB, or from a
    plain socket from 1 MiB, and the source's connection ends with it
    (``past_h11``); smaller bodies and other framings go through h11."""
    config = trioproxy.ProxyConfig()
    a, b = trio.testing.memory_stream_pair()
    large = choose_body_path(config, a, b, BYPASS_MIN_BODY_FROM_TLS)
    assert large.bypass
    assert large.past_h11
    assert not large.spliced
    for length in (BYPASS_MIN_BODY_FROM_TLS - 1, None):
        path = choose_body_path(config, a, b, length)
        assert not path.bypass
        assert not path.past_h11
    if splice_supported():
        left, right = socket_stream_pair()
        try:
            spliced = choose_body_path(config, left, right, 100 * MiB)
            assert spliced.past_h11
            assert not spliced.bypass
            unspliced = attrs.evolve(config, splice=False)
            path = choose_body_path(unspliced, left, right, BYPASS_MIN_BODY)
            assert path.bypass
            assert not path.spliced
            assert not choose_body_path(unspliced, left, right, BYPASS_MIN_BODY - 1).bypass
        finally:
            await left.aclose()
            await right.aclose()


def test_client_head_adds_close_only_when_asked() -> None:
    """The response head drops hop-by-hop fields; ``close`` adds Connection: close."""
    response = h11.Response(
        status_code=200, headers=[("Content-Length", "2"), ("Keep-Alive", "timeout=5")]
    )
    names = [name for name, _ in client_head(response).headers.raw_items()]
    assert b"keep-alive" not in [n.lower() for n in names]
    closing = client_head(response, close=True).headers.raw_items()
    assert (b"Connection", b"close") in closing


async def test_a_body_past_h11_reads_larger_chunks_within_the_same_bound() -> None:
    """Past h11 the pump reads chunks of a third of the per-direction bound
    (one channel slot), unless the source returns less per read (a
    ``BoundedTLSStream`` keeps ``read_size``): then as many slots as the pump
    through h11 has. Either way the pump's bound is the per-direction one."""
    config = trioproxy.ProxyConfig()
    assert config.bypass_chunk_size == 128 * KiB
    a, b = trio.testing.memory_stream_pair()
    path = choose_body_path(config, a, b, 100 * MiB)
    assert (path.chunk_size, path.buffer_chunks) == (128 * KiB, 1)
    left, right = socket_stream_pair()
    bounded = BoundedTLSStream(left, ssl.create_default_context(), max_read=config.read_size)
    try:
        path = choose_body_path(config, bounded, right, 100 * MiB)
        assert (path.chunk_size, path.buffer_chunks) == (config.read_size, config.buffer_chunks)
    finally:
        await left.aclose()
        await right.aclose()
    for settings in [{}, {"read_size": 4096, "buffer_chunks": 3}, {"buffer_chunks": 9}]:
        config = trioproxy.ProxyConfig(**settings)  # type: ignore[arg-type]
        path = choose_body_path(config, a, b, 100 * MiB)
        assert path.chunk_size >= config.read_size
        assert (path.buffer_chunks + 2) * path.chunk_size <= config.max_buffered_per_direction


def test_the_bypass_chunk_leaves_the_budget_room_for_the_next_one() -> None:
    """A budget smaller than two bypass chunks shrinks them (a further
    reservation must fit beside the one held), never below read_size."""
    tight = trioproxy.ProxyConfig(max_buffer_memory=160 * KiB)
    assert tight.bypass_chunk_size == 80 * KiB
    tightest = trioproxy.ProxyConfig(max_buffer_memory=64 * KiB)
    assert tightest.bypass_chunk_size == tightest.read_size
