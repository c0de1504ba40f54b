"""Sans-I/O rules of _http and _config: plain synchronous tests, no trio."""

from __future__ import annotations

import pytest

import trioproxy
from trioproxy._balance import UpstreamServer
from trioproxy._errors import BadGateway, BadRequest
from trioproxy._http import (
    VIA_VALUE,
    client_response_headers,
    error_response,
    forward_target,
    reverse_target,
    upstream_request_headers,
)


@pytest.mark.parametrize(
    ("target", "host", "port", "path"),
    [
        (b"http://example.com/a?b", "example.com", 80, b"/a?b"),
        (b"HTTP://Example.com:8080", "Example.com", 8080, b"/"),
        (b"http://h?q=1", "h", 80, b"/?q=1"),
        (b"http://[::1]:9/x%2Fy", "::1", 9, b"/x%2Fy"),
        (b"http://h/%E2%82%AC?%20", "h", 80, b"/%E2%82%AC?%20"),
        (b"https://example.com/a?b", "example.com", 443, b"/a?b"),
        (b"HTTPS://h:8443", "h", 8443, b"/"),
    ],
)
def test_forward_target_keeps_path_and_query_byte_for_byte(
    target: bytes, host: str, port: int, path: bytes
) -> None:
    """The absolute URI gives host, port (80 or 443 by default) and the exact
    origin-form target; an https:// target is fetched over TLS."""
    parsed = forward_target(target)
    assert (parsed.host, parsed.port, parsed.path) == (host, port, path)
    assert parsed.tls == target.lower().startswith(b"https://")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (b"/just/a/path", "absolute URI"),
        (b"ftp://h/", "unsupported scheme"),
        (b"wss://h/", "unsupported scheme"),
        (b"http://user:pw@h/", "credentials"),
        (b"http:///nohost", "no valid host"),
        (b"http://h:0/", "port"),
        (b"http://h:99999/", "port"),
        (b"http://h:x/", "port"),
        (b"http://[::1/", "IPv6"),
    ],
)
def test_forward_target_refuses_what_it_cannot_forward(target: bytes, message: str) -> None:
    """Every unusable target is a BadRequest whose message says why."""
    with pytest.raises(BadRequest, match=message):
        forward_target(target)


def test_reverse_target_uses_the_fixed_upstream() -> None:
    """Reverse mode keeps the path and sends Host as the upstream's authority."""
    upstream = UpstreamServer.from_url("http://10.0.0.1:9000")
    target = reverse_target(b"/a%20b?c=%2F", upstream)
    assert (target.host, target.port, target.path, target.authority) == (
        "10.0.0.1",
        9000,
        b"/a%20b?c=%2F",
        b"10.0.0.1:9000",
    )
    assert reverse_target(b"http://elsewhere/p?q", upstream).path == b"/p?q"
    assert not target.tls
    with pytest.raises(BadRequest):
        reverse_target(b"no-slash", upstream)


@pytest.mark.parametrize(
    ("url", "port", "authority"),
    [
        ("https://origin.test", 443, b"origin.test"),
        ("https://origin.test:8443/", 8443, b"origin.test:8443"),
        ("https://origin.test:80", 80, b"origin.test:80"),
        ("https://[::1]", 443, b"[::1]"),
    ],
)
def test_https_upstream_is_a_tls_target(url: str, port: int, authority: bytes) -> None:
    """An https:// upstream defaults to port 443, leaves the default port out
    of Host, and makes every target a TLS one."""
    target = reverse_target(b"/p", UpstreamServer.from_url(url))
    assert (target.port, target.authority, target.tls) == (port, authority, True)


def test_connection_named_fields_are_dropped_too() -> None:
    """Both directions drop the listed hop-by-hop fields and whatever
    Connection names, keeping the rest in order."""
    headers = [
        (b"Connection", b"close, X-A"),
        (b"connection", b"x-b"),
        (b"X-A", b"1"),
        (b"X-B", b"2"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"5"),
        (b"X-C", b"3"),
    ]
    assert client_response_headers(headers) == [
        (b"Content-Length", b"5"),
        (b"X-C", b"3"),
        (b"Via", VIA_VALUE),
    ]
    upstream = upstream_request_headers(
        headers, target=forward_target(b"http://origin/"), client_host=None, reverse=False
    )
    assert upstream == [
        (b"Host", b"origin"),
        (b"Content-Length", b"5"),
        (b"X-C", b"3"),
        (b"Transfer-Encoding", b"chunked"),  # h11's framing of the body, declared anew
        (b"Via", VIA_VALUE),
    ]


