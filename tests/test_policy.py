"""Access control: allowed clients, CONNECT ports, proxy credentials, loops.

Pure functions get plain tests; the proxy-level tests run handle_connection on
in-memory streams (``client_address`` stands in for the peer address) and
check that a refused request reaches no upstream.
"""

from __future__ import annotations

import base64
import hmac
import shutil

import h11
import pytest
import trio

import trioproxy
from trioproxy import _policy
from trioproxy._policy import (
    client_allowed,
    connect_port_allowed,
    credentials_match,
    is_own_address,
    own_via_elements,
    parse_networks,
    parse_port_ranges,
)

from .helpers import serve_origin, start_proxy
from .raw_exchange import raw_exchange


def get(target: bytes = b"http://example.com/", *fields: bytes) -> bytes:
    extra = b"".join(field + b"\r\n" for field in fields)
    return b"GET " + target + b" HTTP/1.1\r\nHost: example.com\r\n" + extra + b"\r\n"


def basic(credentials: bytes) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(credentials)


# --- Allowed clients ------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "networks", "allowed"),
    [
        ("127.0.0.1", None, True),
        ("127.200.3.4", None, True),
        ("::1", None, True),
        ("::ffff:127.0.0.1", None, True),
        ("10.1.2.3", None, False),
        ("::2", None, False),
        ("192.168.1.1", ["10.0.0.0/8"], False),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),
        ("fe80::1%eth0", ["fe80::/10"], True),
        ("not an address", ["0.0.0.0/0"], False),
    ],
)
def test_client_allowed(client: str, networks: list[str] | None, allowed: bool) -> None:
    """Loopback only by default; CIDRs match, IPv4-mapped IPv6 as IPv4; junk never matches."""
    parsed = _policy.LOOPBACK_NETWORKS if networks is None else parse_networks(networks)
    assert client_allowed(client, parsed) is allowed


@pytest.mark.parametrize("bad", [[], ["10.0.0.1/8"], ["10.0.0.0/33"], ["example.com"]])
def test_parse_networks_refuses_bad_cidrs(bad: list[str]) -> None:
    """Empty lists, host bits, bad prefixes and names are refused with a message."""
    with pytest.raises(ValueError, match="allow"):
        parse_networks(bad)


async def test_client_outside_allow_list_gets_403_and_nothing_is_forwarded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Default config: a client from 10.1.2.3 gets 403 and no upstream connection is made."""
    result = await raw_exchange(get(), client_address="10.1.2.3")
    assert result.status == 403
    assert result.headers[b"connection"] == b"close"
    assert result.upstream.connects == []


@pytest.mark.parametrize(
    ("client", "allow", "status"),
    [
        ("127.0.0.1", None, 200),
        ("10.1.2.3", ["10.0.0.0/8"], 200),
        ("10.1.2.3", ["192.168.0.0/16", "10.1.2.3/32"], 200),
        ("127.0.0.1", ["10.0.0.0/8"], 403),
    ],
)
async def test_allow_list_decides(
    client: str, allow: list[str] | None, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Allowed clients are served, others refused, whatever the list holds."""
    config = trioproxy.ProxyConfig() if allow is None else trioproxy.ProxyConfig(allow=allow)
    result = await raw_exchange(get(), config, client_address=client)
    assert result.status == status
    assert result.complete_requests == (1 if status == 200 else 0)


async def test_allow_list_uses_the_real_peer_address_on_tcp() -> None:
    """Over real TCP from 127.0.0.1, a proxy allowing only 10.0.0.0/8 answers 403."""

    async def never(
        request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        raise AssertionError("the origin must not be reached")

    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, never)
        config = trioproxy.ProxyConfig(allow=["10.0.0.0/8"])
        proxy_port = await start_proxy(nursery, config)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
        async with stream:
            await stream.send_all(get(b"http://127.0.0.1:%d/" % origin_port))
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 403 ")
        nursery.cancel_scope.cancel()


# --- CONNECT ports ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("443", ((443, 443),)),
        ("443,8443,9000-9100", ((443, 443), (8443, 8443), (9000, 9100))),
        (" 443 , 1-1 ", ((443, 443), (1, 1))),
        ("1-65535", ((1, 65535),)),
    ],
)
def test_parse_port_ranges(text: str, ranges: tuple[tuple[int, int], ...]) -> None:
    """Ports and inclusive ranges, separated by commas, spaces allowed."""
    assert parse_port_ranges(text) == ranges


