"""Sans-I/O HTTP rules of a proxy: where a request goes and which fields pass.

Nothing here does I/O or knows trio; every function maps values to values and
is tested with plain synchronous tests. h11 parses and frames the messages;
this module decides what a proxy changes between the hops:

* the target: forward mode takes it from the absolute-form request target
  (``GET http://host:port/path HTTP/1.1``, or ``https://``, which the proxy
  fetches over TLS), reverse mode from the server the exchange picked; the
  path and query pass byte for byte, never decoded;
* hop-by-hop fields (RFC 9110 section 7.6.1) are dropped in both directions,
  and framing fields are left to h11, which frames each hop itself: a
  Content-Length passes on as the declared length (h11 checks that the body
  matches it), Transfer-Encoding never passes;
* ``Via`` is added in both directions, ``X-Forwarded-*`` towards the upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs
import h11

from ._balance import UpstreamServer
from ._errors import BadRequest, ProxyError

Headers = list[tuple[bytes, bytes]]

# Fields that describe one hop, never the message (RFC 9110 7.6.1, plus the
# de-facto Proxy-Connection and Keep-Alive). Transfer-Encoding is framing, which
# h11 produces anew for each hop. Proxy-Authorization is for us, not upstream.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

VIA_VALUE = b"1.1 trioproxy"

# A DNS label is at most 63 octets and a name at most 253 (RFC 1035 2.3.4).
_MAX_HOST_LENGTH = 253


@attrs.frozen
class Target:
    """Where one request goes: the upstream's address and the request target.

    Attributes:
        host: the host to connect to, without brackets for IPv6.
        port: the TCP port.
        path: the origin-form request target (path and query), byte for byte.
        authority: the value of the Host field sent upstream.
        tls: whether the connection to ``host:port`` speaks TLS (an
            ``https://`` target or upstream).
    """

    host: str
    port: int
    path: bytes
    authority: bytes
    tls: bool = False


def forward_target(request_target: bytes) -> Target:
    """Read an absolute-form target: ``http://host[:port][/path][?query]``, or
    ``https://...`` (port 443 by default; ``Target.tls``).

    Raises:
        BadRequest: for an origin-form target (this is a proxy, not a server),
            another scheme, credentials in the URI, or a malformed authority.
    """
    scheme, sep, rest = request_target.partition(b"://")
    if not sep or b"/" in scheme:
        raise BadRequest(
            "this is a forward proxy: the request target must be an absolute URI "
            "such as http://example.com/"
        )
    tls = scheme.lower() == b"https"
    if not tls and scheme.lower() != b"http":
        raise BadRequest(
            f"unsupported scheme {scheme.decode('ascii', 'replace')!r}: use http:// or https://"
        )
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        index = rest.find(delimiter)
        if index != -1:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    host, port = split_authority(authority, default_port=443 if tls else 80)
    if path.startswith(b"#"):
        path = b""
    if not path.startswith(b"/"):
        path = b"/" + path
    return Target(host=host, port=port, path=path, authority=authority, tls=tls)


def reverse_path(request_target: bytes) -> bytes:
    """The path and query a reverse proxy passes on, byte for byte.

    An absolute-form target is accepted too (RFC 9112 3.2.2 asks servers to);
    only its path and query are used.

    Raises:
        BadRequest: for a target that is neither origin-form, ``*``, nor
            absolute-form.
    """
    if request_target.startswith(b"/") or request_target == b"*":
        return request_target
    if b"://" in request_target:
        return forward_target(request_target).path
    raise BadRequest("the request target must start with /")


def request_authority(
    request_target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> bytes | None:
    """The host a request names, for routing: the authority of an
    absolute-form target (RFC 9112 3.2.2: it wins over Host), else the Host
    field, else None."""
    scheme, sep, rest = request_target.partition(b"://")
    if sep and b"/" not in scheme:
        return rest.split(b"/", 1)[0].split(b"?", 1)[0].split(b"#", 1)[0]
    for name, value in headers:
        if name.lower() == b"host":
            return value
    return None


def reverse_target(request_target: bytes, server: UpstreamServer) -> Target:
    """Where a reverse-proxied request goes on ``server``: ``reverse_path``
    of its target, and Host the server's authority.

    Raises:
        BadRequest: as ``reverse_path``.
    """
    return server_target(reverse_path(request_target), server)


def server_target(path: bytes, server: UpstreamServer) -> Target:
    """Where a reverse-proxied request for ``path`` goes on ``server``."""
    return Target(
        host=server.host,
        port=server.port,
        path=path,
        authority=server.authority.encode("ascii"),
        tls=server.scheme == "https",
    )


def split_authority(authority: bytes, *, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 as ``[addr]``) into a host and a port.

    Raises:
        BadRequest: for credentials, an empty or over-long host, or a port that
            is not a number from 1 to 65535.
    """
    if b"@" in authority:
        raise BadRequest("credentials in the request URI are not accepted")
    if authority.startswith(b"["):
        host_bytes, bracket, after = authority[1:].partition(b"]")
        if not bracket or (after and not after.startswith(b":")):
            raise BadRequest("malformed IPv6 address in the request URI")
        port_bytes = after[1:] if after else b""
    else:
        host_bytes, _, port_bytes = authority.partition(b":")
    if not host_bytes or len(host_bytes) > _MAX_HOST_LENGTH:
        raise BadRequest("the request URI has no valid host")
    try:
        host = host_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the host in the request URI is not ASCII") from None
    if not port_bytes:
        return host, default_port
    if not port_bytes.isdigit() or not 1 <= int(port_bytes) <= 65535:
        raise BadRequest("the port in the request URI is not a number from 1 to 65535")
    return host, int(port_bytes)


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """The field names listed in Connection fields, lowercased."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


def _hop_by_hop_names(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Lowercased names of the fields that do not travel past us: the
    hop-by-hop ones and every field that Connection names."""
    return HOP_BY_HOP | _connection_tokens(headers)


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    target: Target,
    client_host: str | None,
    reverse: bool,
    client_tls: bool = False,
) -> Headers:
    """The fields of the request as sent to the upstream.

    Host is set from the target (in forward mode from the absolute URI, in
    reverse mode the upstream's authority, with the client's Host kept in
    X-Forwarded-Host). Via is added; in reverse mode so are X-Forwarded-For and
    X-Forwarded-Proto (``https`` when the client came over TLS,
    ``client_tls``). Order: Host first, the client's end-to-end fields as
    they came, then Transfer-Encoding, Via, X-Forwarded-For, -Proto, -Host.
    """
    # One pass over the fields rather than one per rule: this runs for every
    # request (issue 5, CPU per request).
    hop_by_hop = _hop_by_hop_names(headers)
    merge_forwarded_for = reverse and client_host is not None
    result = [(b"Host", target.authority)]
    original_host: bytes | None = None
    chunked = False
    via: list[bytes] = []
    forwarded_for: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host":
            if original_host is None:
                original_host = value
        elif lowered in hop_by_hop:
            # h11 frames a request body as chunked only when told to; without
            # this, a chunked upload would be framed as Content-Length: 0 (h11
            # only accepts "chunked" from the client, so that is all this can be).
            chunked = chunked or lowered == b"transfer-encoding"
        elif lowered == b"via":
            via.append(value)
        elif merge_forwarded_for and lowered == b"x-forwarded-for":
            forwarded_for.append(value)
        elif not (reverse and lowered in _FORWARDED_SINGLE):
            result.append((name, value))
    if chunked:
        result.append((b"Transfer-Encoding", b"chunked"))
    via.append(VIA_VALUE)
    result.append((b"Via", b", ".join(via)))
    if reverse:
        if client_host is not None:
            forwarded_for.append(client_host.encode("ascii"))
            result.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
        result.append((b"X-Forwarded-Proto", b"https" if client_tls else b"http"))
        if original_host is not None:
            result.append((b"X-Forwarded-Host", original_host))
    return result


