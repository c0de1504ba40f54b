"""Upstream groups: which server of a group takes the next request, and which
servers are out of rotation.

Sans-I/O: the caller passes the time (``trio.current_time()`` in the
server, any float in tests) and tells the group what happened; the group
never sleeps, connects or imports trio.

Balancing. ``round_robin`` (the default) walks the servers in order, skipping
those that are out. ``least_conn`` takes the server with the fewest attempts
in flight, ties going to the round-robin order, so an idle group spreads
like round robin and a server holding slow responses gets fewer new ones
(nginx's ``least_conn``).

Passive health, nginx's ``max_fails`` / ``fail_timeout``:

* What fails is the caller's verdict on an attempt: a connect failure, a
  TLS failure, or a reset before the response head (``report(ok=False)``);
  a response head, whatever its status, is a success. A client that goes
  away before a verdict gives none.
* ``max_fails`` failures within ``fail_timeout`` seconds (a sliding window:
  the last ``max_fails`` failure times are kept) take the server out for
  ``fail_timeout`` seconds. nginx documents this rule; its code counts a
  run of failures that successes interrupt only after ``fail_timeout``,
  which can take out a server whose failures were further apart. We do
  what the documentation says. ``max_fails = 0`` turns passive health off.
* After that time ONE attempt tries the server again (half-open): while
  that probe is in flight, no other request goes to it. A success puts the
  server back; a failure takes it out for another ``fail_timeout``. A probe
  that ends without a verdict lets the next request probe instead.
* Verdicts of attempts that started before the server was taken out (a
  slow connect that times out later) change nothing: they are old news
  about a server that has since been judged. Each take-down starts a new
  epoch, and an attempt remembers the epoch it started in.
* A group of one server is never taken out by passive health (nginx does
  the same): there is nowhere else to send the request, so trying costs
  less than refusing. This keeps the ``--upstream URL`` form as it was.
* When every server is out, ``pick`` returns None and the caller answers
  502 at once: nothing waits for a server to come back.

Active health (``mark_down`` / ``mark_up``) is a separate, independent
reason to keep a server out: a server takes requests when neither holds it
out.

Retry. ``may_retry_on_next_server`` decides whether a failed attempt may be
repeated once on another server (``next_after``), as nginx's
``proxy_next_upstream error`` with its non-idempotent rule does.

Reload. A group is rebuilt from its ``GroupSpec`` when the configuration
changes; ``adopt`` hands it the ``ServerState`` objects of the servers that
stay, so their health, failure window and in-flight count carry over and
attempts begun before the reload finish against the same counters.

Memory: per server, the last ``max_fails`` failure times (at most
``MAX_FAILS_LIMIT`` floats) and seven scalars; per group, one cursor; per
exchange, one ``Attempt`` that lives as long as the exchange. Nothing grows
with the number of requests.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import attrs

from ._routes import check_host_name
from ._units import parse_duration

# Methods repeated on another server after the upstream connection broke
# before any response byte: the idempotent ones that also change nothing
# (RFC 9110 9.2.1, 9.2.2). PUT and DELETE are idempotent but act; whether
# the first attempt already acted cannot be known, and a repeated DELETE
# answers 404 where the first would have answered 204. Used for both retries:
# on a fresh connection to the same server (``_exchange.may_retry``) and on
# the next server of a group (``_balance``).
RETRY_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

Scheme = Literal["http", "https"]
Balance = Literal["round_robin", "least_conn"]
Health = Literal["up", "down", "probing"]

DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}

# nginx's defaults: one failure takes a server out for ten seconds.
DEFAULT_MAX_FAILS = 1
DEFAULT_FAIL_TIMEOUT = 10.0
# The window keeps one float per counted failure. A hundred failures within
# fail_timeout is far past any sensible threshold (a server failing that
# often is down), and the cap keeps the per-server state a few hundred bytes.
MAX_FAILS_LIMIT = 100


def _bad_url(url: str, problem: str) -> ValueError:
    return ValueError(f"upstream server {url!r}: {problem}")


@attrs.frozen
class UpstreamServer:
    """One server of an upstream group: where to connect, nothing more.

    A server carries no path: routes carry paths, and the request's path
    passes to the server unchanged.

    Attributes:
        scheme: ``http`` or ``https`` (TLS to the server).
        host: a name in lower case, or an IP address (IPv6 without brackets).
        port: the TCP port.
    """

    scheme: Scheme
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> UpstreamServer:
        """Parse ``http://host[:port]`` or ``https://host[:port]`` (a bare ``/``
        path is allowed; the port defaults to 80 or 443).

        Raises:
            ValueError: naming the URL and what is wrong with it: another
                scheme, credentials, a missing host, a bad port, a path, a
                query or a fragment.
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _bad_url(url, f"not a URL ({exc})") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise _bad_url(url, "must start with http:// or https://")
        if "@" in parts.netloc:
            raise _bad_url(url, "must not carry credentials")
        host, port = _host_and_port(url, parts.netloc, DEFAULT_PORTS[parts.scheme])
        if parts.path not in ("", "/"):
            raise _bad_url(url, "must not have a path (servers carry none; routes match paths)")
        if parts.query or parts.fragment:
            raise _bad_url(url, "must not have a query or fragment")
        scheme: Scheme = "https" if parts.scheme == "https" else "http"
        return cls(scheme=scheme, host=host, port=port)

    @property
    def authority(self) -> str:
        """``host[:port]`` for the ``Host`` field: IPv6 in brackets, the port
        left out when it is the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The server as a URL, port always written: how logs and metrics
        name it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def _host_and_port(url: str, netloc: str, default_port: int) -> tuple[str, int]:
    if netloc.startswith("["):
        end = netloc.find("]") + 1
        host_text, rest = netloc[:end], netloc[end:]
        if rest and not rest.startswith(":"):
            raise _bad_url(url, f"unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        host_text, colon, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if colon else None
    if not host_text:
        raise _bad_url(url, "has no host")
    try:
        host = check_host_name(host_text)
    except ValueError as exc:
        raise _bad_url(url, str(exc)) from None
    if port_text is None:
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise _bad_url(url, f"the port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


@attrs.define(eq=False)
class ServerState:
    """A server of a group and what the group knows about it.

    Attributes:
        server: the server.
        failure_window: the times of its last failures, at most max_fails,
            emptied whenever it is taken out.
        in_flight: attempts picked and not yet finished.
        down_until: while passive health holds the server out (or a probe
            decides), the time it may be probed; None while it is up.
        probing: True while the one probe attempt is in flight.
        held_down: True while the active health check holds it out.
        epoch: how many times passive health took it out.
        requests: attempts ever picked (for metrics).
        failures: failures ever reported (for metrics).
    """

    server: UpstreamServer
    failure_window: deque[float]
    in_flight: int = 0
    down_until: float | None = None
    probing: bool = False
    held_down: bool = False
    epoch: int = 0
    requests: int = 0
    failures: int = 0

    def available(self, now: float) -> bool:
        """Whether a request may be sent to it at ``now`` (as a probe, if it
        was down)."""
        if self.held_down:
            return False
        return self.down_until is None or (now >= self.down_until and not self.probing)

    def health(self) -> Health:
        """``up``, ``down`` (also once its time is over, until a probe
        starts), or ``probing`` (the probe is in flight), for logs and
        metrics."""
        if self.held_down:
            return "down"
        if self.down_until is None:
            return "up"
        return "probing" if self.probing else "down"


@attrs.define(eq=False)
class Attempt:
    """One try of one exchange on one server; hand it back to the group.

    Attributes:
        state: the server's state in its group.
        probe: True when this attempt is the half-open probe.
        epoch: the server's epoch when the attempt started.
        reported: a verdict was given (``UpstreamGroup.report``).
        finished: the attempt ended (``UpstreamGroup.finished``).
    """

    state: ServerState
    probe: bool
    epoch: int
    reported: bool = False
    finished: bool = False

    @property
    def server(self) -> UpstreamServer:
        """The server this attempt goes to."""
        return self.state.server


def _choice(allowed: tuple[str, ...]) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in allowed:
            raise ValueError(f"{attribute.name} must be one of {', '.join(allowed)}, got {value!r}")

    return check


def _max_fails(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"max_fails must be a whole number, got {value!r}")
    if not 0 <= value <= MAX_FAILS_LIMIT:
        raise ValueError(f"max_fails must be between 0 and {MAX_FAILS_LIMIT}, got {value!r}")


def _fail_timeout(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"fail_timeout must be a number of seconds above 0, got {value!r}")


def _as_servers(servers: Iterable[UpstreamServer]) -> tuple[UpstreamServer, ...]:
    return tuple(servers)


def _servers(
    instance: Any, attribute: attrs.Attribute[Any], value: tuple[UpstreamServer, ...]
) -> None:
    if not value:
        raise ValueError("an upstream group needs at least one server")
    seen: set[UpstreamServer] = set()
    for server in value:
        if server in seen:
            raise ValueError(f"server {server} is listed twice")
        seen.add(server)


def _name(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError("an upstream group needs a name")


@attrs.define(eq=False)
class UpstreamGroup:
    """Servers that serve one upstream name, with balancing and passive health.

    Use: ``attempt = group.pick(now)`` (None: answer 502); when the outcome
    is known, ``group.report(attempt, ok=..., now=...)``; when the exchange
    is done with the server, ``group.finished(attempt)``. For the one retry,
    ``group.next_after(attempt, now)`` picks another server.

    Attributes:
        name: the group's name, as routes and logs use it.
        servers: the servers, in round-robin order, each at most once.
        balance: ``round_robin`` or ``least_conn``.
        max_fails: failures within ``fail_timeout`` that take a server out
            (0: never).
        fail_timeout: the window for counting failures, in seconds, and how
            long a server stays out.
        states: per server, what the group knows about it (same order).

    Raises:
        ValueError: for an empty name, no servers, a server listed twice, or
            a bad balance, max_fails or fail_timeout, naming the setting.
    """

    name: str = attrs.field(validator=_name)
    servers: tuple[UpstreamServer, ...] = attrs.field(converter=_as_servers, validator=_servers)
    balance: Balance = attrs.field(
        default="round_robin", kw_only=True, validator=_choice(get_args(Balance))
    )
    max_fails: int = attrs.field(default=DEFAULT_MAX_FAILS, kw_only=True, validator=_max_fails)
    fail_timeout: float = attrs.field(
        default=DEFAULT_FAIL_TIMEOUT, kw_only=True, validator=_fail_timeout
    )
    states: tuple[ServerState, ...] = attrs.field(init=False)
    _cursor: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.states = tuple(
            ServerState(server, deque(maxlen=self.max_fails)) for server in self.servers
        )

    @classmethod
    def from_urls(cls, name: str, urls: Iterable[str], **settings: Any) -> UpstreamGroup:
        """A group of the servers written as URLs; ``settings`` are the
        keyword attributes (balance, max_fails, fail_timeout).

        Raises:
            ValueError: for a bad URL (naming it) or a bad setting.
        """
        return cls(name, tuple(UpstreamServer.from_url(url) for url in urls), **settings)

    @classmethod
    def from_spec(cls, spec: GroupSpec) -> UpstreamGroup:
        """The live group that ``spec`` describes, every server up."""
        return cls(
            spec.name,
            spec.servers,
            balance=spec.balance,
            max_fails=spec.max_fails,
            fail_timeout=spec.fail_timeout,
        )

    def pick(self, now: float) -> Attempt | None:
        """Choose a server for a new exchange and count it in flight.

        Returns:
            The attempt, or None when every server is out: answer 502.
        """
        return self._choose(now, exclude=None)

    def next_after(self, previous: Attempt, now: float) -> Attempt | None:
        """Choose a server other than ``previous``'s, for the one retry.

        Returns:
            The attempt, or None when no other server is available.
        """
        return self._choose(now, exclude=previous.state)

    def report(self, attempt: Attempt, *, ok: bool, now: float) -> None:
        """Give the verdict on ``attempt``: a response head arrived (``ok``), or
        connecting, TLS or the connection failed before it. At most once, and
        before ``finished``.

        Raises:
            RuntimeError: for a second verdict or one after ``finished``.
        """
        if attempt.reported or attempt.finished:
            raise RuntimeError("an attempt gets one verdict, before it is finished")
        attempt.reported = True
        state = attempt.state
        if attempt.probe:
            state.probing = False
            if ok:
                state.down_until = None
            else:
                self._take_out(state, now)
        elif not ok and attempt.epoch == state.epoch:
            self._count_failure(state, now)
        if not ok:
            state.failures += 1

    def finished(self, attempt: Attempt) -> None:
        """The exchange is done with the server (after the body, or after a
        failure). A second call does nothing."""
        if attempt.finished:
            return
        attempt.finished = True
        attempt.state.in_flight -= 1
        if attempt.probe and not attempt.reported:
            attempt.state.probing = False

    def adopt(self, previous: UpstreamGroup) -> None:
        """Take over ``previous``'s state of the servers both groups have.

        For a reload: ``previous`` is the same group as configured before.
        The state objects are shared, not copied, so attempts picked from
        ``previous`` finish against the counters this group balances on.
        A failure window is re-cut to this group's ``max_fails``; a server
        taken out stays out until its time is over.
        """
        kept = {state.server: state for state in previous.states}
        states = []
        for state in self.states:
            old = kept.get(state.server)
            if old is None:
                states.append(state)
                continue
            if old.failure_window.maxlen != self.max_fails:
                old.failure_window = deque(old.failure_window, maxlen=self.max_fails)
            states.append(old)
        self.states = tuple(states)

    def mark_down(self, state: ServerState) -> None:
        """Hold the server out until ``mark_up`` (for an active health check)."""
        state.held_down = True

    def mark_up(self, state: ServerState) -> None:
        """End ``mark_down``; passive health may still hold the server out."""
        state.held_down = False

    def _choose(self, now: float, exclude: ServerState | None) -> Attempt | None:
        candidates = (
            (index, state)
            for index, state in self._rotation()
            if state is not exclude and state.available(now)
        )
        if self.balance == "least_conn":
            chosen = min(candidates, key=lambda pair: pair[1].in_flight, default=None)
        else:
            chosen = next(candidates, None)
        if chosen is None:
            return None
        index, state = chosen
        self._cursor = (index + 1) % len(self.states)
        probe = state.down_until is not None
        state.probing = probe
        state.in_flight += 1
        state.requests += 1
        return Attempt(state, probe=probe, epoch=state.epoch)

    def _rotation(self) -> Iterator[tuple[int, ServerState]]:
        count = len(self.states)
        for offset in range(count):
            index = (self._cursor + offset) % count
            yield index, self.states[index]

    def _count_failure(self, state: ServerState, now: float) -> None:
        if self.max_fails == 0 or len(self.states) == 1:
            return
        window = state.failure_window
        window.append(now)
        if len(window) == self.max_fails and now - window[0] <= self.fail_timeout:
            self._take_out(state, now)

    def _take_out(self, state: ServerState, now: float) -> None:
        state.down_until = now + self.fail_timeout
        state.failure_window.clear()
        state.epoch += 1


# ---- How a group is written: one [upstream.NAME] table of a config file ----

# Active health checks, when a group asks for them (``health_check``). Every
# 5 s, as nginx Plus's and HAProxy's default interval: a dead server is out
# within seconds, and a handful of servers costs a request a second. 2 s to
# answer: a health endpoint answers in milliseconds, so 2 s means a server too
# loaded (or too broken) to take traffic, and a round ends before the next.
DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_HEALTH_TIMEOUT = 2.0


def _to_servers(value: Iterable[UpstreamServer | str]) -> tuple[UpstreamServer, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError('servers must be a list of URLs, such as ["http://127.0.0.1:9001"]')
    servers = []
    for server in value:
        if isinstance(server, str):
            server = UpstreamServer.from_url(server)
        elif not isinstance(server, UpstreamServer):
            raise ValueError(f"servers: {server!r} is not a URL")
        servers.append(server)
    return tuple(servers)


def _to_seconds(value: float | str) -> float:
    """A duration as a config file writes it: a number of seconds or ``"10s"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'expected a duration such as 10 or "10s", got {value!r}')
    return parse_duration(value) if isinstance(value, str) else float(value)


