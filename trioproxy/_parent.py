"""A parent proxy for forward mode: the rules, without I/O.

Proxies sit in chains: a corporate network lets traffic out only through its
own proxy. With ``--parent-proxy http://[USER:PASSWORD@]HOST:PORT`` every
forward-mode exchange goes through it, as curl's and squid's ``cache_peer``
do:

* A plain request goes to the parent in absolute form (``GET http://host/path``),
  with our own ``Proxy-Authorization`` when the parent URL carries credentials.
  The client's own proxy credentials were for us and never travel on (they
  are hop-by-hop, ``_http.HOP_BY_HOP``).
* A CONNECT tunnel opens with a CONNECT to the parent; once the parent
  answers 2xx, the bytes flow as with a direct tunnel.
* ``--no-parent-for`` names targets that go direct: a host name (exact, or a
  suffix written ``.example.test``), or a network in CIDR form that an IP
  literal target falls in. Names are not resolved to check a network: that
  would cost a DNS lookup per request, and the parent may see a different DNS.

A parent that answers 407 refused *our* credentials, not the client's: the
client gets 502 and the log says why (``parent_refusal``).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import attrs

from ._errors import BadGateway

Headers = list[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(kw_only=True)
class ParentProxy:
    """The parent proxy: where it listens, and our credentials for it.

    Attributes:
        host: the parent's host name or IP address (IPv6 without brackets).
        port: its port.
        authorization: the ``Proxy-Authorization`` value to send, or None.
            Kept out of repr so that it never reaches a log.
    """

    host: str
    port: int
    authorization: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> ParentProxy:
        """Parse ``http://[USER:PASSWORD@]HOST:PORT`` (percent-escapes allowed in
        the credentials).

        Raises:
            ValueError: with a message saying what is wrong with ``url``.
        """
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"parent proxy must be an http:// URL, got {_safe(url)!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"parent proxy URL must not have a path or query: {_safe(url)!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"parent proxy URL has an invalid port: {_safe(url)!r}") from None
        if not parts.hostname or port is None:
            raise ValueError(f"parent proxy URL needs HOST:PORT, got {_safe(url)!r}")
        authorization = None
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode())
            authorization = b"Basic " + token
        return cls(host=parts.hostname, port=port, authorization=authorization)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def fields(self) -> Headers:
        """The fields every request to the parent carries: our credentials, if any."""
        if self.authorization is None:
            return []
        return [(b"Proxy-Authorization", self.authorization)]


def _safe(url: str) -> str:
    """``url`` with any password replaced, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def parse_no_parent(values: Iterable[str]) -> tuple[str, ...]:
    """Check ``--no-parent-for`` values: host names, ``.suffix`` names, or CIDRs.

    Raises:
        ValueError: naming an empty value or one with a port or a path.
    """
    rules = []
    for value in values:
        rule = value.strip().lower()
        if "/" in rule:
            valid = _network(rule) is not None
        elif ":" in rule:  # an IPv6 address; a host name has no colon (nor a port here)
            valid = _ip(rule) is not None
        else:
            valid = bool(rule.strip("."))
        if not valid:
            raise ValueError(f"no-parent-for takes a host, .domain or CIDR, got {value!r}")
        rules.append(rule)
    return tuple(rules)


def goes_direct(host: str, rules: Iterable[str]) -> bool:
    """True when ``host`` (a target's host) matches a ``--no-parent-for`` rule."""
    host = host.lower().rstrip(".")
    address = _ip(host)
    for rule in rules:
        if rule.startswith("."):
            if host.endswith(rule) or host == rule[1:]:
                return True
        elif "/" in rule:
            network = _network(rule)
            if address is not None and network is not None and address in network:
                return True
        elif host == rule or (address is not None and address == _ip(rule)):
            return True
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def absolute_target(authority: bytes, path: bytes) -> bytes:
    """The absolute-form target a parent proxy needs: ``http://authority/path``."""
    return b"http://" + authority + path


def parent_refusal(status_code: int, *, tunnel: bool) -> BadGateway | None:
    """The 502 to answer when the parent refused to carry a request, or None.

    A 407 means the parent refused our credentials (the client did not fail to
    authenticate; we did). For a CONNECT, any answer but 2xx means no tunnel.
    """
    if status_code == 407:
        return BadGateway("the parent proxy refused our credentials (407)")
    if tunnel and not 200 <= status_code < 300:
        return BadGateway(f"the parent proxy answered {status_code} to CONNECT")
    return None
