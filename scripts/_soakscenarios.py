# The soak's scenarios: what its clients do, each with the one outcome it allows.
#
# A scenario is planned first (plan_*(setup, rng) -> Plan: its name, its sizes
# and rates drawn from the lane's seeded random.Random, and how long it should
# take), then run. The soak bounds each run by a generous multiple of that time,
# so a hang is a failure and not a stuck soak. Running raises Unexpected (from
# _soakhttp) when the outcome is not the expected one.
#
# Kinds (issue 15, "What to build"):
#   download      1 KiB..size cap, Content-Length / chunked / close-delimited,
#                 at full speed or read at 100 kB/s..20 MB/s: verified body
#   largest       one download of --max-size at full speed: verified body
#   upload        Content-Length or chunked, sometimes Expect: 100-continue, to
#                 an origin reading at full speed or slowly (down to what moves
#                 within the stall timeout, see slowest_upload_read): the origin's count
#                 and pattern check (and SHA-256 for small ones) match
#   keepalive     2..8 small requests on one connection: GET (both framings),
#                 HEAD, 204, 304, POST, POST with Expect: each as expected, and
#                 the connection stays open
#   upgrade       101 Switching Protocols, then bytes echoed both ways with a
#                 half-close: every byte back, in order
#   connect       (forward) a CONNECT tunnel to the origin, and inside it an
#                 upgrade echo or a download: verified
#   leave         read part of a body, then close (FIN or RST): prefix verified
#   stall-short   stop reading for a quarter of --stall-timeout: whole body
#   stall-long    stop reading for twice --stall-timeout: visibly cut body
#   slowloris     a head sent byte by byte, too slowly: 408, or closed unanswered
#   smuggle       request-smuggling shapes (a hidden GET /smuggled in a body):
#                 the status each must get (400; 200 for the plain control)
#   fuzz          mutated requests from tests/test_fuzz.py's pools: only
#                 well-formed responses, never a 418 or a 500
#   refused       (forward) a port nothing listens on: 502
#   origin-close, origin-reset   the origin hangs up before answering: 502
#   origin-cut    resets mid-body, short Content-Length, a lying chunk size:
#                 visibly cut (or 502 if the fault beat the head)
#   origin-long   a body longer than its Content-Length: exactly the declared
#                 bytes, and the next request on the connection still right
#   stall-head    no response head within --upstream-timeout: 504
#   stall-body    the origin goes silent mid-body: visibly cut (or 504)

from __future__ import annotations

import functools
import itertools
import json
import math
import random
import re
from collections.abc import Awaitable, Callable
from types import ModuleType

import attrs
import h11
import trio
from _soakhttp import (
    SLOW_RCVBUF,
    Exchange,
    HttpClient,
    Reply,
    Unexpected,
    abort,
    expect_body,
    expect_cut,
    expect_status,
    open_client,
    read_reply,
)
from _stresskit import PATTERN_SIZE, SEND_BLOCK, Pacer, PatternVerifier, expected_sha256

KiB = 1024
MiB = 1024 * KiB