def _seconds_above_zero(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a number of seconds above 0, got {value!r}")


def _health_path(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith("/") or not _PATH.fullmatch(value):
        raise ValueError(f"health_check must be a path starting with '/', got {value!r}")


# A request target's path and query: visible ASCII, no space (RFC 9112 3.2).
_PATH = re.compile(r"[!-~]+")


def _doc(value: str, help: str, example: str) -> dict[str, str]:
    """A table key's documentation, for docs/config.md: how its value is
    written, what it does, an example."""
    return {"value": value, "help": help, "example": example}


@attrs.frozen(kw_only=True)
class GroupSpec:
    """An upstream group as configured: an ``[upstream.NAME]`` table, or the
    group ``default`` that ``--upstream URL`` stands for.

    Immutable; ``UpstreamGroup.from_spec`` makes the live group. Each field
    but ``name`` is a key of the table; its metadata documents it.

    Raises:
        ValueError: naming the key, for a bad value.
    """

    name: str = attrs.field(validator=_name)
    servers: tuple[UpstreamServer, ...] = attrs.field(
        converter=_to_servers,
        validator=_servers,
        metadata=_doc(
            "array of URLs",
            "the group's servers, each http://HOST[:PORT] without a path (routes carry paths)",
            '["http://127.0.0.1:9001", "http://127.0.0.1:9002"]',
        ),
    )
    balance: Balance = attrs.field(
        default="round_robin",
        validator=_choice(get_args(Balance)),
        metadata=_doc(
            "round_robin or least_conn",
            "round_robin: each server in turn; least_conn: the server with the fewest "
            "exchanges in flight",
            '"least_conn"',
        ),
    )
    max_fails: int = attrs.field(
        default=DEFAULT_MAX_FAILS,
        validator=_max_fails,
        metadata=_doc(
            "integer",
            "passive health: this many failures (connect, reset before the response head) "
            "within fail_timeout take a server out for fail_timeout; 0: never",
            "3",
        ),
    )
    fail_timeout: float = attrs.field(
        default=DEFAULT_FAIL_TIMEOUT,
        converter=_to_seconds,
        validator=_fail_timeout,
        metadata=_doc(
            "duration",
            "the window for counting failures, and how long a server stays out; "
            "then one request tries it again",
            '"10s"',
        ),
    )
    health_check: str | None = attrs.field(
        default=None,
        validator=_health_path,
        metadata=_doc(
            "string (a path)",
            "active health: GET this path on every server each health_interval; a server "
            "that does not answer 2xx or 3xx within health_timeout is out until it does",
            '"/healthz"',
        ),
    )
    health_interval: float = attrs.field(
        default=DEFAULT_HEALTH_INTERVAL,
        converter=_to_seconds,
        validator=_seconds_above_zero,
        metadata=_doc("duration", "time between two health checks of a server", '"5s"'),
    )
    health_timeout: float = attrs.field(
        default=DEFAULT_HEALTH_TIMEOUT,
        converter=_to_seconds,
        validator=_seconds_above_zero,
        metadata=_doc("duration", "time a health check may take, connecting included", '"2s"'),
    )

    @classmethod
    def table_keys(cls) -> tuple[attrs.Attribute[Any], ...]:
        """The fields a table may set, in documentation order."""
        return tuple(field for field in attrs.fields(cls) if field.name != "name")


def may_retry_on_next_server(
    method: bytes,
    *,
    has_body: bool,
    sent_any_byte: bool,
    received_any_byte: bool,
    connect_failed: bool,
    already_retried: bool = False,
) -> bool:
    """Whether a failed attempt may be repeated on another server (once).

    * Never after a retry, and never once a byte of the response arrived
      (something may have reached the client; and the server answered).
    * A connect failure (TLS handshake included): yes, for any method, with
      or without a body. The server never saw the request, and the body has
      not been read from the client yet: the exchange must connect before it
      reads the body, which is what makes this safe.
    * Otherwise, the connection broke before any response byte: yes for a
      request without a body whose method changes nothing
      (``RETRY_SAFE_METHODS``), or whose request never left us
      (``sent_any_byte`` False; pass True when unsure). A request with a
      body is not repeated: its body was read from the client once.

    Args:
        method: the request method, as received (methods are case-sensitive).
        has_body: the request has a body (any Content-Length or chunked).
        sent_any_byte: a byte of the request was written to the server.
        received_any_byte: a byte of the response came from the server.
        connect_failed: connecting (TCP or TLS) to the server failed.
        already_retried: this attempt was itself the retry.
    """
    if already_retried or received_any_byte:
        return False
    if connect_failed:
        return True
    return not has_body and (not sent_any_byte or method in RETRY_SAFE_METHODS)
