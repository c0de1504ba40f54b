"""Who may use the proxy, and for what: sans-I/O access policy.

Safe by default, because an open proxy on the internet is abused within hours
(spam relays, credential stuffing, pivots into private networks):

* Clients: only addresses in ``allow`` (default loopback only). Others get 403
  for their first request, and nothing is forwarded. A stream without an IP
  address (in-memory, Unix socket) has been accepted by an embedding
  application, which decides who connects; the list does not apply to it.
  IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, as a dual-stack listener
  reports them) are checked as the IPv4 address they carry.
* Credentials: optional Basic proxy credentials. A missing or wrong
  ``Proxy-Authorization`` gets 407 with ``Proxy-Authenticate``; the comparison
  is of SHA-256 digests with ``hmac.compare_digest``, so its time says nothing
  about the password, not even its length. The field is hop-by-hop and never
  reaches the upstream (``_http.HOP_BY_HOP``).
* CONNECT: only to ``connect_ports`` (default 443), so the proxy cannot be
  used to reach SMTP, SSH or databases.
* Loops: a request whose target is the proxy itself would make it connect to
  itself, again and again, until it runs out of descriptors. Two signals:
  the target is one of our listening addresses (IP literals compared as
  addresses; ``localhost`` and ``*.localhost`` are loopback, RFC 6761; a
  wildcard listener owns every loopback address on its port; 0.0.0.0 and ::
  as targets reach this host, so they count as loopback), and, for loops
  that go through a name or another proxy, the Via field already carrying our
  element more than once. One earlier trioproxy hop is allowed, so that two
  trioproxy instances can be chained (say, reverse in front of forward); a
  loop through us stops at its third visit. Both answer 508 Loop Detected.
  Spellings that only the resolver understands (``127.1``, ``2130706433``,
  this host's own name) are left to the Via check.

Every check is a plain function of values; ``_server`` calls them in order:
client address, credentials, CONNECT port, loop.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence

from ._errors import Forbidden, LoopDetected, ProxyAuthenticationRequired

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PortRange = tuple[int, int]
Fields = Sequence[tuple[bytes, bytes]]

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
# HTTPS only: CONNECT exists for TLS tunnels; other ports are opt-in.
DEFAULT_CONNECT_PORTS: tuple[PortRange, ...] = ((443, 443),)

# Our element in Via (``_http.VIA_VALUE``), compared case-insensitively.
OWN_VIA_ELEMENT = b"1.1 trioproxy"
# How many earlier trioproxy hops a request may show: one, so that two
# instances can be chained; a loop is refused at its third visit.
MAX_OWN_VIA_ELEMENTS = 1


def parse_networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs such as ``10.0.0.0/8`` or ``::1`` (a bare address is a /32 or /128).

    Raises:
        ValueError: naming the bad value (host bits set count as bad: write
            ``192.168.1.0/24``, not ``192.168.1.5/24``).
    """
    networks = []
    for value in values:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(value)
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip()))
        except ValueError as exc:
            raise ValueError(f"allow: not a CIDR network: {value!r} ({exc})") from None
    if not networks:
        raise ValueError("allow: at least one network is needed (e.g. 127.0.0.0/8)")
    return tuple(networks)


# The loop check parses the target host and each listening address for every
# request; ``ipaddress`` takes microseconds per parse, and the same few
# strings come back again and again (in reverse mode always the same). Memory:
# at most this many entries, each a host string (<= 253 bytes, see _http) and
# an address object: well under 1 MiB.
_PARSED_IP_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=_PARSED_IP_CACHE_SIZE)
def parse_ip(text: str) -> IPAddress | None:
    """An IP address without zone (``fe80::1%eth0``), IPv4-mapped ones unwrapped."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_allowed(client_host: str, networks: Iterable[IPNetwork]) -> bool:
    """True if ``client_host`` (an IP address string) is in one of ``networks``."""
    address = parse_ip(client_host)
    if address is None:
        return False
    return any(address in network for network in networks)


def check_client(client_host: str | None, networks: Sequence[IPNetwork]) -> None:
    """Refuse clients outside ``networks``; ``None`` (no IP address) passes.

    Raises:
        Forbidden: the client's address is not allowed.
    """
    if client_host is not None and not client_allowed(client_host, networks):
        raise Forbidden(f"clients from {client_host} may not use this proxy")


def parse_port_ranges(text: str | Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Parse ``443,8443,9000-9100`` into ``((443, 443), (8443, 8443), (9000, 9100))``.

    Raises:
        ValueError: naming the bad item.
    """
    if not isinstance(text, str):
        ranges = tuple((int(low), int(high)) for low, high in text)
    else:
        ranges = tuple(_parse_port_range(item) for item in text.split(","))
    for low, high in ranges:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"connect ports: {low}-{high} is not a range within 1-65535")
    if not ranges:
        raise ValueError("connect ports: at least one port is needed")
    return ranges


