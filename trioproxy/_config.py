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


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value!r}")


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

    # --- Safe to expose: timeouts, limits, shutdown (issue 3) ---
    # Seconds for a whole request head, counted from its first byte (on a new
    # connection: from the accept); past it: 408 and close. It is never
    # extended by trickled bytes, so a slowloris client holds a connection at
    # most this long. 20 s, as Apache's mod_reqtimeout header=20: ample for a
    # head of a few KiB over any real link, short for an attacker.
    header_timeout: float = attrs.field(default=20.0, validator=_positive)
    # Seconds a keep-alive connection may wait for the first byte of its next
    # request; past it: closed silently. nginx's keepalive_timeout is 75 s and
    # browsers keep idle connections for 60-300 s; 75 s lets a browser's
    # periodic requests reuse a connection without holding idle ones forever.
    idle_timeout: float = attrs.field(default=75.0, validator=_positive)
    # Seconds during a body relay (either direction) in which no byte moves in
    # either direction; past it the exchange ends (504 before the response
    # head, an aborted response after). Like nginx's proxy_read_timeout and
    # send_timeout (60 s each); 120 s gives slow mobile clients room.
    stall_timeout: float = attrs.field(default=120.0, validator=_positive)
    # Client connections served at once; more wait in the kernel's backlog.
    # Each may hold 2 x (buffer_chunks + 2) x read_size payload bytes (768 KiB
    # with the defaults), so 1024 connections cap payload memory at 768 MiB,
    # and use about 2048 file descriptors (client + upstream).
    max_connections: int = attrs.field(default=1024, validator=_in_range(1, 1_000_000))
    # Seconds that in-flight requests may take to finish after SIGTERM/SIGINT
    # before they are cancelled; 10 s, as systemd's and Kubernetes' grace
    # periods (90 s and 30 s) leave room for it.
    shutdown_timeout: float = attrs.field(default=10.0, validator=_non_negative)

    # --- Upstream keep-alive pool, reverse mode (issue 5) ---
    # Idle upstream connections kept for reuse; 0 turns pooling off. Only
    # idle ones count: connections in use are bounded by max_connections.
    # 32 absorbs the concurrency one worker sustains (a Python worker is
    # saturated by a few dozen concurrent small exchanges) while holding few
    # slots on the origin, where an idle keep-alive connection can pin a
    # worker (Apache prefork, gunicorn sync). It costs up to 32 descriptors.
    upstream_pool_size: int = attrs.field(default=32, validator=_in_range(0, 100_000))
    # Seconds an idle upstream connection is kept. Below the shortest common
    # origin keep-alive timeout (Apache and Node.js 5 s; nginx 75 s) so that
    # we, not the origin, close it: an origin closing a connection just as we
    # reuse it costs a retry or a 502. 4 s still covers the gaps of a steady
    # load. (gunicorn's 2 s is shorter; the check at checkout catches most of
    # those closes, and the retry the rest for idempotent requests.)
    upstream_idle_timeout: float = attrs.field(default=4.0, validator=_positive)

    @property
    def mode(self) -> str:
        """``"reverse"`` with a fixed upstream, else ``"forward"``."""
        return "forward" if self.upstream is None else "reverse"

    @property
    def max_buffered_per_direction(self) -> int:
        """The payload bytes one direction of one exchange may hold."""
        return (self.buffer_chunks + 2) * self.read_size
