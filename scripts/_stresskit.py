# Shared pieces of the stress scripts: the verifiable payload, pacing, address parsing.
#
# Why a payload pattern: the stress suite moves gigabytes through a proxy and must
# prove every byte arrived intact without keeping a copy. The payload is a fixed
# 64 KiB block repeated, so the byte at offset i is PATTERN[i % 64 KiB]. The origin
# serves it from memoryviews of one preallocated buffer (no per-request work), and a
# client verifies a stream chunk by chunk with a memcmp against the same block (no
# hashing, no buffering). Uploads are checked the same way, or by SHA-256 against
# expected_sha256(n).
#
# Why a token bucket: a "slow client" must be slow at the socket, so the proxy sees
# a full receive window and has to stop reading. The Pacer sleeps after each read
# until the reader is back under its rate, with a small burst allowance so that
# pacing costs a few hundred wake-ups per second, not thousands.
#
# This module has no I/O of its own apart from trio.sleep; it is imported by
# origin.py, naive_relay.py and stress.py (which run with scripts/ on sys.path).
# Sizes are parsed and printed by trioproxy._units, with the proxy's own rule
# (64k = 65536, 64kB = 64000); before issue #10 this module read 64k as 64000.

from __future__ import annotations

import functools
import hashlib
import re

import trio

PATTERN_SIZE = 64 * 1024
"""Period of the payload. 64 KiB: big enough that a memcmp per chunk is cheap, small
enough to build at import time in well under a millisecond."""


def _make_pattern() -> bytes:
    # SHA-256 of a counter: looks random (so a proxy that corrupts, reorders or
    # duplicates 32-byte runs is caught) yet is the same in every process.
    blocks = (hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(PATTERN_SIZE // 32))
    return b"".join(blocks)


PATTERN = _make_pattern()
_PATTERN_TWICE = PATTERN + PATTERN  # any window of <= PATTERN_SIZE bytes is one slice

SEND_BLOCK = PATTERN * 4
"""256 KiB (four whole periods) handed to send_all per call: each slice of it starts at
a multiple of the period, so the origin never computes an offset. 256 KiB keeps the
syscall count low (4096 calls per GiB) without a big buffer."""


def payload(offset: int, size: int) -> bytes:
    """Return the `size` payload bytes starting at stream offset `offset`.

    Used by tests and by uploaders of odd sizes; the hot paths slice SEND_BLOCK.
    """
    out = bytearray()
    while len(out) < size:
        start = (offset + len(out)) % PATTERN_SIZE
        take = min(size - len(out), PATTERN_SIZE)
        out += _PATTERN_TWICE[start : start + take]
    return bytes(out)


@functools.cache
def expected_sha256(n: int) -> str:
    """Hex SHA-256 of the first n payload bytes (cached: clients share one N)."""
    digest = hashlib.sha256()
    full, rest = divmod(n, len(SEND_BLOCK))
    for _ in range(full):
        digest.update(SEND_BLOCK)
    digest.update(SEND_BLOCK[:rest])
    return digest.hexdigest()


class PatternVerifier:
    """Check a byte stream against the payload, chunk by chunk, without storing it.

    Attributes:
        offset: bytes seen so far.
        first_mismatch: stream offset of the first 64 KiB-or-smaller window that
            differed, or None while everything matched.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.first_mismatch: int | None = None

    @property
    def ok(self) -> bool:
        return self.first_mismatch is None

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Verify the next chunk of the stream. Returns whether it matched."""
        # bytes slices compare by memcmp; memoryview == memoryview is ~30x slower.
        chunk = data if isinstance(data, bytes) else bytes(data)
        matched = True
        pos = 0
        while pos < len(chunk):
            start = self.offset % PATTERN_SIZE
            take = min(len(chunk) - pos, PATTERN_SIZE)
            if chunk[pos : pos + take] != _PATTERN_TWICE[start : start + take]:
                matched = False
                if self.first_mismatch is None:
                    self.first_mismatch = self.offset
            pos += take
            self.offset += take
        return matched


class Pacer:
    """Token bucket: `await pacer.consume(n)` after moving n bytes keeps the average
    at `rate` bytes/s, allowing at most `burst` bytes ahead of schedule.

    A rate of None (or <= 0) means unpaced: consume() is only a checkpoint.
    """

    def __init__(self, rate: float | None, burst: int) -> None:
        self.rate = rate if rate and rate > 0 else None
        self.burst = burst
        self._tokens = float(burst)
        self._last = trio.current_time()

    async def consume(self, n: int) -> None:
        if self.rate is None:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            # The next call credits the time slept, which pays this deficit back.
            await trio.sleep(-self._tokens / self.rate)
        else:
            await trio.lowlevel.checkpoint()


def parse_host_port(text: str) -> tuple[str, int]:
    """Split 'HOST:PORT' (as given to --listen); the port may be 0."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_http_url(url: str) -> tuple[str, int]:
    """Split 'http://HOST:PORT[/]' (or https://) into host and port."""
    match = re.fullmatch(r"https?://([^/:]+):(\d+)/?", url.strip())
    if match is None:
        raise ValueError(f"expected http://HOST:PORT, got {url!r}")
    return match.group(1), int(match.group(2))