SIZE_CAP = 32 * MiB
"""Largest size drawn at random for a download or an upload (--max-size may set a
lower one); only the one 'largest' download goes up to --max-size."""
SLOW_RATES = (100e3, 20e6)
"""Range of a paced client's reading rate or the origin's upload reading rate
(issue 15: 100 kB/s to 20 MB/s), drawn log-uniformly."""
PACED_SECONDS = 8.0
"""A paced transfer is cut down to what its rate moves in this time, so that one
exchange never occupies a lane for minutes."""
FULL_SPEED = 20e6
"""Bytes/s assumed for a transfer at full speed when bounding its time: far below
what loopback and the proxy do, so a loaded machine stays within the bound."""
SHA_CHECK_LIMIT = 1 * MiB
"""Uploads up to this size are also checked by SHA-256 (cached per size); larger
ones by the origin's byte-by-byte pattern check alone, which is as exact."""
NEVER_READ = 256 * MiB
"""Declared size of a body a client stops reading: large against every buffer
on the way (proxy budget, socket buffers, pipes), so a stall must show."""
SLOWLORIS_INTERVAL = 0.2
"""Seconds between the bytes of a slowloris head."""
ORIGIN_RCVBUF = 128 * KiB
"""The origin's receive buffer while it reads an upload slowly: small enough that
the proxy meets backpressure after a few hundred KiB, and above two loopback MSS
(~64 KiB each). origin.py's default of 16 KiB is below one: then TCP's
silly-window avoidance lets a few KiB through per delayed ACK or window probe,
and on a pooled upstream connection that slowness outlives the upload (found by
the soak: uploads hung for minutes, bytes trickling, no stall timeout fired)."""
LINGER_SECONDS = 2.0
"""The proxy's lingering close after an error response (trioproxy._server)."""