@pytest.mark.parametrize("bad", ["", "443,", "0", "65536", "9100-9000", "a", "1-", "-5", "1-2-3"])
def test_parse_port_ranges_refuses_bad_lists(bad: str) -> None:
    """Empty items, out-of-range ports, reversed ranges and junk are refused."""
    with pytest.raises(ValueError, match="connect ports"):
        parse_port_ranges(bad)


@pytest.mark.parametrize(
    ("port", "allowed"),
    [
        (443, True),
        (8443, True),
        (8999, False),
        (9000, True),
        (9100, True),
        (9101, False),
        (25, False),
        (22, False),
    ],
)
def test_connect_port_allowed(port: int, allowed: bool) -> None:
    """Range ends are inclusive; everything outside is refused."""
    assert connect_port_allowed(port, parse_port_ranges("443,8443,9000-9100")) is allowed


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"example.com:25", 403),
        (b"example.com:22", 403),
        (b"example.com:443", 200),
        (b"example.com", 400),
    ],
)
async def test_connect_to_a_disallowed_port_gets_403(
    target: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """CONNECT to a port outside --connect-ports gets 403 and connects nowhere;
    an allowed port opens the tunnel; a target without a port is 400."""
    raw = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
    result = await raw_exchange(raw)
    assert result.status == status
    expected = [("example.com", 443)] if status == 200 else []
    assert result.upstream.connects == expected


# --- Proxy credentials -----------------------------------------------------------------

AUTH = trioproxy.ProxyConfig(auth="alice:s3cr:et")


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [basic(b"alice:wrong")],
        [basic(b"alice:s3cr")],
        [basic(b"bob:s3cr:et")],
        [b"Proxy-Authorization: Bearer " + base64.b64encode(b"alice:s3cr:et")],
        [b"Proxy-Authorization: Basic !!!notbase64"],
        [basic(b"alice:s3cr:et"), basic(b"alice:s3cr:et")],
        [b"Authorization: Basic " + base64.b64encode(b"alice:s3cr:et")],
    ],
    ids=["missing", "wrong", "prefix", "user", "scheme", "base64", "twice", "not-proxy"],
)
async def test_missing_or_wrong_credentials_get_407(
    fields: list[bytes], autojump_clock: trio.testing.MockClock
) -> None:
    """Anything but one correct Basic Proxy-Authorization gets 407 with a Basic challenge."""
    result = await raw_exchange(get(b"http://example.com/", *fields), AUTH)
    assert result.status == 407
    assert result.headers[b"proxy-authenticate"] == b'Basic realm="trioproxy"'
    assert result.upstream.connects == []


async def test_correct_credentials_pass_and_are_not_forwarded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With the right credentials the request goes through, without Proxy-Authorization."""
    result = await raw_exchange(get(b"http://example.com/", basic(b"alice:s3cr:et")), AUTH)
    assert result.status == 200
    assert result.complete_requests == 1
    assert b"proxy-authorization" not in bytes(result.origins[0].raw).lower()
    assert b"s3cr" not in bytes(result.origins[0].raw)


def test_credentials_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison goes through hmac.compare_digest on fixed-size digests."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert credentials_match([(b"Proxy-Authorization", basic(b"u:p")[21:])], b"u:p")
    assert not credentials_match([(b"Proxy-Authorization", basic(b"u:longer")[21:])], b"u:p")
    assert calls == [(32, 32), (32, 32)]


def test_credentials_never_appear_in_repr() -> None:
    """The password is kept out of ProxyConfig's repr, so it never reaches a log."""
    assert "s3cr" not in repr(AUTH)


@pytest.mark.parametrize("bad", ["nocolon", ":password", ""])
def test_bad_auth_setting_is_refused(bad: str) -> None:
    """auth must be USER:PASSWORD with a user."""
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        trioproxy.ProxyConfig(auth=bad)


