"""Request smuggling and head limits: every ambiguous head is refused, never forwarded.

Unit tests drive ``RequestHeadGuard`` directly; the table-driven tests send
raw bytes through an in-memory proxy connection and check both the status
and what reached the recording origin.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import trioproxy
from trioproxy._errors import BadRequest, HeadersTooLarge, ProxyError, URITooLong
from trioproxy._framing import (
    REQUEST_LINE_SLACK,
    HeadLimits,
    RequestHeadGuard,
    check_request_head,
)

from .raw_exchange import raw_exchange

LIMITS = HeadLimits(max_head_size=4096, max_header_fields=10, max_target_length=256)
LINE = b"POST http://example.com/ HTTP/1.1\r\n"
HOST = b"Host: example.com\r\n"


def head(*fields: bytes, line: bytes = LINE, host: bool = True) -> bytes:
    return line + (HOST if host else b"") + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


# One row per attack on the head: (id, raw request, expected status).
HEAD_ATTACKS = [
    ("cl-and-te", head(b"Content-Length: 4", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"),
    ("te-and-cl", head(b"Transfer-Encoding: chunked", b"Content-Length: 4") + b"0\r\n\r\n"),
    ("cl-duplicate-same", head(b"Content-Length: 5", b"Content-Length: 5") + b"hello"),
    ("cl-duplicate-differing", head(b"Content-Length: 5", b"Content-Length: 6") + b"hello!"),
    ("cl-list", head(b"Content-Length: 5, 5") + b"hello"),
    ("cl-hex", head(b"Content-Length: 0x5") + b"hello"),
    ("cl-plus", head(b"Content-Length: +5") + b"hello"),
    ("cl-negative", head(b"Content-Length: -1")),
    ("cl-decimal-point", head(b"Content-Length: 5.0") + b"hello"),
    ("cl-empty", head(b"Content-Length:")),
    ("cl-inner-space", head(b"Content-Length: 5 5") + b"hello"),
    ("te-xchunked", head(b"Transfer-Encoding: xchunked") + b"0\r\n\r\n"),
    ("te-chunked-identity", head(b"Transfer-Encoding: chunked, identity") + b"0\r\n\r\n"),
    ("te-identity-chunked", head(b"Transfer-Encoding: identity, chunked") + b"0\r\n\r\n"),
    ("te-quoted", head(b'Transfer-Encoding: "chunked"') + b"0\r\n\r\n"),
    ("te-vertical-tab", head(b"Transfer-Encoding:\x0bchunked") + b"0\r\n\r\n"),
    ("te-form-feed", head(b"Transfer-Encoding: chunked\x0c") + b"0\r\n\r\n"),
    ("te-leading-space-name", head(b" Transfer-Encoding: chunked", host=True) + b"0\r\n\r\n"),
    ("te-space-before-colon", head(b"Transfer-Encoding : chunked") + b"0\r\n\r\n"),
    ("te-obs-fold", head(b"Transfer-Encoding:\r\n chunked") + b"0\r\n\r\n"),
    ("te-twice", head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")),
    ("te-in-http10", head(b"Transfer-Encoding: chunked", line=LINE.replace(b"1.1", b"1.0"))),
    ("te-nul", head(b"Transfer-Encoding: chunked\x00") + b"0\r\n\r\n"),
    ("bare-lf-line-ends", LINE[:-2] + b"\n" + HOST[:-2] + b"\n\n"),
    ("bare-lf-in-field", head(b"X-A: a\nTransfer-Encoding: chunked") + b"0\r\n\r\n"),
    ("bare-lf-end-of-head", LINE + HOST + b"\n"),
    ("bare-cr-in-value", head(b"X-A: a\rb")),
    ("bare-cr-in-line", b"POST http://example.com/\r HTTP/1.1\r\n" + HOST + b"\r\n"),
    ("bare-cr-before-crlf", head(b"X-A: a\r")),
    ("obs-fold", head(b"X-A: a", b" b")),
    ("obs-fold-tab", head(b"X-A: a", b"\tb")),
    ("control-in-value", head(b"X-A: a\x01b")),
    ("del-in-value", head(b"X-A: a\x7fb")),
    ("escape-in-value", head(b"X-A: \x1b[31m")),
    ("control-in-name", head(b"X\x01A: b")),
    ("empty-name", head(b": b")),
    ("no-colon", head(b"X-A b")),
    ("host-twice", head(b"Host: evil.example")),
    ("host-missing-http11", head(host=False)),
    ("leading-empty-line", b"\r\n" + head()),
    ("request-line-extra-space", head(line=b"POST  http://example.com/ HTTP/1.1\r\n")),
    ("request-line-tab", head(line=b"POST\thttp://example.com/ HTTP/1.1\r\n")),
    (
        "smuggled-get-cl-te",
        head(b"Content-Length: 44", b"Transfer-Encoding: chunked")
        + b"0\r\n\r\nGET http://example.com/admin HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ),
]

# Attacks in the chunked body: found while streaming, after the head went upstream.
BODY_ATTACKS = [
    ("chunk-size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-too-long", b"1" * 21 + b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-empty", b"\r\nhello\r\n0\r\n\r\n"),
    ("chunk-data-without-crlf", b"5\r\nhelloXX0\r\n\r\n"),
    ("chunk-data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("chunk-longer-than-size", b"3\r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize(
    ("raw"), [row[1] for row in HEAD_ATTACKS], ids=[r[0] for r in HEAD_ATTACKS]
)
async def test_ambiguous_head_is_refused_and_not_forwarded(
    raw: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """Each ambiguous head gets 400 with Connection: close, and no upstream connection."""
    result = await raw_exchange(raw)
    assert result.status == 400, result.response
    assert result.headers[b"connection"] == b"close"
    assert result.upstream.connects == []
    assert result.forwarded_nothing


@pytest.mark.parametrize(
    ("body"), [row[1] for row in BODY_ATTACKS], ids=[r[0] for r in BODY_ATTACKS]
)
async def test_bad_chunked_body_is_refused_and_never_completed(
    body: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """A malformed chunked body gets 400; the origin never sees a complete request.

    The head is valid, so it has gone upstream before the body is read (the
    proxy streams); the upstream message is left unfinished and closed.
    """
    result = await raw_exchange(head(b"Transfer-Encoding: chunked") + body)
    assert result.status == 400, result.response
    assert result.headers[b"connection"] == b"close"
    assert result.complete_requests == 0
    assert all(len(origin.requests) <= 1 for origin in result.origins)


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (head(b"Content-Length: 5") + b"hello", b"hello"),
        (head(b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (head(b"Transfer-Encoding: Chunked") + b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"hello"),
        (head(b"Transfer-Encoding:\tchunked\t") + b"0\r\n\r\n", b""),
        (head(b"X-Obs-Text: caf\xc3\xa9", line=LINE.replace(b"POST", b"GET")), b""),
        (head(line=LINE.replace(b"1.1", b"1.0"), host=False), b""),
    ],
    ids=["content-length", "chunked", "chunked-case-ext", "te-tabs", "obs-text", "http10-no-host"],
)
async def test_unambiguous_requests_still_pass(
    raw: bytes, body: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """Control rows: valid framing is forwarded once and answered 200 (the table can fail)."""
    result = await raw_exchange(raw)
    assert result.status == 200, result.response
    assert result.complete_requests == 1
    assert body in bytes(result.origins[0].raw)


async def test_pipelined_smuggle_after_valid_request_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bad head pipelined behind a good one is checked too: 200, then 400, once forwarded."""
    good = head(b"Content-Length: 0")
    bad = head(b"Content-Length: 3", b"Transfer-Encoding: chunked") + b"0\r\n\r\n"
    result = await raw_exchange(good + bad)
    assert result.status == 200
    assert b"400 Bad Request" in result.response
    assert result.complete_requests == 1
    assert len(result.upstream.connects) == 1


