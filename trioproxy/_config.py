"""ProxyConfig: every size, limit and timeout in one frozen, validated value.

The CLI only builds a ProxyConfig; embedding applications build one directly.
Validation happens here, once, with messages a person can act on, so that the
rest of the code can trust every field.

Each setting is written once, as one field: its type, default, validator and
the reason for its default, plus ``metadata=setting(...)`` with how a person
writes it (flag, help, metavar, parser, group). The CLI's argparse parser and
``config_from_args`` are generated from these fields (``_cli``); a config
file (``_configfile``) and its documentation (``docs/config.md``, made by
``_configdoc``) are too: ``all_settings()`` lists them. Adding a setting is
adding a field.

Upstream groups and routes (``upstreams``, ``routes``) are fields with no
flag: a config file's ``[upstream.NAME]`` tables and ``[[route]]`` array
write them, and ``--upstream URL`` is their one-line form
(``groups_and_routes``).

Why metadata on ``attrs.field`` and not a ``setting()`` that returns the
field: mypy's attrs plugin reads converters only from ``attrs.field`` itself,
so behind a wrapper ``ProxyConfig(upstream="http://...")`` would stop type
checking. Why not ``listen: tuple[str, int]``: ``listen_host`` and
``listen_port`` are public fields; ``--listen`` sets both (``Setting.fields``).

Fields are grouped by what they bound (``GROUPS``). Sizes and durations are
parsed by ``_units``, with one rule for every flag and script.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import attrs

from ._balance import GroupSpec, UpstreamServer
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
from ._routes import RouteTable
from ._units import parse_duration, parse_size

KiB = 1024
MiB = 1024 * KiB

# Defaults other modules import too. Why each is what it is: at its field.
DEFAULT_READ_SIZE = 64 * KiB
DEFAULT_BUFFER_CHUNKS = 4
DEFAULT_MAX_HEAD_SIZE = 64 * KiB
DEFAULT_MAX_BUFFER_MEMORY = 64 * MiB
DEFAULT_MAX_HEADER_FIELDS = 100
DEFAULT_MAX_TARGET_LENGTH = 8 * KiB

# Credentials on the command line are visible to every user in ps.
AUTH_ENVIRONMENT_VARIABLE = "TRIOPROXY_AUTH"

# ---- How a setting is written ---------------------------------------------

# How a value is written in a config file, by ``Setting.kind``.
KINDS = {
    "text": "string",
    "size": 'size: bytes, or a string such as "64KiB"',
    "duration": 'duration: seconds, or a string such as "20s"',
    "count": "integer",
    "flag": "boolean",
    "list": "array of strings",
}

GROUPS = {
    "listen": "where the proxy listens, and in how many processes",
    "limits": "how much one client may ask of the proxy",
    "timeouts": "how long each wait may last (then an error status or a close)",
    "memory": "payload bytes held per direction of an exchange and in all",
    "upstream": "where requests go (an origin, a parent proxy) and what is kept open",
    "tls": "TLS on the listener (an HTTPS server or proxy) and to https:// upstreams",
    "access": "who may use the proxy and where CONNECT may go",
    "logging": "diagnostics, the access log and metrics",
}
"""Group name -> what its settings bound, in ``--help`` order."""

_METADATA_KEY = "trioproxy.setting"
_A = TypeVar("_A", bound=attrs.AttrsInstance)


@attrs.frozen(kw_only=True)
class Setting:
    """One setting as a person writes it, taken from a field definition.

    ``setting(...)`` writes the part that sits in the field's metadata;
    ``settings_of`` completes ``fields`` and ``default`` from the field.

    Attributes:
        flag: the command-line flag, ``--read-size``.
        group: what it bounds, a key of ``GROUPS``.
        help: one line for ``--help``, saying what the value does.
        parse: text -> value, raising ValueError with a message; None: the
            text itself (the field's converter, if any, parses it).
        show: value -> text that ``parse`` reads back, for ``--help`` and
            docs; None: ``str``.
        metavar: the value's name in ``--help``.
        choices: the only texts allowed, or None.
        action: ``"store"``; ``"append"`` for a repeatable flag whose values
            form a list; ``"store_true"`` for a flag that turns a bool field
            on; ``"store_false"`` for a ``--no-`` flag that turns a
            bool field off.
        env: an environment variable read when the flag is not given.
        fields: the fields the value sets. One, or several for a flag whose
            parsed value is a tuple spread over them in order (``--listen``
            sets ``listen_host`` and ``listen_port``).
        default: the value when it is not given (a tuple when spread).
        value_kind: for ``text`` settings, what the text is: ``size``,
            ``duration`` or ``count`` (a config file takes those as numbers
            too); see ``kind``.
        restart: a reload cannot change it (it is bound to a listening
            socket, the process count or a structure sized at start): a
            changed value is reported and the old one kept.
    """

    flag: str
    group: str
    help: str
    parse: Callable[[str], Any] | None = None
    show: Callable[[Any], str] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    action: Literal["store", "append", "store_false", "store_true"] = "store"
    env: str | None = None
    fields: tuple[str, ...] = ()
    default: Any = None
    value_kind: Literal["text", "size", "duration", "count"] = "text"
    restart: bool = False

    @property
    def kind(self) -> str:
        """How a config file writes the value, a key of ``KINDS``."""
        if self.action in ("store_true", "store_false"):
            return "flag"
        if self.action == "append":
            return "list"
        return self.value_kind

    @property
    def key(self) -> str:
        """The name in argparse's namespace and in a config file: the flag
        without ``--``, ``_`` for ``-`` (``read_size``); for a ``--no-`` flag,
        the bool field it turns off (``splice``)."""
        if self.action == "store_false":
            return self.fields[0]
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def default_text(self) -> str | None:
        """The default as it would be written, or None when there is none."""
        if self.default is None:
            return None
        return (self.show or str)(self.default)

    def assign(self, value: Any) -> dict[str, Any]:
        """The keyword arguments that set this setting to ``value``."""
        if len(self.fields) == 1:
            return {self.fields[0]: value}
        return dict(zip(self.fields, value, strict=True))


def setting(
    flag: str,
    *,
    group: str,
    help: str,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    action: Literal["store", "append", "store_false", "store_true"] = "store",
    env: str | None = None,
    sets: tuple[str, ...] = (),
    kind: Literal["text", "size", "duration", "count"] = "text",
    restart: bool = False,
) -> dict[str, Setting]:
    """Field metadata that makes an attrs field a setting: ``attrs.field(...,
    metadata=setting("--read-size", group="memory", ...))``. See ``Setting``
    for the arguments; ``sets`` is its ``fields`` when that is not just the
    field itself, ``kind`` its ``value_kind``."""
    if group not in GROUPS:
        raise ValueError(f"{flag}: unknown group {group!r}; one of {', '.join(GROUPS)}")
    spec = Setting(
        flag=flag,
        group=group,
        help=help,
        parse=parse,
        show=show,
        metavar=metavar,
        choices=choices,
        action=action,
        env=env,
        fields=sets,
        value_kind=kind,
        restart=restart,
    )
    return {_METADATA_KEY: spec}


def settings_of(cls: type[attrs.AttrsInstance]) -> tuple[Setting, ...]:
    """The settings of an attrs class, in field order."""
    defaults = {field.name: field.default for field in attrs.fields(cls)}
    found = []
    for field in attrs.fields(cls):
        spec = field.metadata.get(_METADATA_KEY)
        if spec is None:
            continue
        names = spec.fields or (field.name,)
        default = tuple(defaults[name] for name in names) if len(names) > 1 else field.default
        found.append(attrs.evolve(spec, fields=names, default=default))
    return tuple(found)


def from_values(cls: type[_A], values: Mapping[str, Any], **fields: Any) -> _A:
    """Build ``cls`` from setting values by key (``Setting.key``), and
    ``fields`` that no flag sets (``upstreams``, ``routes``).

    A value that is missing, None or empty falls back to the setting's
    environment variable, if it has one, and then to the field's default.

    Raises:
        ValueError: from the class's validation, naming the field.
    """
    kwargs: dict[str, Any] = {}
    for spec in settings_of(cls):
        value = values.get(spec.key)
        if (value is None or value == "") and spec.env is not None:
            value = os.environ.get(spec.env) or None
        if value is not None:
            kwargs.update(spec.assign(value))
    return cls(**kwargs, **fields)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; an empty host is 127.0.0.1.

    Raises:
        ValueError: if there is no ``:PORT``.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    return host or "127.0.0.1", int(port)


def format_listen(address: tuple[str, int]) -> str:
    """Inverse of ``parse_listen``: brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_port_ranges(ranges: tuple[PortRange, ...]) -> str:
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def _format_networks(networks: tuple[IPNetwork, ...]) -> str:
    return ",".join(str(network) for network in networks)


# ---- Validators -------------------------------------------------------------


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
    """A fixed origin for reverse mode: ``http://host:port``, or
    ``https://host:port`` (``tls``: TLS to it, see ``_tls_legs``)."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        """Parse ``http://host[:port]`` or ``https://host[:port]`` (no path,
        query or credentials; the port defaults to 80 or 443).

        Raises:
            ValueError: with a message saying what is wrong with ``url``.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"upstream must be an http:// or https:// URL, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"upstream URL must not carry credentials, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"upstream URL must not have a path or query, got {url!r}")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise ValueError(f"upstream URL has an invalid port: {url!r}") from None
        if not parts.hostname:
            raise ValueError(f"upstream URL has no host: {url!r}")
        return cls(host=parts.hostname, port=port, tls=tls)

    @property
    def authority(self) -> str:
        """``host:port`` as it goes into a Host field (IPv6 in brackets; the
        port left out when it is the scheme's default)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.tls else 80) else f"{host}:{self.port}"


# The name of the group ``--upstream URL`` stands for, in logs and metrics.
DEFAULT_GROUP = "default"


def _as_groups(value: Iterable[GroupSpec]) -> tuple[GroupSpec, ...]:
    return tuple(value)


def _group_names(
    instance: Any, attribute: attrs.Attribute[Any], value: tuple[GroupSpec, ...]
) -> None:
    seen: set[str] = set()
    for spec in value:
        if not isinstance(spec, GroupSpec):
            raise ValueError(f"upstreams must be GroupSpec values, got {spec!r}")
        if spec.name in seen:
            raise ValueError(f"upstream.{spec.name}: the group is defined twice")
        seen.add(spec.name)


def _to_parent_proxy(value: ParentProxy | str | None) -> ParentProxy | None:
    if value is None or isinstance(value, ParentProxy):
        return value
    return ParentProxy.from_url(value)


def _to_upstream(value: Upstream | str | None) -> Upstream | None:
    if value is None or isinstance(value, Upstream):
        return value
    return Upstream.from_url(value)


def _to_paths(values: Any) -> tuple[str, ...]:
    """Files named on the command line (a list) or in Python (any iterable
    of ``str`` or ``os.PathLike``), as a tuple of ``str``."""
    return tuple(os.fspath(value) for value in values)


def _seconds(flag: str, help: str, *, group: str = "timeouts") -> dict[str, Setting]:
    """A duration setting: seconds, or 500ms, 20s, 2m (``parse_duration``)."""
    return setting(
        flag, group=group, parse=parse_duration, metavar="SECONDS", help=help, kind="duration"
    )


def _bytes(flag: str, help: str, *, group: str, restart: bool = False) -> dict[str, Setting]:
    """A size setting: bytes, or 64k, 64KiB, 64kB (``parse_size``)."""
    return setting(
        flag,
        group=group,
        parse=parse_size,
        metavar="BYTES",
        help=help,
        kind="size",
        restart=restart,
    )


def _count(flag: str, help: str, *, group: str, restart: bool = False) -> dict[str, Setting]:
    """A whole number of things (connections, fields, processes)."""
    return setting(
        flag, group=group, parse=int, metavar="N", help=help, kind="count", restart=restart
    )


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

    # ---- listen: where, and in how many processes ----
    listen_host: str = attrs.field(
        default="127.0.0.1",
        metadata=setting(
            "--listen",
            group="listen",
            parse=parse_listen,
            show=format_listen,
            metavar="HOST:PORT",
            help="address to listen on; port 0 picks a free port",
            sets=("listen_host", "listen_port"),
            restart=True,
        ),
    )
    # Set by --listen, with listen_host.
    listen_port: int = attrs.field(default=8080, validator=_in_range(0, 65535))
    # Processes that serve the listening port together, each a whole proxy
    # with its own limits (so max_connections applies per worker). 1 serves
    # in this process with no supervisor. More than one needs SO_REUSEPORT
    # load balancing (Linux). 1024 is far beyond any core count we run on:
    # the cap only turns a typo into an error instead of a fork storm.
    # (Issue 5.3; see _workers.)
    workers: int = attrs.field(
        default=1,
        validator=[_in_range(1, 1024), _several_need_reuse_port],
        metadata=_count(
            "--workers",
            "processes sharing the port (SO_REUSEPORT, Linux), supervised by this one; "
            "limits such as --max-connections apply to each",
            group="listen",
            restart=True,
        ),
    )
    # Open the listening sockets with SO_REUSEPORT, so that other processes
    # of the same user may listen on the same port; set in workers. No flag.
    reuse_port: bool = attrs.field(default=False, validator=_reuse_port_available)

    # ---- limits: what one client may ask for ----
    # Client connections served at once; more wait in the kernel's backlog.
    # Each may hold 2 x (buffer_chunks + 2) x read_size payload bytes (768 KiB
    # with the defaults), so 1024 connections cap payload memory at 768 MiB,
    # and use about 2048 file descriptors (client + upstream).
    max_connections: int = attrs.field(
        default=1024,
        validator=_in_range(1, 1_000_000),
        metadata=_count(
            "--max-connections",
            "client connections served at once; more wait in the kernel's backlog",
            group="limits",
            restart=True,
        ),
    )
    # h11's own default; a request head larger than this gets 431.
    max_head_size: int = attrs.field(
        default=DEFAULT_MAX_HEAD_SIZE,
        validator=_in_range(KiB, 16 * MiB),
        metadata=_bytes(
            "--max-head-size",
            "largest request or response head (larger requests get 431)",
            group="limits",
        ),
    )
    # Header fields per request head; more get 431. Real browsers send 10-40
    # fields; 100 is nginx's and Node's order of magnitude, and bounds
    # per-field work on each head.
    max_header_fields: int = attrs.field(
        default=DEFAULT_MAX_HEADER_FIELDS,
        validator=_in_range(1, 10_000),
        metadata=_count(
            "--max-header-fields",
            "most header fields in a request head (more get 431)",
            group="limits",
        ),
    )
    # Bytes of the request target; longer gets 414. Checked while the request
    # line arrives, so it fires before the 431 of max_head_size as long as it
    # is smaller than max_head_size minus the request line's other bytes.
    # 8 KiB is the request-line limit of nginx (large_client_header_buffers)
    # and Apache (LimitRequestLine); RFC 9112 3 asks for at least 8000 octets.
    max_target_length: int = attrs.field(
        default=DEFAULT_MAX_TARGET_LENGTH,
        validator=_in_range(16, 16 * MiB),
        metadata=_bytes(
            "--max-target-length",
            "longest request target (longer gets 414)",
            group="limits",
        ),
    )

    # ---- timeouts: how long each wait may last ----
    # Seconds to open a TCP connection to the upstream; past it: 504.
    connect_timeout: float = attrs.field(
        default=10.0,
        validator=_positive,
        metadata=_seconds("--connect-timeout", "time to connect to the upstream (then 504)"),
    )
    # Seconds from the end of the request body to the upstream's response
    # head; past it: 504. Generous, as for nginx's proxy_read_timeout.
    upstream_timeout: float = attrs.field(
        default=60.0,
        validator=_positive,
        metadata=_seconds(
            "--upstream-timeout",
            "time from the end of the request to the upstream's response head (then 504)",
        ),
    )
    # Seconds for a whole request head, counted from its first byte (on a new
    # connection: from the accept); past it: 408 and close. It is never
    # extended by trickled bytes, so a slowloris client holds a connection at
    # most this long. 20 s, as Apache's mod_reqtimeout header=20: ample for a
    # head of a few KiB over any real link, short for an attacker.
    header_timeout: float = attrs.field(
        default=20.0,
        validator=_positive,
        metadata=_seconds(
            "--header-timeout",
            "time for a whole request head from its first byte, never extended (then 408)",
        ),
    )
    # Seconds a keep-alive connection may wait for the first byte of its next
    # request; past it: closed silently. nginx's keepalive_timeout is 75 s and
    # browsers keep idle connections for 60-300 s; 75 s lets a browser's
    # periodic requests reuse a connection without holding idle ones forever.
    idle_timeout: float = attrs.field(
        default=75.0,
        validator=_positive,
        metadata=_seconds(
            "--idle-timeout",
            "time a keep-alive connection may wait for its next request (then closed)",
        ),
    )
    # Seconds during a body relay (either direction) in which no byte moves in
    # either direction; past it the exchange ends (504 before the response
    # head, an aborted response after). Like nginx's proxy_read_timeout and
    # send_timeout (60 s each); 120 s gives slow mobile clients room.
    stall_timeout: float = attrs.field(
        default=120.0,
        validator=_positive,
        metadata=_seconds(
            "--stall-timeout",
            "time a body relay or a tunnel may go with no byte moving either way "
            "(then 504, an aborted response, or a closed tunnel)",
        ),
    )
    # Seconds that in-flight requests may take to finish after SIGTERM/SIGINT
    # before they are cancelled; 10 s, as systemd's and Kubernetes' grace
    # periods (90 s and 30 s) leave room for it.
    shutdown_timeout: float = attrs.field(
        default=10.0,
        validator=_non_negative,
        metadata=_seconds(
            "--shutdown-timeout",
            "on SIGTERM/SIGINT, time in-flight requests get before they are cut; "
            "a second signal cuts them at once",
        ),
    )

    # ---- memory: payload bytes per direction and in all ----
    # 64 KiB matches the socket buffer granularity of Linux loopback and keeps
    # the per-read syscall cost small against the copy cost; larger reads buy
    # little throughput and raise the per-connection bound linearly.
    read_size: int = attrs.field(
        default=DEFAULT_READ_SIZE,
        validator=_in_range(KiB, 16 * MiB),
        metadata=_bytes(
            "--read-size",
            "largest chunk read at once",
            group="memory",
        ),
    )
    # Four chunks in flight let the reader run a little ahead of the writer
    # (so a momentary stall on one side does not stop the other) while keeping
    # the bound at (4 + 2) x 64 KiB = 384 KiB per direction.
    buffer_chunks: int = attrs.field(
        default=DEFAULT_BUFFER_CHUNKS,
        validator=_in_range(1, 1024),
        metadata=_count(
            "--buffer-chunks",
            "chunks that may wait for a slow receiver, per direction",
            group="memory",
        ),
    )
    # Payload bytes all connections together may hold; readers wait when it
    # is spent. At least one read_size, or no read could ever start (issue 4).
    # 64 MiB lets ~170 directions fill their whole default 384 KiB channel, or
    # ~1000 hold one 64 KiB chunk, before readers queue; with ~25 MB idle RSS
    # the whole process stays near 128 MiB at a few hundred connections, which
    # fits the smallest common container limits.
    max_buffer_memory: int = attrs.field(
        default=DEFAULT_MAX_BUFFER_MEMORY,
        metadata=_bytes(
            "--max-buffer-memory",
            "payload bytes all connections together may buffer; readers wait beyond it",
            group="memory",
            restart=True,
        ),
    )
    # Move CONNECT/Upgrade tunnels and large Content-Length response bodies
    # socket-to-socket with splice(2) on Linux, through a kernel pipe of
    # max_buffered_per_direction bytes (rounded down to pages): the same
    # bound, in the kernel, and zero payload bytes in user space. Where splice
    # cannot work (TLS, non-socket streams, other systems) or does not pay
    # (small or chunked bodies), the channel relay runs anyway; False forces
    # it. (Issue 5.)
    splice: bool = attrs.field(
        default=True,
        metadata=setting(
            "--no-splice",
            group="memory",
            action="store_false",
            help="never use the zero-copy splice(2) path; always relay through user space",
        ),
    )

    @max_buffer_memory.validator
    def _check_max_buffer_memory(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < self.read_size:
            raise ValueError(
                f"max_buffer_memory must be at least read_size ({self.read_size}), got {value}"
            )

    # ---- upstream: reverse mode's origin and the pool of connections to it ----
    # None: a forward proxy, which goes where each request says.
    upstream: Upstream | None = attrs.field(
        default=None,
        converter=_to_upstream,
        metadata=setting(
            "--upstream",
            group="upstream",
            metavar="URL",
            help="reverse mode: send every request to this http:// or https://host:port "
            "(else: forward proxy, unless a config file defines upstream groups)",
        ),
    )
    # Idle upstream connections kept for reuse, per server; 0 turns pooling
    # off. Only idle ones count: connections in use are bounded by
    # max_connections. 32 absorbs the concurrency one worker sustains (a
    # Python worker is saturated by a few dozen concurrent small exchanges)
    # while holding few slots on the origin, where an idle keep-alive
    # connection can pin a worker (Apache prefork, gunicorn sync). It costs up
    # to 32 descriptors per server.
    upstream_pool_size: int = attrs.field(
        default=32,
        validator=_in_range(0, 100_000),
        metadata=_count(
            "--upstream-pool-size",
            "reverse mode: idle upstream connections kept for reuse, per server "
            "(0: a new one per request)",
            group="upstream",
        ),
    )
    # Idle upstream connections kept in all, whatever the number of servers:
    # the pool's descriptors and memory stay bounded when a config lists many
    # servers. 256 lets eight servers keep full pools of 32; each idle
    # connection is a descriptor and a few KiB (docs/memory.md).
    upstream_pool_total: int = attrs.field(
        default=256,
        validator=_in_range(0, 1_000_000),
        metadata=_count(
            "--upstream-pool-total",
            "reverse mode: idle upstream connections kept in all, over every server",
            group="upstream",
        ),
    )
    # Seconds an idle upstream connection is kept. Below the shortest common
    # origin keep-alive timeout (Apache and Node.js 5 s; nginx 75 s) so that
    # we, not the origin, close it: an origin closing a connection just as we
    # reuse it costs a retry or a 502. 4 s still covers the gaps of a steady
    # load. (gunicorn's 2 s is shorter; the check at checkout catches most of
    # those closes, and the retry the rest for idempotent requests.)
    upstream_idle_timeout: float = attrs.field(
        default=4.0,
        validator=_positive,
        metadata=_seconds(
            "--upstream-idle-timeout",
            "reverse mode: time an idle upstream connection is kept (then closed)",
            group="upstream",
        ),
    )

    # ---- upstream: groups of servers and the routes to them (a config file) ----
    # Groups that routes send requests to, and the routes, tried in order;
    # none: forward mode, or the one group and route --upstream stands for.
    # No flag: a config file's [upstream.NAME] tables and [[route]] array
    # (``_configfile``) or an embedding application write them.
    upstreams: tuple[GroupSpec, ...] = attrs.field(
        default=(), converter=_as_groups, validator=_group_names
    )
    routes: RouteTable | None = attrs.field(default=None)

    @routes.validator
    def _check_routes(self, attribute: attrs.Attribute[Any], value: RouteTable | None) -> None:
        if self.upstream is not None and (value is not None or self.upstreams):
            raise ValueError(
                "upstream: give either one upstream URL or upstream groups with routes, not both"
            )
        if value is None:
            if self.upstreams:
                raise ValueError("route: upstream groups need at least one route to reach them")
            return
        if not value.routes:
            raise ValueError("route: at least one route is needed")
        value.check_upstreams([spec.name for spec in self.upstreams])

    # ---- access: who may use the proxy, where CONNECT may go ----
    # Client networks that may use the proxy; others get 403.
    allow: tuple[IPNetwork, ...] = attrs.field(
        default=LOOPBACK_NETWORKS,
        converter=parse_networks,
        metadata=setting(
            "--allow",
            group="access",
            action="append",
            show=_format_networks,
            metavar="CIDR",
            help="client network allowed to use the proxy (repeatable; default: loopback "
            "only, 127.0.0.0/8 and ::1/128)",
        ),
    )
    # Ports CONNECT may reach, as inclusive ranges; others get 403.
    connect_ports: tuple[PortRange, ...] = attrs.field(
        default=DEFAULT_CONNECT_PORTS,
        converter=parse_port_ranges,
        metadata=setting(
            "--connect-ports",
            group="access",
            show=_format_port_ranges,
            metavar="PORTS",
            help="ports CONNECT may reach, e.g. 443,8443,9000-9100",
        ),
    )
    # "USER:PASSWORD" for Basic proxy authentication, or None for none.
    # Kept out of repr so that it never reaches a log, and read from the
    # environment when the flag is not given, so that ps does not show it.
    auth: str | None = attrs.field(
        default=None,
        repr=False,
        validator=_credentials,
        metadata=setting(
            "--auth",
            group="access",
            env=AUTH_ENVIRONMENT_VARIABLE,
            metavar="USER:PASSWORD",
            help=f"require Basic proxy credentials (better: set {AUTH_ENVIRONMENT_VARIABLE}, "
            "which stays out of ps)",
        ),
    )

    # ---- logging (and metrics; the logs themselves are LogSettings) ----
    # Where to serve /metrics and /debug/memory; None: nowhere. (Issue 4.)
    metrics_listen: tuple[str, int] | None = attrs.field(
        default=None,
        metadata=setting(
            "--metrics",
            group="logging",
            parse=parse_listen,
            show=format_listen,
            metavar="HOST:PORT",
            help="serve Prometheus /metrics and /debug/memory (JSON) on this address; "
            "with --workers N, worker i serves them on PORT + i",
            restart=True,
        ),
    )

    # ---- upstream: a parent proxy for forward mode (see _parent) ----
    # Send forward-mode traffic through this HTTP proxy; None: go direct.
    # Kept out of repr: the URL may carry our credentials for the parent.
    parent_proxy: ParentProxy | None = attrs.field(
        default=None,
        converter=_to_parent_proxy,
        repr=False,
        metadata=setting(
            "--parent-proxy",
            group="upstream",
            metavar="URL",
            help="forward mode: send every request through this "
            "http://[USER:PASSWORD@]HOST:PORT proxy",
        ),
    )
    # Targets that go direct even with a parent: host, .domain or CIDR.
    no_parent_for: tuple[str, ...] = attrs.field(
        default=(),
        converter=parse_no_parent,
        metadata=setting(
            "--no-parent-for",
            group="upstream",
            action="append",
            metavar="HOST|.DOMAIN|CIDR",
            help="a target that goes direct despite --parent-proxy (repeatable)",
        ),
    )

    @parent_proxy.validator
    def _check_parent_proxy(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and self.mode == "reverse":
            raise ValueError("parent_proxy is for forward mode; reverse mode has an upstream")

    # ---- access: HAProxy's PROXY protocol in and out (see _origin) ----
    # Every accepted connection starts with a PROXY protocol header (v1 or
    # v2) from a balancer; the address it carries is the client.
    proxy_protocol: bool = attrs.field(
        default=False,
        metadata=setting(
            "--proxy-protocol",
            group="access",
            action="store_true",
            help="every connection starts with a PROXY protocol header (v1 or v2) "
            "whose address is the client",
        ),
    )
    # Peers that may send that header; a connection from elsewhere is closed.
    proxy_protocol_from: tuple[IPNetwork, ...] = attrs.field(
        default=LOOPBACK_NETWORKS,
        converter=parse_networks,
        metadata=setting(
            "--proxy-protocol-from",
            group="access",
            action="append",
            show=_format_networks,
            metavar="CIDR",
            help="a peer network that may send the PROXY header (repeatable; default: loopback)",
        ),
    )
    # Reverse mode: start each upstream connection with the client's address
    # in a PROXY protocol header of this version; None: send none.
    upstream_send_proxy: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.in_(("v1", "v2"))),
        metadata=setting(
            "--upstream-send-proxy",
            group="upstream",
            choices=("v1", "v2"),
            help="reverse mode: start each upstream connection with a PROXY header of this version",
        ),
    )

    # ---- tls: the listener's certificates, and TLS to upstreams (see _tls_legs) ----
    # Certificate chains (PEM, leaf first) that make every listener speak TLS.
    # Repeat for more certificates, chosen by the client's SNI among their
    # DNS names; the first is the default. Each pairs with the --tls-key of
    # the same position; without --tls-key each file holds its own key too
    # (HAProxy's "crt" form).
    tls_cert: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_paths,
        metadata=setting(
            "--tls-cert",
            group="tls",
            action="append",
            metavar="FILE",
            help="certificate chain (PEM) for TLS on the listener; repeat with --tls-key "
            "for more certificates chosen by SNI (the first is the default)",
        ),
    )
    tls_key: tuple[str, ...] = attrs.field(
        default=(),
        converter=_to_paths,
        metadata=setting(
            "--tls-key",
            group="tls",
            action="append",
            metavar="FILE",
            help="private key (PEM, unencrypted) of the --tls-cert in the same position",
        ),
    )
    # Seconds a client gets to finish its TLS handshake; past it the
    # connection is closed (one log line). A real client needs one or two
    # round trips; 10 s is ample over any link and keeps a stalled or
    # scanning peer from holding a connection slot for long.
    tls_handshake_timeout: float = attrs.field(
        default=10.0,
        validator=_positive,
        metadata=_seconds(
            "--tls-handshake-timeout",
            "time a client has to finish its TLS handshake (then closed)",
            group="tls",
        ),
    )
    # Trust this PEM bundle for upstream certificates instead of the system
    # store: an https:// upstream and forward mode's https:// targets.
    upstream_ca: str | None = attrs.field(
        default=None,
        metadata=setting(
            "--upstream-ca",
            group="tls",
            metavar="FILE",
            help="CA bundle (PEM) that upstream certificates must chain to, instead of "
            "the system's",
        ),
    )
    # Check neither certificates nor names of upstreams. For tests and
    # labs; logged as a warning at start.
    upstream_insecure: bool = attrs.field(
        default=False,
        metadata=setting(
            "--upstream-insecure",
            group="tls",
            action="store_true",
            help="do not verify upstream certificates or host names (logged at start)",
        ),
    )
    # Reverse mode: the name sent as SNI and checked against the https://
    # upstream's certificate, when the URL names it by an address or alias.
    upstream_sni: str | None = attrs.field(
        default=None,
        metadata=setting(
            "--upstream-sni",
            group="tls",
            metavar="NAME",
            help="reverse mode: server name sent to the https:// upstream and checked "
            "against its certificate (default: the URL's host)",
        ),
    )
    # Reverse mode: a client certificate for the https:// upstream. Never
    # sent in forward mode, where it would go to every https:// target.
    upstream_cert: str | None = attrs.field(
        default=None,
        metadata=setting(
            "--upstream-cert",
            group="tls",
            metavar="FILE",
            help="reverse mode: client certificate chain (PEM) for the https:// upstream",
        ),
    )
    upstream_key: str | None = attrs.field(
        default=None,
        metadata=setting(
            "--upstream-key",
            group="tls",
            metavar="FILE",
            help="private key of --upstream-cert, when not in the same file",
        ),
    )

    @tls_key.validator
    def _check_tls_key(self, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
        if value and len(value) != len(self.tls_cert):
            raise ValueError(
                f"tls_key: {len(value)} keys for {len(self.tls_cert)} certificates; give one "
                "--tls-key per --tls-cert, or none (keys inside the certificate files)"
            )

    @upstream_insecure.validator
    def _check_upstream_insecure(self, attribute: attrs.Attribute[Any], value: bool) -> None:
        if value and self.upstream_ca is not None:
            raise ValueError("upstream_insecure and upstream_ca contradict each other")

    @upstream_sni.validator
    def _check_upstream_sni(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and (self.upstream is None or not self.upstream.tls):
            raise ValueError("upstream_sni needs an https:// upstream")

    @upstream_cert.validator
    def _check_upstream_cert(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and (self.upstream is None or not self.upstream.tls):
            raise ValueError("upstream_cert needs an https:// upstream (reverse mode)")

    @upstream_key.validator
    def _check_upstream_key(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and self.upstream_cert is None:
            raise ValueError("upstream_key needs upstream_cert")

    @property
    def tls_pairs(self) -> tuple[tuple[str, str], ...]:
        """The listener's ``(certificate, key)`` files, in order; empty without TLS."""
        keys = self.tls_key or self.tls_cert
        return tuple(zip(self.tls_cert, keys, strict=True))

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
        """``"reverse"`` with an upstream or routes, else ``"forward"``."""
        return "forward" if self.upstream is None and self.routes is None else "reverse"

    @property
    def pool_caps(self) -> tuple[int, int]:
        """Idle upstream connections kept ``(in all, per server)``: none in
        forward mode without a parent proxy, where requests go anywhere."""
        if self.mode == "forward" and self.parent_proxy is None:
            return 0, 0
        return self.upstream_pool_total, self.upstream_pool_size

    def groups_and_routes(self) -> tuple[tuple[GroupSpec, ...], RouteTable | None]:
        """The groups and routes requests follow: the configured ones, or for
        ``upstream`` (``--upstream URL``) one group ``default`` of that one
        server and one default route to it. None in forward mode."""
        if self.upstream is None:
            return self.upstreams, self.routes
        scheme: Literal["http", "https"] = "https" if self.upstream.tls else "http"
        server = UpstreamServer(scheme, self.upstream.host, self.upstream.port)
        return (GroupSpec(name=DEFAULT_GROUP, servers=(server,)),), RouteTable.single(DEFAULT_GROUP)

    @property
    def max_buffered_per_direction(self) -> int:
        """The payload bytes one direction of one exchange may hold."""
        return (self.buffer_chunks + 2) * self.read_size

    @property
    def bypass_chunk_size(self) -> int:
        """The largest chunk of a body pumped past h11 (``_body.bypass_body``).

        Its pump holds one chunk in the channel and one in each task's hand,
        so a third of ``max_buffered_per_direction`` keeps that same bound
        (3 x 128 KiB = 384 KiB by default) in half as many reads as
        ``read_size`` chunks would take: each chunk costs the proxy a fixed
        amount of work (a TLS read, a pump step, a write), measured at a
        fifth of its CPU on a TLS upstream's 1 GiB download. Never below
        ``read_size``, and at most half of ``max_buffer_memory``, so that
        the budget can grant it while the chunk before it is held.
        """
        third = self.max_buffered_per_direction // 3
        return max(self.read_size, min(third, self.max_buffer_memory // 2))


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@attrs.frozen(kw_only=True)
class LogSettings:
    """Where diagnostics and the access log go, and how they look.

    The CLI applies them to the ``logging`` module (``_cli.configure_logging``);
    an embedding application configures its own logging instead.
    """

    log_level: str = attrs.field(
        default="warning",
        validator=attrs.validators.in_(LOG_LEVELS),
        metadata=setting(
            "--log-level",
            group="logging",
            choices=LOG_LEVELS,
            help="level of the diagnostic log (stderr)",
        ),
    )
    log_format: str = attrs.field(
        default="text",
        validator=attrs.validators.in_(LOG_FORMATS),
        metadata=setting(
            "--log-format",
            group="logging",
            choices=LOG_FORMATS,
            help="format of the diagnostic and access logs",
        ),
    )
    access_log: str = attrs.field(
        default="-",
        metadata=setting(
            "--access-log",
            group="logging",
            metavar="PATH|-|off",
            help="where to append one line per request: a file, - for stderr, or off",
        ),
    )
    # Bytes of access lines that may wait to be written together, as nginx's
    # access_log buffer=; 0 writes each line as its exchange ends (through
    # logging). Lines wait at most 1 s and are written at shutdown; a crash
    # that kills the process outright (SIGKILL, the OOM killer) loses at most
    # the last second's lines and at most this many bytes. 4 KiB (PIPE_BUF)
    # holds ~30 lines for one write(2): past that the per-line cost no longer
    # shows, and a write that size stays atomic on a pipe shared by workers.
    # An embedding application's access log stays on the logging module.
    access_log_buffer: int = attrs.field(
        default=4 * KiB,
        validator=_in_range(0, 16 * MiB),
        metadata=_bytes(
            "--access-log-buffer",
            "access lines held to be written together, each for at most 1 s "
            "(a crash that kills the process may lose them); 0: every line at once",
            group="logging",
        ),
    )


SETTINGS_CLASSES: tuple[type[attrs.AttrsInstance], ...] = (ProxyConfig, LogSettings)
"""The classes whose fields are settings: what a command line or a config file sets."""


def all_settings() -> tuple[Setting, ...]:
    """Every setting, grouped in ``GROUPS`` order, in field order within a group.

    The one list the CLI, a config file's schema and its documentation are
    made from.
    """
    found = [spec for cls in SETTINGS_CLASSES for spec in settings_of(cls)]
    order = list(GROUPS)
    return tuple(sorted(found, key=lambda spec: order.index(spec.group)))


def keep_restart_settings(old: ProxyConfig, new: ProxyConfig) -> tuple[ProxyConfig, list[str]]:
    """``new`` for a reload: every setting a reload cannot change
    (``Setting.restart``), and the mode, set back to its value in ``old``.

    Returns:
        The configuration to apply, and one line per setting kept, saying
        so ("needs a restart").
    """
    kept: dict[str, Any] = {}
    notes: list[str] = []
    for spec in settings_of(ProxyConfig):
        before = tuple(getattr(old, name) for name in spec.fields)
        if not spec.restart or before == tuple(getattr(new, name) for name in spec.fields):
            continue
        kept.update(zip(spec.fields, before, strict=True))
        shown = (spec.show or str)(before if len(before) > 1 else before[0])
        notes.append(f"{spec.key}: changing it needs a restart; keeping {shown}")
    if old.mode != new.mode:
        # The pool and the checks made per connection are set up for a mode.
        for name in ("upstream", "upstreams", "routes", "parent_proxy", "no_parent_for"):
            kept[name] = getattr(old, name)
        notes.append(
            f"switching between forward and reverse mode needs a restart; "
            f"keeping {old.mode} mode and its upstreams"
        )
    return attrs.evolve(new, **kept), notes
