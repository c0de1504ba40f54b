"""Who the client is: the socket's peer, or the address a PROXY protocol header carries.

Behind a balancer the TCP peer is the balancer. With ``--proxy-protocol`` every
connection must start with a PROXY protocol header (``_proxy_protocol``),
sent only by peers in ``--proxy-protocol-from``; its source address is then
the client for the allow list, X-Forwarded-For and the access log. There is
no guessing: a connection without a valid header within ``header_timeout``, or
from a peer that may not send one, is closed with one log line.

The same addresses go upstream in our own PROXY header when
``--upstream-send-proxy`` asks for one (``upstream_preface``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Collection
from typing import Any

import attrs
import trio

from ._config import ProxyConfig
from ._errors import STREAM_ERRORS
from ._policy import client_allowed
from ._pool import socket_under

# ``_proxy_protocol`` is imported where it is used, when the feature is on:
# most deployments never need it, and every module imported costs idle RSS.
Address = tuple[str, int]

logger = logging.getLogger("trioproxy")


@attrs.frozen
class ClientOrigin:
    """Where a client connection comes from.

    Attributes:
        host: the client's IP address (for the allow list, X-Forwarded-For and
            the log), "unknown" when the socket no longer says, or None for a
            stream without one (in-memory, Unix socket).
        source: the client's ``(ip, port)``, if known.
        destination: the address it connected to, if known.
        initial: bytes read past a PROXY header: the start of HTTP.
    """

    host: str | None
    source: Address | None = None
    destination: Address | None = None
    initial: bytes = b""


async def read_client_origin(
    stream: trio.abc.Stream, config: ProxyConfig, client_address: str | None = None
) -> ClientOrigin | None:
    """The client's origin: from ``client_address`` or the socket, or, with
    ``config.proxy_protocol``, from the PROXY header the peer must send first.

    Returns None when the connection must be closed (logged once here): a
    peer outside ``proxy_protocol_from``, a malformed header, or none complete
    within ``header_timeout``.

    Memory: the PROXY header parser's bound (``read_proxy_header``): at most
    107 bytes for v1, 16 + 4,096 for v2, and one read of ``read_size``.
    """
    peer, local = _socket_addresses(stream)
    host = client_address
    if host is None:
        # The peer's address as read just above; only when the socket could
        # not say (no TCP socket, or a peer already gone) ask _peer_host,
        # which tells those two apart, rather than a second getpeername(2)
        # on every connection.
        host = peer[0] if peer is not None else _peer_host(stream)
    if not config.proxy_protocol:
        return ClientOrigin(host, peer, local)
    if host is None or not client_allowed(host, config.proxy_protocol_from):
        logger.warning("closing a connection from %s: it may not send a PROXY header", host)
        return None
    from ._proxy_protocol import ProxyProtocolError, read_proxy_header

    with trio.move_on_after(config.header_timeout):
        try:
            header, initial = await read_proxy_header(stream, max_bytes=config.read_size)
        except ProxyProtocolError as exc:
            logger.warning("closing a connection from %s: bad PROXY header: %s", host, exc)
            return None
        except STREAM_ERRORS as exc:
            logger.warning("closing a connection from %s: lost in its PROXY header: %r", host, exc)
            return None
        source = header.source if header.source is not None else peer
        destination = header.destination if header.destination is not None else local
        client = header.source[0] if header.source is not None else host
        return ClientOrigin(client, source, destination, initial)
    logger.warning(
        "closing a connection from %s: no PROXY header within %g s", host, config.header_timeout
    )
    return None


def upstream_preface(config: ProxyConfig, origin: ClientOrigin) -> bytes:
    """The PROXY header each upstream connection starts with, or b"" for none.

    Only in reverse mode with ``upstream_send_proxy``. A client without IP
    addresses (an in-memory or Unix stream) is sent as v1 UNKNOWN or v2
    LOCAL: the upstream then keeps its own peer's address.
    """
    version = config.upstream_send_proxy
    if version is None or config.mode != "reverse":
        return b""
    from ._proxy_protocol import encode_v1, encode_v1_unknown, encode_v2, encode_v2_local

    if origin.source is not None and origin.destination is not None:
        with contextlib.suppress(ValueError):  # two address families: say nothing
            encode = encode_v1 if version == "v1" else encode_v2
            return encode(origin.source, origin.destination)
    return encode_v1_unknown() if version == "v1" else encode_v2_local()


def _tcp_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | socket.socket | None:
    """The TCP socket under ``stream`` (``_pool.socket_under``: through TLS
    either kind), if there is one."""
    sock = socket_under(stream)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def _socket_addresses(stream: trio.abc.Stream) -> tuple[Address | None, Address | None]:
    """The TCP peer's and our own ``(ip, port)``, where the socket says."""
    sock = _tcp_socket(stream)
    if sock is None:
        return None, None
    try:
        peer: Any = sock.getpeername()
        local: Any = sock.getsockname()
    except OSError:
        return None, None
    return (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))


def _peer_host(stream: trio.abc.Stream) -> str | None:
    """The client's IP address, if ``stream`` is TCP (or TLS over TCP)."""
    sock = _tcp_socket(stream)
    if sock is None:
        return None
    try:
        address: Any = sock.getpeername()
    except OSError:
        # The client already left (ENOTCONN). Fail closed: "unknown" is in
        # no allow list, so anything it may have sent is refused.
        return "unknown"
    return str(address[0])


def own_addresses(
    stream: trio.abc.Stream, config: ProxyConfig, listen_addresses: Collection[tuple[str, int]]
) -> frozenset[tuple[str, int]]:
    """Every ``(host, port)`` that reaches this proxy, as far as we know."""
    own = set(listen_addresses)
    if config.listen_port != 0:
        own.add((config.listen_host, config.listen_port))
    sock = _tcp_socket(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            address: Any = sock.getsockname()
            own.add((str(address[0]), int(address[1])))
    return frozenset(own)