# --- Head limits -------------------------------------------------------------


async def test_head_larger_than_max_head_size_gets_431(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A head over max_head_size gets 431 and nothing is forwarded."""
    config = trioproxy.ProxyConfig(max_head_size=4096)
    result = await raw_exchange(head(b"X-Big: " + b"a" * 5000), config)
    assert result.status == 431
    assert result.forwarded_nothing


async def test_head_size_limit_fires_while_the_head_is_still_arriving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An endless head gets 431 once it passes the limit, not when it ends (it never does)."""
    config = trioproxy.ProxyConfig(max_head_size=4096)
    pieces = [LINE + HOST] + [b"X-Filler: " + b"a" * 990 + b"\r\n"] * 8
    result = await raw_exchange(pieces, config)
    assert result.status == 431
    assert result.forwarded_nothing


@pytest.mark.parametrize(("fields", "status"), [(100, 200), (101, 431)])
async def test_header_field_count_limit(
    fields: int, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """max_header_fields (default 100, Host included) passes; one more gets 431."""
    extra = [b"X-F%d: v" % index for index in range(fields - 1)]
    result = await raw_exchange(head(*extra, line=LINE.replace(b"POST", b"GET")))
    assert result.status == status
    assert result.forwarded_nothing is (status != 200)


@pytest.mark.parametrize(("length", "status"), [(8192, 200), (8193, 414)])
async def test_target_length_limit(
    length: int, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A target of max_target_length (default 8 KiB) passes; one byte more gets 414."""
    prefix = b"http://example.com/"
    target = prefix + b"a" * (length - len(prefix))
    result = await raw_exchange(head(line=b"GET " + target + b" HTTP/1.1\r\n"))
    assert result.status == status
    assert result.forwarded_nothing is (status != 200)


async def test_target_longer_than_head_limit_gets_414_not_431(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 100 KiB target (over the 64 KiB head limit) gets 414, not 431: its check comes first."""
    target = b"http://example.com/" + b"a" * 100 * 1024
    pieces = [target[i : i + 4096] for i in range(0, len(target), 4096)]
    result = await raw_exchange([b"GET ", *pieces, b" HTTP/1.1\r\n", HOST, b"\r\n"])
    assert result.status == 414
    assert result.forwarded_nothing


# --- RequestHeadGuard, directly -------------------------------------------------


def feed_all(guard: RequestHeadGuard, pieces: list[bytes], held: list[int] | None = None) -> None:
    """Feed every piece; record the bytes held after each; raise if the head is unfinished."""
    for piece in pieces:
        guard.feed(piece)
        if held is not None:
            held.append(guard.buffered_bytes)
    if not guard.done:
        raise BadRequest("unfinished")


def test_guard_accepts_a_valid_head_byte_by_byte_and_stops_at_its_end() -> None:
    """Fed one byte at a time, a valid head completes exactly at its empty line."""
    raw = head(b"Content-Length: 5")
    guard = RequestHeadGuard(LIMITS)
    for index in range(len(raw)):
        assert not guard.done
        guard.feed(raw[index : index + 1])
    assert guard.done
    guard.feed(b"\x00garbage after the head is body, not ours\n\n")
    assert guard.done


@pytest.mark.parametrize("raw", [row[1] for row in HEAD_ATTACKS], ids=[r[0] for r in HEAD_ATTACKS])
def test_guard_refuses_each_attack_however_it_is_split(raw: bytes) -> None:
    """The verdict does not depend on how the bytes are cut (whole, or byte by byte)."""
    with pytest.raises(BadRequest):
        check_request_head(raw, LIMITS)
    with pytest.raises(BadRequest):
        feed_all(RequestHeadGuard(LIMITS), [bytes([byte]) for byte in raw])


def test_guard_memory_is_bounded_by_the_head_limit() -> None:
    """An endless field line is refused once it passes max_head_size; the guard holds no more."""
    guard = RequestHeadGuard(LIMITS)
    guard.feed(LINE)
    held: list[int] = []
    with pytest.raises(HeadersTooLarge):
        feed_all(guard, [b"a" * 100] * 10_000, held)
    assert max(held) <= LIMITS.max_head_size
    assert guard.buffered_bytes <= LIMITS.max_head_size + 100


def test_guard_request_line_limit_fires_before_the_line_ends() -> None:
    """An unfinished request line gets 414 once it passes max_target_length plus the slack."""
    guard = RequestHeadGuard(LIMITS)
    guard.feed(b"GET ")
    with pytest.raises(URITooLong):
        feed_all(guard, [b"a"] * (LIMITS.max_target_length + REQUEST_LINE_SLACK))
    assert guard.buffered_bytes == LIMITS.max_target_length + REQUEST_LINE_SLACK + 1


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (head(*[b"X: y"] * 9), None),
        (head(*[b"X: y"] * 10), HeadersTooLarge),
        (head(line=b"GET http://e/" + b"a" * 247 + b" HTTP/1.1\r\n"), None),
        (head(line=b"GET http://e/" + b"a" * 248 + b" HTTP/1.1\r\n"), URITooLong),
        (head(line=b"GET http://e/ HTTP/1.1"), BadRequest),
        (head(line=b"GET http://e/ HTTP/1.1 \r\n"), BadRequest),
        (head(line=b"G(T http://e/ HTTP/1.1\r\n"), BadRequest),
        (head(line=b"GET http://e/\x7f HTTP/1.1\r\n"), BadRequest),
        (head(line=b"GET http://e/ HTTP/11\r\n"), BadRequest),
    ],
)
def test_guard_limits_and_request_line(raw: bytes, error: type[ProxyError] | None) -> None:
    """Field count and target length limits are exact; the request line grammar is strict."""
    if error is None:
        check_request_head(raw, LIMITS)
    else:
        with pytest.raises(error):
            check_request_head(raw, LIMITS)


def test_unfinished_head_is_reported() -> None:
    """check_request_head refuses a head without its empty line."""
    with pytest.raises(BadRequest, match="unfinished"):
        check_request_head(LINE + HOST, LIMITS)


# --- The shortcut for a whole plain head ----------------------------------------

SMALL_LIMITS = HeadLimits(max_head_size=160, max_header_fields=3, max_target_length=24)
# Each list: the well-formed choices first, then the flaws the line checks look for.
REQUEST_LINES = (
    [b"GET / HTTP/1.1", b"POST http://e.com/a?b HTTP/1.0", b"GET /caf\xc3\xa9 HTTP/1.1"],
    [
        *(b"GET /a\x01 HTTP/1.1", b"GET /a\x7f HTTP/1.1", b"GET  / HTTP/1.1", b"G\tT / HTTP/1.1"),
        *(b"GET /\ta HTTP/1.1", b"GET / HTTP/1.1 x", b"GET / HTTP/11", b"GET / http/1.1"),
        *(b"G:T / HTTP/1.1", b"", b"GET /" + b"a" * 30 + b" HTTP/1.1"),
    ],
)
NAMES = (
    [b"Host", b"host", b"Content-Length", b"CONTENT-LENGTH", b"Transfer-Encoding", b"X-A"],
    [b" X-A", b"X A", b"", b"X\x01", b"X\x7f", b"X-Host", b"Hostx"],  # last two: no flaw
)
VALUES = (
    [b"e.com", b" 5 ", b"5", b"05", b"chunked", b"\tChunked ", b"\xc3\xa9", b"", b"a" * 40],
    [b"5, 5", b"chunked, x", b"a\x01", b"a\x7f", b"a\rb", b"a\nb", b"a\x0bb", b"a\x00"],
)
COLONS = ([b":", b": "], [b"", b" :"])
ENDS = ([b"\r\n"], [b"\n", b"\r", b""])


def pick(draw: st.DrawFn, choices: tuple[list[bytes], list[bytes]]) -> bytes:
    """A well-formed choice three times in four, else any."""
    good, flawed = choices
    return draw(st.sampled_from(good if draw(st.integers(0, 3)) else good + flawed))


@st.composite
def raw_heads(draw: st.DrawFn) -> bytes:
    """Heads that are mostly well-formed, with the flaws the line checks look for."""
    raw = pick(draw, REQUEST_LINES) + pick(draw, ENDS)
    for _ in range(draw(st.integers(0, 5))):
        raw += pick(draw, NAMES) + pick(draw, COLONS) + pick(draw, VALUES) + pick(draw, ENDS)
    return raw + pick(draw, ENDS) + draw(st.sampled_from([b"", b"body\r\n\r\n"]))


def verdict(pieces: list[bytes]) -> tuple[object, ...]:
    """What a fresh guard says after ``pieces``: done and bytes held, or the error."""
    guard = RequestHeadGuard(SMALL_LIMITS)
    try:
        for piece in pieces:
            guard.feed(piece)
    except ProxyError as error:
        return (type(error), str(error))
    return (guard.done, guard.buffered_bytes)


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(raw_heads())
def test_whole_head_shortcut_gives_the_line_checks_verdict(raw: bytes) -> None:
    """A head fed whole (the shortcut may take it) gets the same verdict and
    message as the same head fed in two pieces (only the line checks run)."""
    assert verdict([raw]) == verdict([raw[:1], raw[1:]])


def test_a_plain_head_is_accepted_whole_by_the_shortcut() -> None:
    """The usual curl head passes the shortcut alone (it is not dead code),
    and ambiguous framing in a plain head is still refused there."""
    raw = head(line=b"GET /1k HTTP/1.1\r\n") + b"next"
    guard = RequestHeadGuard(LIMITS)
    assert guard._plain_head(raw)
    assert guard.done
    ambiguous = head(b"Content-Length: 4", b"Transfer-Encoding: chunked")
    with pytest.raises(BadRequest, match="Content-Length together with Transfer-Encoding"):
        RequestHeadGuard(LIMITS)._plain_head(ambiguous)
    assert not RequestHeadGuard(LIMITS)._plain_head(head(b"X-A: a", b" b"))  # obs-fold