@attrs.frozen
class Setup:
    """Where everything is and what the proxy was told: all a scenario needs."""

    mode: str  # "forward" or "reverse"
    proxy: tuple[str, int]
    origin: tuple[str, int]
    refused_port: int  # a bound port nothing listens on
    stall_timeout: float
    header_timeout: float
    upstream_timeout: float
    max_size: int

    @property
    def authority(self) -> str:
        return f"{self.origin[0]}:{self.origin[1]}"

    @property
    def size_cap(self) -> int:
        return min(SIZE_CAP, self.max_size)

    def target(self, path: str) -> str:
        """``path`` as the request target: absolute-form in forward mode."""
        return f"http://{self.authority}{path}" if self.mode == "forward" else path

    def headers(self, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        return [("Host", self.authority), *extra]

    def localize(self, request: bytes) -> bytes:
        """A fuzz request with its hosts made ours: the origin, or a port that
        refuses; never a name that would need DNS."""
        origin = self.authority.encode()
        for name in (b"example.com:8080", b"example.com:443", b"example.com", b"127.0.0.1:8080"):
            request = request.replace(name, origin)
        return request.replace(b"[::1]:80", b"[::1]:%d" % self.refused_port)


@attrs.frozen
class Plan:
    """One scenario run, planned: its kind, a detail for messages, the time it
    should need when all goes well, and the run itself."""

    kind: str
    detail: str
    seconds: float
    run: Callable[[Exchange], Awaitable[None]]


Planner = Callable[[Setup, random.Random], Plan]


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    """An integer between low and high, uniform in its logarithm."""
    if high <= low:
        return int(low)
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def _rate(rng: random.Random, low: float = SLOW_RATES[0]) -> float:
    return float(log_uniform(rng, max(low, SLOW_RATES[0]), SLOW_RATES[1]))


def slowest_upload_read(setup: Setup) -> float:
    """The slowest rate at which the origin may read an upload and still be
    sure to take bytes within the stall timeout: its receive buffer (doubled
    by the kernel) opens to the proxy in steps of up to that size, which must
    come at least four times per --stall-timeout. Slower, and a 504 "no byte
    moved" is the proxy doing as told, not a failure (a soak with a 2 s stall
    timeout saw it at 100 kB/s)."""
    return 4 * 2 * ORIGIN_RCVBUF / setup.stall_timeout


def _framing_path(framing: str, size: int) -> str:
    return f"/{framing}/{size}"


# ---------------------------------------------------------------- downloads


async def _download(
    setup: Setup,
    exchange: Exchange,
    path: str,
    *,
    rate: float | None = None,
    stop_after: int | None = None,
    pause: float = 0.0,
) -> tuple[trio.SocketStream, HttpClient, Reply]:
    """GET ``path``; read all (or ``stop_after`` bytes, then pause and read on).

    Returns the stream still open; the caller closes it.
    """
    slow = rate is not None or stop_after is not None
    stream = await open_client(setup.proxy, exchange, rcvbuf=SLOW_RCVBUF if slow else None)
    client = HttpClient(stream)
    await client.request(exchange, "GET", setup.target(path), setup.headers())
    pacer = Pacer(rate, burst=SLOW_RCVBUF) if rate else None
    reply = await read_reply(client, pacer=pacer, stop_after=stop_after)
    if pause and reply.status == 200 and not reply.complete and not reply.ended:
        await trio.sleep(pause)
        reply = await read_reply(client, reply=reply)
    return stream, client, reply


def plan_download(setup: Setup, rng: random.Random) -> Plan:
    framing = rng.choice(["bytes", "chunked", "close"])
    size = log_uniform(rng, KiB, setup.size_cap)
    rate = _rate(rng) if rng.random() < 0.5 else None
    if rate is not None:
        size = min(size, int(rate * PACED_SECONDS))

    async def run(exchange: Exchange) -> None:
        stream, _, reply = await _download(setup, exchange, _framing_path(framing, size), rate=rate)
        await stream.aclose()
        expect_body(reply, size)

    speed = f"{rate / 1e6:.2f} MB/s" if rate else "full speed"
    return Plan("download", f"{framing} {size} B at {speed}", size / (rate or FULL_SPEED), run)


def plan_largest(setup: Setup, rng: random.Random) -> Plan:
    size = setup.max_size

    async def run(exchange: Exchange) -> None:
        stream, _, reply = await _download(setup, exchange, f"/bytes/{size}")
        await stream.aclose()
        expect_body(reply, size)

    return Plan("largest", f"{size} B at full speed", size / FULL_SPEED, run)


LARGEST_UPLOAD = 200 * MiB
"""Issue 15's largest upload; one per run when --max-size allows."""


def plan_largest_upload(setup: Setup, rng: random.Random) -> Plan:
    size = min(LARGEST_UPLOAD, setup.max_size)

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            reply = await send_upload(
                client, exchange, setup, size, chunked=False, expect_continue=False
            )
        check_upload(reply, size)

    return Plan("largest", f"upload of {size} B at full speed", size / FULL_SPEED, run)


# ---------------------------------------------------------------- uploads


def check_upload(reply: Reply, size: int) -> None:
    """The origin's answer to an upload says it got ``size`` pattern bytes."""
    expect_status(reply, 200)
    try:
        result = json.loads(bytes(reply.body))
    except ValueError:
        raise Unexpected(f"upload answer is not JSON: {bytes(reply.body[:200])!r}") from None
    if result.get("bytes") != size or not result.get("pattern_ok"):
        raise Unexpected(f"origin got {result} for {size} pattern bytes", status=200)
    if size <= SHA_CHECK_LIMIT and result.get("sha256") != expected_sha256(size):
        raise Unexpected(f"origin's SHA-256 of {size} bytes differs", status=200)


async def send_upload(
    client: HttpClient,
    exchange: Exchange,
    setup: Setup,
    size: int,
    *,
    chunked: bool,
    expect_continue: bool,
    rate: float | None = None,
) -> Reply:
    """POST ``size`` pattern bytes to /upload; return the origin's answer."""
    path = "/upload" if rate is None else f"/upload?rate={int(rate)}&rcvbuf={ORIGIN_RCVBUF}"
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
    extra = [framing, *([("Expect", "100-continue")] if expect_continue else [])]
    await client.request(exchange, "POST", setup.target(path), setup.headers(*extra), end=False)
    if expect_continue:
        event = await client.next_event()
        if not isinstance(event, h11.InformationalResponse) or event.status_code != 100:
            raise Unexpected(f"expected 100 Continue, got {event!r}")
    await client.send_body(size)
    return await read_reply(client, verify=False)


def plan_upload(setup: Setup, rng: random.Random) -> Plan:
    size = log_uniform(rng, KiB, setup.size_cap)
    chunked = rng.random() < 0.5
    expect_continue = rng.random() < 0.3
    rate = _rate(rng, slowest_upload_read(setup)) if rng.random() < 0.4 else None
    if rate is not None:
        size = min(size, int(rate * PACED_SECONDS))

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            reply = await send_upload(
                client,
                exchange,
                setup,
                size,
                chunked=chunked,
                expect_continue=expect_continue,
                rate=rate,
            )
        check_upload(reply, size)

    detail = (
        f"{'chunked' if chunked else 'length'} {size} B"
        f"{' with Expect' if expect_continue else ''}"
        f", origin reads at {f'{rate / 1e6:.2f} MB/s' if rate else 'full speed'}"
    )
    return Plan("upload", detail, size / (rate or FULL_SPEED), run)


# ---------------------------------------------------------------- keep-alive

KEEPALIVE_STEPS = ("get", "chunked", "head", "204", "304", "post", "post-expect")


async def _keepalive_step(
    client: HttpClient, exchange: Exchange, setup: Setup, step: str, size: int
) -> None:
    if step in ("get", "chunked"):
        path = _framing_path("bytes" if step == "get" else "chunked", size)
        await client.request(exchange, "GET", setup.target(path), setup.headers())
        expect_body(await read_reply(client), size)
    elif step == "head":
        await client.request(exchange, "HEAD", setup.target(f"/bytes/{size}"), setup.headers())
        reply = await read_reply(client)
        expect_status(reply, 200)
        if reply.length or reply.headers.get(b"content-length") != str(size).encode():
            raise Unexpected(f"HEAD of {size} bytes: {reply.describe()}, {reply.headers}")
    elif step in ("204", "304"):
        await client.request(exchange, "GET", setup.target(f"/status/{step}"), setup.headers())
        reply = await read_reply(client)
        expect_status(reply, int(step))
        if reply.length:
            raise Unexpected(f"a {step} with a body: {reply.describe()}", status=reply.status)
    else:
        expect_continue = step == "post-expect"
        reply = await send_upload(
            client, exchange, setup, size, chunked=False, expect_continue=expect_continue
        )
        check_upload(reply, size)
    client.next_cycle()


def plan_keepalive(setup: Setup, rng: random.Random) -> Plan:
    steps = [
        (rng.choice(KEEPALIVE_STEPS), log_uniform(rng, 1, 16 * KiB))
        for _ in range(rng.randint(2, 8))
    ]

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            for step, size in steps:
                await _keepalive_step(client, exchange, setup, step, size)

    return Plan("keepalive", " ".join(step for step, _ in steps), len(steps) * 0.1, run)


# ---------------------------------------------------------------- tunnels


async def echo_both_ways(
    stream: trio.SocketStream, leftover: bytes, size: int, pieces: list[int]
) -> None:
    """Send ``size`` pattern bytes in ``pieces`` (cycled), then EOF; read the
    echo to EOF. Raises Unexpected unless every byte came back in order."""
    verifier = PatternVerifier()
    verifier.feed(leftover)
    view = memoryview(SEND_BLOCK)

    async def send() -> None:
        sent, index = 0, 0
        while sent < size:
            piece = min(size - sent, pieces[index % len(pieces)])
            start = sent % PATTERN_SIZE  # SEND_BLOCK holds whole periods from offset 0
            await stream.send_all(view[start : start + piece])
            sent, index = sent + piece, index + 1
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while data := await stream.receive_some(64 * KiB):
            verifier.feed(data)
    if verifier.offset != size or not verifier.ok:
        raise Unexpected(
            f"echo of {size} bytes: {verifier.offset} came back, "
            f"first mismatch at {verifier.first_mismatch}",
            lost=verifier.ok,
        )


def _echo_pieces(rng: random.Random) -> list[int]:
    return [rng.randint(1, 3 * PATTERN_SIZE) for _ in range(8)]


async def upgrade_and_echo(
    stream: trio.SocketStream,
    client: HttpClient,
    exchange: Exchange,
    target: str,
    headers: list[tuple[str, str]],
    size: int,
    pieces: list[int],
) -> None:
    """GET ``target`` asking for an Upgrade; expect 101, then echo."""
    upgrade = [("Connection", "upgrade"), ("Upgrade", "websocket")]
    await client.request(exchange, "GET", target, [*headers, *upgrade])
    reply = await read_reply(client, verify=False)
    expect_status(reply, 101)
    await echo_both_ways(stream, client.conn.trailing_data[0], size, pieces)


def plan_upgrade(setup: Setup, rng: random.Random) -> Plan:
    size = log_uniform(rng, 1, min(4 * MiB, setup.size_cap))
    pieces = _echo_pieces(rng)

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            target, headers = setup.target("/ws"), setup.headers()
            await upgrade_and_echo(stream, client, exchange, target, headers, size, pieces)

    return Plan("upgrade", f"echo {size} B", 2 * size / FULL_SPEED, run)


def plan_connect(setup: Setup, rng: random.Random) -> Plan:
    size = log_uniform(rng, 1, min(4 * MiB, setup.size_cap))
    inner = rng.choice(["echo", "download"])
    pieces = _echo_pieces(rng)

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            await client.request(exchange, "CONNECT", setup.authority, setup.headers())
            expect_status(await read_reply(client, verify=False), 200)
            if client.conn.trailing_data[0]:
                raise Unexpected(
                    f"bytes before the tunnel's first request: {client.conn.trailing_data}"
                )
            tunneled = HttpClient(stream)  # the origin itself, through the tunnel
            if inner == "echo":
                await upgrade_and_echo(
                    stream, tunneled, exchange, "/ws", setup.headers(), size, pieces
                )
            else:
                await tunneled.request(exchange, "GET", f"/bytes/{size}", setup.headers())
                expect_body(await read_reply(tunneled), size)

    return Plan("connect", f"{inner} {size} B", 2 * size / FULL_SPEED, run)


# ---------------------------------------------------------------- clients that misbehave


def plan_leave(setup: Setup, rng: random.Random) -> Plan:
    framing = rng.choice(["bytes", "chunked", "close"])
    keep = log_uniform(rng, 1, 4 * MiB)
    reset = rng.random() < 0.5

    async def run(exchange: Exchange) -> None:
        path = _framing_path(framing, NEVER_READ)
        stream, _, reply = await _download(setup, exchange, path, stop_after=keep)
        if reset:
            abort(stream)
        await trio.aclose_forcefully(stream)
        if reply.status != 200 or not reply.verified or reply.ended:
            raise Unexpected(
                f"expected {keep} pattern bytes of a 200; got {reply.describe()}",
                status=reply.status,
                lost=bool(reply.ended),
            )

    how = "RST" if reset else "FIN"
    return Plan("leave", f"{framing}, {how} after {keep} B", keep / FULL_SPEED, run)


def plan_stall_short(setup: Setup, rng: random.Random) -> Plan:
    framing = rng.choice(["bytes", "chunked", "close"])
    size = min(8 * MiB, setup.max_size)
    pause = setup.stall_timeout / 4

    async def run(exchange: Exchange) -> None:
        path = _framing_path(framing, size)
        stream, _, reply = await _download(setup, exchange, path, stop_after=size // 8, pause=pause)
        await stream.aclose()
        expect_body(reply, size)

    return Plan("stall-short", f"{framing} {size} B, {pause:g} s pause", pause, run)


def plan_stall_long(setup: Setup, rng: random.Random) -> Plan:
    framing = rng.choice(["bytes", "chunked", "close"])
    pause = 2 * setup.stall_timeout + 1

    async def run(exchange: Exchange) -> None:
        path = _framing_path(framing, NEVER_READ)
        stream, _, reply = await _download(setup, exchange, path, stop_after=64 * KiB, pause=pause)
        await stream.aclose()
        expect_cut(reply)

    return Plan("stall-long", f"{framing}, {pause:g} s pause", pause, run)


def plan_slowloris(setup: Setup, rng: random.Random) -> Plan:
    # Long enough that trickling it takes well past the header timeout.
    padding = "a" * int((setup.header_timeout + 5) / SLOWLORIS_INTERVAL)

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            exchange.request_sent()
            # h11 must believe the request was sent to parse the answer; the
            # bytes it made go out one at a time instead.
            request = h11.Request(
                method="GET",
                target=setup.target("/bytes/10"),
                headers=setup.headers(("X-Slow", padding)),
            )
            head = client.conn.send(request) + (client.conn.send(h11.EndOfMessage()) or b"")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_trickle, stream, head)
                reply = await read_reply(client, verify=False)
                nursery.cancel_scope.cancel()
        if reply.status is None or (reply.status == 408 and reply.complete):
            return
        raise Unexpected(f"expected 408 or a close; got {reply.describe()}", status=reply.status)

    return Plan("slowloris", f"{len(padding)} B of padding", setup.header_timeout, run)


async def _trickle(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data`` a byte at a time; stop quietly when the peer is gone."""
    for index in range(len(data)):
        try:
            await stream.send_all(data[index : index + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        await trio.sleep(SLOWLORIS_INTERVAL)


# Request smuggling: each hides "GET /smuggled" where a proxy that frames the
# body differently from the origin would pass it on as a request of its own
# (the origin counts those, and answers 418). What each must get from
# trioproxy: 400 for every ambiguous framing (its _framing guard), 200 for the
# plain control, whose hidden text is only body.
HIDDEN = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLING = {
    "CL.TE": (
        f"Content-Length: {5 + len(HIDDEN)}\r\nTransfer-Encoding: chunked",
        f"0\r\n\r\n{HIDDEN}",
        400,
    ),
    "TE.CL": (
        "Content-Length: 4\r\nTransfer-Encoding: chunked",
        f"{len(HIDDEN):x}\r\n{HIDDEN}\r\n0\r\n\r\n",
        400,
    ),
    "TE xchunked": ("Transfer-Encoding: xchunked", f"0\r\n\r\n{HIDDEN}", 400),
    "TE space-colon": ("Transfer-Encoding : chunked", f"0\r\n\r\n{HIDDEN}", 400),
    "TE vertical tab": ("Transfer-Encoding:\x0bchunked", f"0\r\n\r\n{HIDDEN}", 400),
    "TE chunked, identity": ("Transfer-Encoding: chunked, identity", f"0\r\n\r\n{HIDDEN}", 400),
    "TE quoted": ('Transfer-Encoding: "chunked"', f"0\r\n\r\n{HIDDEN}", 400),
    "TE twice": (
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        f"0\r\n\r\n{HIDDEN}",
        400,
    ),
    "TE folded": ("X-Pad: 1\r\n Transfer-Encoding: chunked", f"0\r\n\r\n{HIDDEN}", 400),
    "CL twice": (f"Content-Length: 0\r\nContent-Length: {len(HIDDEN)}", HIDDEN, 400),
    "CL list": (f"Content-Length: {len(HIDDEN)}, 0", HIDDEN, 400),
    "CL plus": (f"Content-Length: +{len(HIDDEN)}", HIDDEN, 400),
    "chunk size garbage": ("Transfer-Encoding: chunked", f"zz\r\n{HIDDEN}", 400),
    "chunk line bare LF": ("Transfer-Encoding: chunked", f"0;x\n\r\n{HIDDEN}", 400),
    "control": (f"Content-Length: {len(HIDDEN)}", HIDDEN, 200),
}


def plan_smuggle(setup: Setup, rng: random.Random) -> Plan:
    name = rng.choice(sorted(SMUGGLING))
    fields, body, status = SMUGGLING[name]

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            # Tell h11 a bodiless POST went out, so that it parses the answer.
            client.conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
            client.conn.send(h11.EndOfMessage())
            exchange.request_sent()
            head = f"POST {setup.target('/upload')} HTTP/1.1\r\nHost: {setup.authority}\r\n"
            await stream.send_all(f"{head}{fields}\r\n\r\n{body}".encode())
            reply = await read_reply(client, verify=False)
        expect_status(reply, status)

    return Plan("smuggle", name, 0.1, run)


@functools.cache
def fuzz_pools() -> ModuleType:
    """tests/test_fuzz.py, whose pools of methods, targets, fields and bodies
    the fuzz scenario draws from (imported on first use: it needs hypothesis)."""
    from tests import test_fuzz

    return test_fuzz


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def fuzz_input(setup: Setup, rng: random.Random) -> list[bytes]:
    """One to three requests from the fuzz pools, mutated after their request
    line (the line names the host a forward proxy connects to: left intact,
    so no mutation makes it look a name up), cut into pieces."""
    pools = fuzz_pools()
    requests = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            request = rng.choice(pools.VALID_REQUESTS)
        else:
            words = [
                rng.choice(pools.METHODS),
                rng.choice(pools.TARGETS),
                rng.choice(pools.VERSIONS),
            ]
            fields = [rng.choice(pools.FIELDS) for _ in range(rng.randint(0, 6))]
            if rng.random() < 0.5:
                fields.insert(0, b"Host: example.com")
            request = b"\r\n".join([b" ".join(words), *fields]) + b"\r\n\r\n"
            request += rng.choice(pools.BODIES)
        line, separator, rest = setup.localize(request).partition(b"\r\n")
        requests.append(line + separator + _mutate(rest, rng))
    data = b"".join(requests)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    mutable = bytearray(data)
    for _ in range(rng.randint(0, 4)):
        position = rng.randint(0, len(mutable))
        byte = rng.choice(b"\x00\n\r \t\x0b:,\x7f\xff")
        operation = rng.choice(["flip", "insert", "delete"])
        if operation == "insert":
            mutable[position:position] = bytes([byte])
        elif position < len(mutable):
            if operation == "flip":
                mutable[position] = byte
            else:
                del mutable[position]
    return bytes(mutable)


def plan_fuzz(setup: Setup, rng: random.Random) -> Plan:
    pieces = fuzz_input(setup, rng)

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        received = bytearray()
        async with stream:
            exchange.request_sent()
            try:
                for piece in pieces:
                    await stream.send_all(piece)
                    await trio.sleep(0.001)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the proxy answered and closed before the rest: fine
            try:
                while data := await stream.receive_some(64 * KiB):
                    received += data
            except trio.BrokenResourceError:
                pass  # a reset after the answer: what came is still checked
        statuses = {int(status) for status in _STATUS_LINE.findall(received)}
        if not fuzz_pools().responses_well_formed(bytes(received)) or statuses & {418, 500}:
            raise Unexpected(f"for {b''.join(pieces)!r}: got {bytes(received[:600])!r}")

    timeouts = setup.header_timeout + setup.upstream_timeout + setup.stall_timeout
    return Plan("fuzz", repr(b"".join(pieces)[:80]), timeouts + LINGER_SECONDS, run)


# ---------------------------------------------------------------- origin faults


def _expect_status_plan(setup: Setup, kind: str, target: str, status: int, seconds: float) -> Plan:
    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange)
        async with stream:
            client = HttpClient(stream)
            await client.request(exchange, "GET", target, setup.headers())
            reply = await read_reply(client, verify=False)
        expect_status(reply, status)

    return Plan(kind, target, seconds, run)


def plan_refused(setup: Setup, rng: random.Random) -> Plan:
    target = f"http://127.0.0.1:{setup.refused_port}/bytes/10"
    return _expect_status_plan(setup, "refused", target, 502, 0.1)


def plan_origin_close(setup: Setup, rng: random.Random) -> Plan:
    return _expect_status_plan(setup, "origin-close", setup.target("/fault/close"), 502, 0.1)


def plan_origin_reset(setup: Setup, rng: random.Random) -> Plan:
    return _expect_status_plan(setup, "origin-reset", setup.target("/fault/reset"), 502, 0.1)


def plan_stall_head(setup: Setup, rng: random.Random) -> Plan:
    target = setup.target("/fault/stall-head")
    return _expect_status_plan(setup, "stall-head", target, 504, setup.upstream_timeout)


def plan_origin_cut(setup: Setup, rng: random.Random) -> Plan:
    size = log_uniform(rng, 64 * KiB, 4 * MiB)
    fault = rng.choice(
        [f"reset-mid/{size}?framing={framing}" for framing in ("length", "chunked", "close")]
        + [f"short/{size}", f"chunk-lie/{size}"]
    )

    async def run(exchange: Exchange) -> None:
        stream, _, reply = await _download(setup, exchange, f"/fault/{fault}")
        await stream.aclose()
        expect_cut(reply, 502)

    return Plan("origin-cut", fault, size / FULL_SPEED, run)


def plan_origin_long(setup: Setup, rng: random.Random) -> Plan:
    size = log_uniform(rng, 1, MiB)
    after = log_uniform(rng, 1, 64 * KiB)

    async def run(exchange: Exchange) -> None:
        stream, client, reply = await _download(setup, exchange, f"/fault/long/{size}")
        async with stream:
            expect_body(reply, size)
            client.next_cycle()
            await client.request(exchange, "GET", setup.target(f"/bytes/{after}"), setup.headers())
            expect_body(await read_reply(client), after)

    return Plan("origin-long", f"{size} B, then {after} B", size / FULL_SPEED, run)


def plan_stall_body(setup: Setup, rng: random.Random) -> Plan:
    async def run(exchange: Exchange) -> None:
        stream, _, reply = await _download(setup, exchange, f"/fault/stall-body/{MiB}")
        await stream.aclose()
        expect_cut(reply, 504)

    return Plan("stall-body", f"{MiB} B, silent after a quarter", setup.stall_timeout, run)


# ---------------------------------------------------------------- the mix


@attrs.frozen
class Kind:
    """A scenario kind: how often it is picked, and in which modes it runs."""

    planner: Planner
    weight: int
    modes: tuple[str, ...] = ("forward", "reverse")


KINDS: dict[str, Kind] = {
    "download": Kind(plan_download, 30),
    "upload": Kind(plan_upload, 12),
    "keepalive": Kind(plan_keepalive, 12),
    "upgrade": Kind(plan_upgrade, 5),
    "connect": Kind(plan_connect, 5, ("forward",)),
    "leave": Kind(plan_leave, 5),
    "stall-short": Kind(plan_stall_short, 3),
    "stall-long": Kind(plan_stall_long, 2),
    "slowloris": Kind(plan_slowloris, 2),
    "smuggle": Kind(plan_smuggle, 4),
    "fuzz": Kind(plan_fuzz, 4),
    "refused": Kind(plan_refused, 2, ("forward",)),
    "origin-close": Kind(plan_origin_close, 2),
    "origin-reset": Kind(plan_origin_reset, 2),
    "origin-cut": Kind(plan_origin_cut, 4),
    "origin-long": Kind(plan_origin_long, 3),
    "stall-head": Kind(plan_stall_head, 2),
    "stall-body": Kind(plan_stall_body, 2),
}
"""Every kind the mix draws from ('largest' runs once, outside the mix)."""


def kinds_for(mode: str) -> list[str]:
    return [name for name, kind in KINDS.items() if mode in kind.modes]