def test_upstream_request_headers_in_forward_mode() -> None:
    """Forward mode: Host from the URI, Via appended to an existing Via, no
    X-Forwarded-* invented, chunked framing declared anew."""
    target = forward_target(b"http://origin:81/")
    headers = upstream_request_headers(
        [(b"Host", b"spoofed"), (b"Via", b"1.0 other"), (b"Transfer-Encoding", b"chunked")],
        target=target,
        client_host="127.0.0.1",
        reverse=False,
    )
    assert headers[0] == (b"Host", b"origin:81")
    assert (b"Via", b"1.0 other, " + VIA_VALUE) in headers
    assert (b"Transfer-Encoding", b"chunked") in headers
    assert not any(name.lower().startswith(b"x-forwarded") for name, _ in headers)


def test_upstream_request_headers_in_reverse_mode() -> None:
    """Reverse mode appends to X-Forwarded-For and replaces Proto and Host."""
    target = reverse_target(b"/", UpstreamServer.from_url("http://up"))
    headers = upstream_request_headers(
        [
            (b"Host", b"public"),
            (b"X-Forwarded-For", b"203.0.113.9"),
            (b"X-Forwarded-Proto", b"https-lie"),
        ],
        target=target,
        client_host="127.0.0.1",
        reverse=True,
    )
    assert (b"X-Forwarded-For", b"203.0.113.9, 127.0.0.1") in headers
    assert (b"X-Forwarded-Proto", b"http") in headers
    assert (b"X-Forwarded-Host", b"public") in headers
    assert (b"X-Forwarded-Proto", b"https-lie") not in headers
    over_tls = upstream_request_headers(
        [], target=target, client_host="127.0.0.1", reverse=True, client_tls=True
    )
    assert (b"X-Forwarded-Proto", b"https") in over_tls


def test_client_response_headers_keep_content_length_and_add_via() -> None:
    """The declared length passes (h11 enforces it); hop-by-hop fields do not."""
    headers = client_response_headers(
        [(b"Content-Length", b"3"), (b"Keep-Alive", b"timeout=5"), (b"Proxy-Authenticate", b"x")]
    )
    assert headers == [(b"Content-Length", b"3"), (b"Via", VIA_VALUE)]


def test_error_response_is_short_text_with_length_and_close() -> None:
    """Error responses say why, declare their length and close the connection."""
    response, body = error_response(BadGateway("cannot connect to h:1: refused"))
    fields = dict(response.headers)
    assert response.status_code == 502
    assert body == b"502 Bad Gateway: cannot connect to h:1: refused\n"
    assert fields[b"content-length"] == str(len(body)).encode()
    assert fields[b"connection"] == b"close"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"read_size": 10}, "read_size must be between"),
        ({"buffer_chunks": 0}, "buffer_chunks must be between"),
        ({"listen_port": -1}, "listen_port must be between"),
        ({"connect_timeout": 0}, "connect_timeout must be greater than 0"),
        ({"upstream": "ftp://x"}, "http:// or https:// URL"),
        ({"upstream": "https://x:y"}, "invalid port"),
        ({"tls_cert": ["a.pem", "b.pem"], "tls_key": ["a.key"]}, "1 keys for 2 certificates"),
        ({"tls_handshake_timeout": 0}, "tls_handshake_timeout must be greater than 0"),
        ({"upstream_ca": "ca.pem", "upstream_insecure": True}, "contradict"),
        ({"upstream": "http://x", "upstream_sni": "x"}, "upstream_sni needs an https://"),
        ({"upstream_cert": "c.pem"}, "upstream_cert needs an https:// upstream"),
        ({"upstream": "https://x", "upstream_key": "k.pem"}, "upstream_key needs upstream_cert"),
        ({"upstream": "http://x/path"}, "must not have a path"),
        ({"upstream": "http://u:p@x"}, "credentials"),
        ({"upstream": "http://x:notaport"}, "invalid port"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], message: str) -> None:
    """ProxyConfig refuses bad values with a message naming what is wrong."""
    with pytest.raises(ValueError, match=message):
        trioproxy.ProxyConfig(**kwargs)  # type: ignore[arg-type]


def test_config_bound_and_mode() -> None:
    """The per-direction bound is (buffer_chunks + 2) x read_size; a fixed
    upstream means reverse mode."""
    config = trioproxy.ProxyConfig(read_size=4096, buffer_chunks=3, upstream="http://[::1]:81")
    assert config.max_buffered_per_direction == 5 * 4096
    assert config.mode == "reverse"
    assert config.upstream is not None
    assert config.upstream.authority == "[::1]:81"
    assert trioproxy.ProxyConfig().mode == "forward"