# --- Loops ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "own", "is_own"),
    [
        ("127.0.0.1", 8080, [("127.0.0.1", 8080)], True),
        ("localhost", 8080, [("127.0.0.1", 8080)], True),
        ("LOCALHOST.", 8080, [("127.0.0.1", 8080)], True),
        ("a.localhost", 8080, [("::1", 8080)], True),
        (
            "::1",
            8080,
            [
                (
                    "::1",
                    8080,
                )
            ],
            True,
        ),
        ("::ffff:127.0.0.1", 8080, [("127.0.0.1", 8080)], True),
        ("127.0.0.1", 8081, [("127.0.0.1", 8080)], False),
        ("127.0.0.2", 8080, [("127.0.0.1", 8080)], False),
        ("127.0.0.5", 3128, [("0.0.0.0", 3128)], True),
        ("0.0.0.0", 3128, [("0.0.0.0", 3128)], True),
        ("0.0.0.0", 8080, [("127.0.0.1", 8080)], True),
        ("::", 8080, [("127.0.0.1", 8080)], True),
        ("localhost", 3128, [("::", 3128)], True),
        ("10.0.0.7", 3128, [("0.0.0.0", 3128)], False),
        ("10.0.0.7", 3128, [("10.0.0.7", 3128)], True),
        ("example.com", 8080, [("127.0.0.1", 8080)], False),
    ],
)
def test_is_own_address(host: str, port: int, own: list[tuple[str, int]], is_own: bool) -> None:
    """Same port and the same address, loopback names, or a wildcard listener's loopback."""
    assert is_own_address(host, port, own) is is_own


def test_own_via_elements_counts_only_ours() -> None:
    """Our element is counted across fields and list items, case-insensitively."""
    fields = [
        (b"Via", b"1.1 trioproxy, 1.0 squid"),
        (b"via", b"1.1 TRIOPROXY"),
        (b"Via", b"1.1 trioproxy (comment), 1.1 trioproxy-other"),
    ]
    assert own_via_elements(fields) == 2


@pytest.mark.parametrize(
    ("target", "kwargs"),
    [
        (b"http://127.0.0.1:8080/", {}),
        (b"http://localhost:8080/x", {}),
        (b"http://[::1]:3128/", {"listen_addresses": [("::", 3128)]}),
        (b"http://127.0.0.1:4000/", {"listen_addresses": [("127.0.0.1", 4000)]}),
    ],
)
async def test_request_to_our_own_address_gets_508(
    target: bytes,
    kwargs: dict[str, list[tuple[str, int]]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request addressed to the proxy itself gets 508 and is not forwarded."""
    result = await raw_exchange(get(target), **kwargs)  # type: ignore[arg-type]
    assert result.status == 508
    assert result.upstream.connects == []


@pytest.mark.parametrize(
    ("via", "status"),
    [
        (b"1.1 trioproxy", 200),
        (b"1.1 trioproxy, 1.1 trioproxy", 508),
        (b"1.0 squid, 1.1 trioproxy, 1.1 other, 1.1 trioproxy", 508),
    ],
)
async def test_via_shows_a_loop(
    via: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """One earlier trioproxy hop is a chain and passes; two mean a loop: 508."""
    result = await raw_exchange(get(b"http://example.com/", b"Via: " + via))
    assert result.status == status
    assert len(result.upstream.connects) == (1 if status == 200 else 0)


async def test_loop_to_a_port_0_listener_is_detected_over_tcp() -> None:
    """serve() on port 0 knows its real port: a request to it gets 508, not a loop."""
    async with trio.open_nursery() as nursery:
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig())
        for host in (b"127.0.0.1", b"localhost"):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            async with stream:
                await stream.send_all(get(b"http://%s:%d/" % (host, proxy_port)))
                data = await stream.receive_some(65536)
            assert data.startswith(b"HTTP/1.1 508 Loop Detected"), data
        nursery.cancel_scope.cancel()


async def test_unknown_peer_address_fails_closed() -> None:
    """A TCP stream whose peer address cannot be read counts as 'unknown', which no list allows."""
    from trioproxy._origin import _peer_host

    with trio.socket.socket() as sock:  # never connected: getpeername raises ENOTCONN
        stream = trio.SocketStream(sock)
        assert _peer_host(stream) == "unknown"
    assert not client_allowed("unknown", parse_networks(["0.0.0.0/0", "::/0"]))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_proxy_user_against_basic_auth() -> None:
    """curl --proxy-user gets through; without it, curl sees 407 and the origin nothing."""
    seen: list[bytes] = []

    async def origin(
        request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        seen.append(request.target)
        return 200, [], b"hello"

    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_origin, origin)
        proxy_port = await start_proxy(nursery, trioproxy.ProxyConfig(auth="alice:pw"))
        url = f"http://127.0.0.1:{origin_port}/x"
        base = [
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "%{http_code}",
            "-x",
            f"http://127.0.0.1:{proxy_port}",
        ]
        refused = await trio.run_process([*base, url], capture_stdout=True)
        assert refused.stdout.endswith(b"407")
        assert seen == []
        allowed = await trio.run_process(
            [*base, "--proxy-user", "alice:pw", url], capture_stdout=True
        )
        assert allowed.stdout == b"hello200"
        assert seen == [b"/x"]
        nursery.cancel_scope.cancel()