# Fields we set ourselves in reverse mode: a client's own values would be lies.
_FORWARDED_SINGLE = frozenset({b"x-forwarded-proto", b"x-forwarded-host"})


def client_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The fields of the upstream's response as sent to the client: the
    end-to-end ones in their order, then Via with our element appended."""
    # One pass, as in upstream_request_headers: this runs for every response.
    hop_by_hop = _hop_by_hop_names(headers)
    result: Headers = []
    via: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in hop_by_hop:
            continue
        if lowered == b"via":
            via.append(value)
        else:
            result.append((name, value))
    via.append(VIA_VALUE)
    result.append((b"Via", b", ".join(via)))
    return result


def error_response(error: ProxyError) -> tuple[h11.Response, bytes]:
    """A short text/plain response for ``error``, closing the connection.

    The body is ``"<status> <reason>: <message>"`` so that curl users see why.
    """
    body = f"{error.status_code} {error.reason.decode()}: {error.message}\n".encode()
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode("ascii")),
        (b"Connection", b"close"),
        (b"Via", VIA_VALUE),
        *error.response_fields,
    ]
    response = h11.Response(status_code=error.status_code, headers=headers, reason=error.reason)
    return response, body


# --- Tunnels: CONNECT targets and protocol upgrades --------------------------
#
# Connection and Upgrade are hop-by-hop, and the header builders drop them. A
# protocol upgrade is the one case where the client means them for the origin
# too, so when the client asks for one, the pair is re-added towards the
# upstream, and the upstream's 101 carries its pair back to the client.


def connect_target(request_target: bytes) -> Target:
    """Read a CONNECT target: authority-form ``host:port`` (RFC 9110 9.3.6).

    Raises:
        BadRequest: for any other form (a path, an absolute URI, a missing
            port, credentials).
    """
    if any(c in request_target for c in (b"/", b"?", b"#")):
        raise BadRequest("the CONNECT target must be host:port, such as example.com:443")
    if not request_target.rpartition(b":")[2].isdigit():
        raise BadRequest("the CONNECT target must name a port, such as example.com:443")
    host, port = split_authority(request_target, default_port=0)
    return Target(host=host, port=port, path=request_target, authority=request_target)


def upgrade_fields(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """The ``Connection: upgrade`` and ``Upgrade`` fields to pass on, if any.

    A message asks for (or, as a 101, agrees to) a protocol switch when it has
    an Upgrade field and Connection lists ``upgrade``. Returns both fields for
    the next hop, or nothing when the message does not switch.
    """
    protocols = [value for name, value in headers if name.lower() == b"upgrade"]
    if not protocols or b"upgrade" not in _connection_tokens(headers):
        return []
    return [(b"Connection", b"upgrade"), (b"Upgrade", b", ".join(protocols))]


def request_has_body(request: h11.Request) -> bool:
    """Whether a request carries a body: chunked, or a Content-Length above 0.

    Without either it has none (RFC 9112 6.3), and h11's next event for it
    is its ``EndOfMessage``, available without reading.
    """
    for name, value in request.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


# Statuses whose responses never have a body (RFC 9110 6.4.1), whatever
# Content-Length says.
_NO_BODY_STATUSES = frozenset({204, 304})


def response_content_length(method: bytes, response: h11.Response) -> int | None:
    """The body length of ``response`` if it is framed by Content-Length, else None.

    None for responses that have no body (to HEAD, 204, 304), for chunked or
    close-delimited ones, and for anything h11 would not frame by one
    Content-Length value.
    """
    if method == b"HEAD" or response.status_code in _NO_BODY_STATUSES:
        return None
    return _content_length(response.headers)


def request_content_length(request: h11.Request) -> int | None:
    """The body length of ``request`` if it is framed by Content-Length, else None.

    None for chunked requests, requests without a body, and for an Upgrade
    request: a 101 answer needs h11 to have seen the whole request
    (``their_state`` DONE), which a spliced body never lets it see.
    """
    if upgrade_fields(request.headers.raw_items()):
        return None
    return _content_length(request.headers)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    lengths = [value for name, value in headers if name == b"content-length"]
    if any(name == b"transfer-encoding" for name, _ in headers):
        return None
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    return int(lengths[0])
