"""The CPU ceiling h11 alone puts on a proxy's small requests, on this machine.

A proxy on h11 does, for every request, one server cycle (parse the client's
request, write the response) and one client cycle (write the request to the
upstream, parse its response). This script times exactly that work with no
I/O, no trio and no trioproxy, so the figure is what any trio + h11 proxy pays
before it reads or writes a single byte:

* server cycle: ``receive_data`` a typical GET head (curl-like), its
  ``Request`` and ``EndOfMessage``; then ``send`` a 1 KiB response (head with
  the fields the proxy passes on, the body, the end); ``start_next_cycle``.
* client cycle: ``send`` the GET as a reverse proxy forwards it (Host, Via,
  X-Forwarded-*), its end; ``receive_data`` an nginx-like 1 KiB response and
  take its ``Response``, ``Data`` and ``EndOfMessage``; ``start_next_cycle``.

Both build their events from plain header lists, as the proxy must (h11 then
validates every field: that is part of the price). One connection per side is
reused, as with keep-alive. The implied ceiling is ``1e6 / (server + client)``
requests per second per core: a proxy process that did nothing but h11 would
reach it, and a real one (sockets, the event loop, timeouts, policy, logging)
stays below it. It explains why the issue 5 targets (6,000 req/s on one
connection, 17,500 with two workers) are out of reach with h11 on a machine
where this ceiling is lower.

CPU time is ``time.process_time``; each side runs ``--rounds`` rounds of
``--iterations`` cycles and reports the fastest round (the one least disturbed
by other work on the machine). Bounded: with the defaults, a few seconds.

    python scripts/h11_ceiling.py
    python scripts/h11_ceiling.py --iterations 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from importlib.metadata import version

import h11

BODY = b"x" * 1024
"""The response body: 1 KiB, the small response of issue 5's benchmark."""

REQUEST_BYTES = (
    b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)
"""What a client sends: a curl-like GET."""

UPSTREAM_REQUEST_FIELDS = [
    (b"Host", b"127.0.0.1:18080"),
    (b"User-Agent", b"curl/7.88.1"),
    (b"Accept", b"*/*"),
    (b"Via", b"1.1 trioproxy"),
    (b"X-Forwarded-For", b"127.0.0.1"),
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"127.0.0.1:8080"),
]
"""The request as a reverse proxy forwards it (see trioproxy._http)."""

RESPONSE_FIELDS = [
    (b"Server", b"nginx/1.22.1"),
    (b"Date", b"Wed, 25 Nov 2026 21:44:54 GMT"),
    (b"Content-Type", b"text/plain"),
    (b"Content-Length", b"1024"),
    (b"Last-Modified", b"Wed, 25 Nov 2026 21:36:38 GMT"),
    (b"Connection", b"keep-alive"),
    (b"ETag", b'"6b0754e6-400"'),
    (b"Accept-Ranges", b"bytes"),
]
"""An nginx response head for a 1 KiB static file."""

CLIENT_RESPONSE_FIELDS = [
    *(field for field in RESPONSE_FIELDS if field[0] != b"Connection"),
    (b"Via", b"1.1 trioproxy"),
]
"""The same response as the proxy passes it on (hop-by-hop dropped, Via added)."""

RESPONSE_BYTES = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(name + b": " + value + b"\r\n" for name, value in RESPONSE_FIELDS)
    + b"\r\n"
    + BODY
)
"""What the upstream sends back."""


def server_cycle(conn: h11.Connection) -> None:
    """Parse one request and write its 1 KiB response, as a proxy's client side."""
    conn.receive_data(REQUEST_BYTES)
    _expect(conn.next_event(), h11.Request)
    _expect(conn.next_event(), h11.EndOfMessage)
    response = h11.Response(status_code=200, headers=CLIENT_RESPONSE_FIELDS, reason=b"OK")
    out = conn.send(response) or b""
    out += conn.send(h11.Data(data=BODY)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    conn.start_next_cycle()


def client_cycle(conn: h11.Connection) -> None:
    """Write one request and parse its 1 KiB response, as a proxy's upstream side."""
    request = h11.Request(method=b"GET", target=b"/1k", headers=UPSTREAM_REQUEST_FIELDS)
    out = conn.send(request) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    conn.receive_data(RESPONSE_BYTES)
    _expect(conn.next_event(), h11.Response)
    _expect(conn.next_event(), h11.Data)
    _expect(conn.next_event(), h11.EndOfMessage)
    conn.start_next_cycle()


def _expect(event: object, kind: type[h11.Event]) -> None:
    """Fail loudly if h11 did not parse what the cycle is meant to time."""
    if not isinstance(event, kind):
        raise RuntimeError(f"expected {kind.__name__}, h11 gave {event!r}")


def best_microseconds(
    cycle: Callable[[h11.Connection], None],
    role: type[h11.CLIENT] | type[h11.SERVER],
    *,
    iterations: int,
    rounds: int,
) -> float:
    """CPU microseconds per cycle in the fastest of ``rounds`` rounds."""
    conn = h11.Connection(role)
    cycle(conn)  # warm up: first-use costs (regex caches, imports) are not per request
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(iterations):
            cycle(conn)
        best = min(best, (time.process_time() - started) / iterations)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Print the pure-h11 CPU cost of a proxy's server and client cycle "
        "(1 KiB response, no I/O) and the requests/s ceiling they imply."
    )
    parser.add_argument(
        "--iterations", type=int, default=5000, help="cycles per round (default 5000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per side; the fastest counts (default 3)"
    )
    args = parser.parse_args()
    if args.iterations < 1 or args.rounds < 1:
        parser.error("--iterations and --rounds must be at least 1")
    server = best_microseconds(
        server_cycle, h11.SERVER, iterations=args.iterations, rounds=args.rounds
    )
    client = best_microseconds(
        client_cycle, h11.CLIENT, iterations=args.iterations, rounds=args.rounds
    )
    print(f"h11 {version('h11')}, CPU per cycle, best of {args.rounds} x {args.iterations}:")
    print(f"  server cycle (parse GET, write 1 KiB response): {server:7.1f} us")
    print(f"  client cycle (write GET, parse 1 KiB response): {client:7.1f} us")
    print(f"  both, per proxied request:                      {server + client:7.1f} us")
    print(f"  ceiling for one proxy process (1 core): {1e6 / (server + client):,.0f} req/s")


if __name__ == "__main__":
    main()
