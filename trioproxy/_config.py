"""ProxyConfig: every size, limit and timeout in one frozen, validated value.

The CLI only builds a ProxyConfig; embedding applications build one directly.
Validation happens here, once, with messages a person can act on, so that the
rest of the code can trust every field.
"""

from __future__ import annotations

import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import attrs

from ._framing import HeadLimits
from ._parent import ParentProxy, parse_no_parent
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
# The global budget for payload bytes held by all connections together
# (--max-buffer-memory). 64 MiB lets ~170 directions fill their whole default
# 384 KiB channel, or ~1000 hold one 64 KiB chunk, before readers queue; with
# ~25 MB idle RSS the whole process stays near 128 MiB at a few hundred
# connections, which fits the smallest common container limits.
DEFAULT_MAX_BUFFER_MEMORY = 64 * MiB

# Real browsers send 10-40 fields; 100 is nginx's and Node's order of
# magnitude, and bounds per-field work on each head.
DEFAULT_MAX_HEADER_FIELDS = 100
# 8 KiB is the request-line limit of nginx (large_client_header_buffers) and
# Apache (LimitRequestLine); RFC 9112 3 asks for at least 8000 octets.
DEFAULT_MAX_TARGET_LENGTH = 8 * KiB


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be greater than 0, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be 0 or more, got {value!r}")


def reuse_port_balances() -> bool:
    """Whether SO_REUSEPORT spreads new connections over the sockets that share
    a port. Linux (3.9+) does; macOS and the BSDs have an option of that name
    that lets the last socket bound take every connection, so workers there
    would sit idle."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _several_need_reuse_port(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value > 1 and not reuse_port_balances():
        raise ValueError(
            f"{attribute.name} > 1 needs SO_REUSEPORT load balancing, which this platform "
            f"({sys.platform}) lacks; got {value!r}"
        )


def _reuse_port_available(instance: Any, attribute: attrs.Attribute[Any], value: bool) -> None:
    if value and not reuse_port_balances():
        raise ValueError(
            f"{attribute.name} needs SO_REUSEPORT load balancing, which this platform "
            f"({sys.platform}) lacks"
        )


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


def _to_parent_proxy(value: ParentProxy | str | None) -> ParentProxy | None:
    if value is None or isinstance(value, ParentProxy):
        return value
    return ParentProxy.from_url(value)


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
    # --- memory budget and metrics (issue 4) ---
    # Payload bytes all connections together may hold; readers wait when it
    # is spent. At least one read_size, or no read could ever start.
    max_buffer_memory: int = attrs.field(default=DEFAULT_MAX_BUFFER_MEMORY)
    # Where to serve /metrics and /debug/memory; None: nowhere.
    metrics_listen: tuple[str, int] | None = None

    @max_buffer_memory.validator
    def _check_max_buffer_memory(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < self.read_size:
            raise ValueError(
                f"max_buffer_memory must be at least read_size ({self.read_size}), got {value}"
            )

    # --- end memory budget and metrics ---

    # --- Zero-copy relay (issue 5) ---
    # Move CONNECT/Upgrade tunnels and large Content-Length response bodies
    # socket-to-socket with splice(2) on Linux, through a kernel pipe of
    # max_buffered_per_direction bytes (rounded down to pages): the same
    # bound, in the kernel, and zero payload bytes in user space. Where splice
    # cannot work (TLS, non-socket streams, other systems) or does not pay
    # (small or chunked bodies), the channel relay runs anyway; False forces it.
    splice: bool = True

    # --- Multi-core workers (issue 5.3; see _workers) ---
    # Processes that serve the listening port together, each a whole proxy
    # with its own limits (so max_connections applies per worker). 1 serves
    # in this process with no supervisor. More than one needs SO_REUSEPORT
    # load balancing (Linux). 1024 is far beyond any core count we run on:
    # the cap only turns a typo into an error instead of a fork storm.
    workers: int = attrs.field(default=1, validator=[_in_range(1, 1024), _several_need_reuse_port])
    # Open the listening sockets with SO_REUSEPORT, so that other processes
    # of the same user may listen on the same port; set in workers.
    reuse_port: bool = attrs.field(default=False, validator=_reuse_port_available)

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

    # --- Parent proxy, forward mode (see _parent) ---
    # Send forward-mode traffic through this HTTP proxy; None: go direct.
    parent_proxy: ParentProxy | None = attrs.field(
        default=None, converter=_to_parent_proxy, repr=False
    )

    @parent_proxy.validator
    def _check_parent_proxy(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and self.upstream is not None:
            raise ValueError("parent_proxy is for forward mode; reverse mode has an upstream")

    # Targets that go direct even with a parent: host, .domain or CIDR.
    no_parent_for: tuple[str, ...] = attrs.field(default=(), converter=parse_no_parent)

    # --- PROXY protocol (see _proxy_protocol) ---
    # Every accepted connection starts with a PROXY protocol header (v1 or
    # v2) from a balancer; the address it carries is the client.
    proxy_protocol: bool = False
    # Peers that may send that header; a connection from elsewhere is closed.
    proxy_protocol_from: tuple[IPNetwork, ...] = attrs.field(
        default=LOOPBACK_NETWORKS, converter=parse_networks
    )
    # Reverse mode: start each upstream connection with the client's address
    # in a PROXY protocol header of this version; None: send none.
    upstream_send_proxy: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(("v1", "v2")))
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