def _parse_port_range(item: str) -> PortRange:
    low, dash, high = item.strip().partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise ValueError(f"connect ports: {item.strip()!r} is not a port or a range like 9000-9100")
    return int(low), int(high if dash else low)


def connect_port_allowed(port: int, ranges: Iterable[PortRange]) -> bool:
    """True if ``port`` lies in one of the inclusive ``ranges``."""
    return any(low <= port <= high for low, high in ranges)


def check_connect_port(port: int, ranges: Sequence[PortRange]) -> None:
    """Refuse CONNECT to a port outside ``ranges``.

    Raises:
        Forbidden: the port is not allowed.
    """
    if not connect_port_allowed(port, ranges):
        raise Forbidden(f"CONNECT to port {port} is not allowed")


def parse_credentials(text: str) -> bytes:
    """Check ``USER:PASSWORD`` and return it as the bytes Basic carries.

    Raises:
        ValueError: no colon, or an empty user.
    """
    user, colon, _ = text.partition(":")
    if not colon or not user:
        raise ValueError("auth must be USER:PASSWORD with a non-empty user")
    return text.encode("utf-8")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def credentials_match(fields: Fields, credentials: bytes) -> bool:
    """True if there is exactly one ``Proxy-Authorization: Basic`` with ``credentials``.

    The comparison takes the same time whatever the given value is.
    """
    values = [value for name, value in fields if name.lower() == b"proxy-authorization"]
    if len(values) != 1:
        return False
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(_digest(given), _digest(credentials))


def check_credentials(fields: Fields, credentials: bytes | None) -> None:
    """Ask for credentials when they are configured and not given correctly.

    Raises:
        ProxyAuthenticationRequired: carrying the Proxy-Authenticate field.
    """
    if credentials is not None and not credentials_match(fields, credentials):
        raise ProxyAuthenticationRequired("this proxy needs Basic credentials")


def is_own_address(host: str, port: int, own_addresses: Iterable[tuple[str, int]]) -> bool:
    """True if ``host:port`` is one of ``own_addresses`` (see the module comment)."""
    target = _loopback_name_or_ip(host)
    for own_host, own_port in own_addresses:
        if own_port != port:
            continue
        own = parse_ip(own_host)
        if own is None or target is None:
            continue
        if own.is_unspecified:
            if target == "loopback" or (not isinstance(target, str) and target.is_loopback):
                return True
        elif target == "loopback":
            if own.is_loopback:
                return True
        elif target == own:
            return True
    return False


def _loopback_name_or_ip(host: str) -> IPAddress | str | None:
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        return "loopback"
    address = parse_ip(host)
    if address is not None and address.is_unspecified:
        return "loopback"  # connecting to 0.0.0.0 or :: reaches this host
    return address


def own_via_elements(fields: Fields) -> int:
    """How many elements of the Via fields are ours."""
    count = 0
    for name, value in fields:
        if name.lower() == b"via":
            count += sum(
                1 for element in value.split(b",") if element.strip().lower() == OWN_VIA_ELEMENT
            )
    return count


def check_not_loop(
    host: str, port: int, fields: Fields, own_addresses: Iterable[tuple[str, int]]
) -> None:
    """Refuse a request that would come back to us.

    Raises:
        LoopDetected: the target is our own address, or Via shows the loop.
    """
    if is_own_address(host, port, own_addresses):
        raise LoopDetected(f"{host}:{port} is this proxy itself")
    if own_via_elements(fields) > MAX_OWN_VIA_ELEMENTS:
        raise LoopDetected("the request has passed through trioproxy too often (Via)")
