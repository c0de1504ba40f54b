"""ProxyConfig: every size, limit and timeout in one frozen, validated value.

The CLI only builds a ProxyConfig; embedding applications build one directly.
Validation happens here, once, with messages a person can act on, so that the
rest of the code can trust every field.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

from ._framing import HeadLimits
from ._policy import (
    DEFAULT_CONNECT_PORTS,
    LOOPBACK_NETWORKS,
    IPNetwork,
    PortRange,
    parse_credentials,
    parse_networks,
    parse_port_ranges,
)

KiB = 1024
MiB = 1024 * KiB

# 64 KiB matches the socket buffer granularity of Linux loopback and keeps the
# per-read syscall cost small against the copy cost; larger reads buy little
# throughput and raise the per-connection bound linearly.
DEFAULT_READ_SIZE = 64 * KiB
# Four chunks in flight let the reader run a little ahead of the writer (so a
# momentary stall on one side does not stop the other) while keeping the bound
# at (4 + 2) x 64 KiB = 384 KiB per direction.
DEFAULT_BUFFER_CHUNKS = 4
# h11's own default; a request head larger than this gets 431.
DEFAULT_MAX_HEAD_SIZE = 64 * KiB
# Real browsers send 10-40 fields; 100 is nginx's and Node's order of
# magnitude, and bounds per-field work on each head.
DEFAULT_MAX_HEADER_FIELDS = 100
# 8 KiB is the request-line limit of nginx (large_client_header_buffers) and
# Apache (LimitRequestLine); RFC 9112 3 asks for at least 8000 octets.
DEFAULT_MAX_TARGET_LENGTH = 8 * KiB


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


def _credentials(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        parse_credentials(value)


def _in_range(low: int, high: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be between {low} and {high}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class Upstream:
    """A fixed origin for reverse mode: ``http://host:port``."""

    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        """Parse ``http://host[:port]`` (no path, query or credentials).

        Raises:
            ValueError: with a message saying what is wrong with ``url``.
        """
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"upstream must be an http:// URL, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"upstream URL must not carry credentials, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"upstream URL must not have a path or query, got {url!r}")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"upstream URL has an invalid port: {url!r}") from None
        if not parts.hostname:
            raise ValueError(f"upstream URL has no host: {url!r}")
        return cls(host=parts.hostname, port=port)

    @property
    def authority(self) -> str:
        """``host:port`` as it goes into a Host field (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"


def _to_upstream(value: Upstream | str | None) -> Upstream | None:
    if value is None or isinstance(value, Upstream):
        return value
    return Upstream.from_url(value)


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """Everything the proxy needs to know, validated on construction.

    Memory: each direction of each exchange holds at most
    ``(buffer_chunks + 2) * read_size`` payload bytes (see ``relay``), plus
    h11's receive buffer, which is capped by ``max_head_size`` while a head is
    being read and by ``read_size`` while a body is.

    Raises:
        ValueError: on construction, naming the field and the allowed range.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = attrs.field(default=8080, validator=_in_range(0, 65535))
    upstream: Upstream | None = attrs.field(default=None, converter=_to_upstream)
    read_size: int = attrs.field(default=DEFAULT_READ_SIZE, validator=_in_range(KiB, 16 * MiB))
    buffer_chunks: int = attrs.field(default=DEFAULT_BUFFER_CHUNKS, validator=_in_range(1, 1024))
    max_head_size: int = attrs.field(
        default=DEFAULT_MAX_HEAD_SIZE, validator=_in_range(KiB, 16 * MiB)
    )
    # Seconds to open a TCP connection to the upstream; past it: 504.
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    # Seconds from the end of the request body to the upstream's response
    # head; past it: 504. Generous, as for nginx's proxy_read_timeout.
    upstream_timeout: float = attrs.field(default=60.0, validator=_positive)

    # --- Access control and request limits (see _policy and _framing) ---
    # Client networks that may use the proxy; others get 403.
    allow: tuple[IPNetwork, ...] = attrs.field(default=LOOPBACK_NETWORKS, converter=parse_networks)
    # Ports CONNECT may reach, as inclusive ranges; others get 403.
    connect_ports: tuple[PortRange, ...] = attrs.field(
        default=DEFAULT_CONNECT_PORTS, converter=parse_port_ranges
    )
    # "USER:PASSWORD" for Basic proxy authentication, or None for none.
    # Kept out of repr so that it never reaches a log.
    auth: str | None = attrs.field(default=None, repr=False, validator=_credentials)
    # Header fields per request head; more get 431.
    max_header_fields: int = attrs.field(
        default=DEFAULT_MAX_HEADER_FIELDS, validator=_in_range(1, 10_000)
    )
    # Bytes of the request target; longer gets 414. Checked while the request
    # line arrives, so it fires before the 431 of max_head_size as long as it
    # is smaller than max_head_size minus the request line's other bytes.
    max_target_length: int = attrs.field(
        default=DEFAULT_MAX_TARGET_LENGTH, validator=_in_range(16, 16 * MiB)
    )

    @property
    def credentials(self) -> bytes | None:
        """``auth`` as the bytes Basic credentials carry, or None."""
        return None if self.auth is None else parse_credentials(self.auth)

    @property
    def head_limits(self) -> HeadLimits:
        """The limits a request head is checked against."""
        return HeadLimits(
            max_head_size=self.max_head_size,
            max_header_fields=self.max_header_fields,
            max_target_length=self.max_target_length,
        )

    @property
    def mode(self) -> str:
        """``"reverse"`` with a fixed upstream, else ``"forward"``."""
        return "forward" if self.upstream is None else "reverse"

    @property
    def max_buffered_per_direction(self) -> int:
        """The payload bytes one direction of one exchange may hold."""
        return (self.buffer_chunks + 2) * self.read_size
