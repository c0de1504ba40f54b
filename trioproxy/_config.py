"""ProxyConfig: every size, limit and timeout in one frozen, validated value.

The CLI only builds a ProxyConfig; embedding applications build one directly.
Validation happens here, once, with messages a person can act on, so that the
rest of the code can trust every field.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs

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


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


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

    @property
    def mode(self) -> str:
        """``"reverse"`` with a fixed upstream, else ``"forward"``."""
        return "forward" if self.upstream is None else "reverse"

    @property
    def max_buffered_per_direction(self) -> int:
        """The payload bytes one direction of one exchange may hold."""
        return (self.buffer_chunks + 2) * self.read_size
