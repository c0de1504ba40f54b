"""Routes: which upstream group serves a request, by host name and path prefix.

A reverse proxy in front of several services picks the service from the
request: ``api.example.test`` goes to one group of servers, ``/static/`` to
another, everything else to a default. This module is that choice and
nothing else: plain values in, a ``Route`` (or None) out, no I/O.

Rules, and where they come from:

* Routes are tried in order and the first match wins (Caddy's and Envoy's
  order; nginx sorts by specificity instead, which is harder to read off a
  file). A route with neither a host nor a path prefix is the *default*
  route; a route after it could never match, so ``RouteTable`` refuses it.
* Host: exact (``api.example.test``) or a leading wildcard
  (``*.example.test``). Like nginx's ``server_name *.example.org``, the
  wildcard matches any number of labels in its place (``a.example.test``,
  ``a.b.example.test``) and NOT the bare name ``example.test``: write a
  second route for that. Names compare case-insensitively (RFC 9110 4.2.3),
  without the port and without one trailing dot (``example.test.`` is the
  same name written as a fully qualified one). A request without a host
  (HTTP/1.0 without ``Host``) matches only routes without a host condition.
  Names are ASCII: an internationalised name is written in its ``xn--``
  form, as it travels in ``Host``.
* Path prefix: a plain string prefix (``/v1/`` matches ``/v1/users`` but not
  ``/v1``; ``/v1`` would match ``/v10`` too), case-sensitive, compared with
  the path before the query, after percent-decoding (``/%761/`` is ``/v1/``)
  and removing dot segments (RFC 3986 5.2.4: ``/v1/../admin`` is
  ``/admin``). That is what nginx's ``location`` compares, and it keeps a
  request from reaching a route's upstream under a spelling that the
  upstream itself would resolve to another path. Only the choice uses the
  normalised path; the request goes upstream byte for byte. A target that
  is not a path (``OPTIONS *``) matches only routes without a prefix.

Memory: a table holds its routes and nothing else; matching allocates only
the normalised host and path of the one request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs

# A DNS label, lenient as resolvers are: letters, digits, hyphen, and the
# underscore that container and service-discovery names use (RFC 2181 11).
# 63 octets per label, 253 per name (RFC 1035 2.3.4).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_MAX_NAME_LENGTH = 253
_WILDCARD = "*."


def check_host_name(name: str) -> str:
    """Validate a host name or IP literal as it is written in a URL or ``Host``.

    An IPv6 literal may be given with or without brackets; IPv4 literals and
    names are checked label by label. Used for route hosts and upstream
    servers alike.

    Returns:
        The name in lower case, without a trailing dot and without brackets.

    Raises:
        ValueError: saying what is wrong with ``name``.
    """
    bracketed = name.startswith("[") and name.endswith("]")
    bare = name[1:-1] if bracketed else name
    if bracketed or ":" in bare:
        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            raise ValueError(f"{name!r} is not a valid IPv6 address") from None
    lowered = bare.lower().removesuffix(".")
    if not lowered:
        raise ValueError("the host name is empty")
    if len(lowered) > _MAX_NAME_LENGTH:
        raise ValueError(f"host name {name!r} is longer than {_MAX_NAME_LENGTH} characters")
    for label in lowered.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(
                f"host name {name!r} has an invalid label {label!r} "
                "(letters, digits, '-' and '_', 1 to 63 characters, ASCII only)"
            )
    return lowered


def request_host(host: bytes | str | None) -> str | None:
    """The name a request asks for, as routes compare it.

    Drops the port (``Host: api.example.test:8080``), one trailing dot, and
    case. Nothing here rejects a malformed value: one that is not a name
    simply matches no host route.
    """
    if host is None:
        return None
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    if text.startswith("["):
        name = text[: text.find("]") + 1]
        return _normalise_ipv6(name) if name else text.lower()
    return text.partition(":")[0].lower().removesuffix(".")


def _normalise_ipv6(bracketed: str) -> str:
    try:
        return "[" + str(ipaddress.IPv6Address(bracketed[1:-1])) + "]"
    except ValueError:
        return bracketed.lower()


def request_path(target: bytes | str) -> str | None:
    """The path a request asks for, as prefixes compare it.

    Takes an origin-form target (``/a/b?q``): cuts the query, percent-decodes
    (UTF-8; bytes that are not UTF-8 stay as lone surrogates, which match no
    prefix written in a config), and removes dot segments.

    Returns:
        The path, or None when the target is not a path (``*``).
    """
    raw = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else target
    raw = raw.partition(b"?")[0].partition(b"#")[0]
    if not raw.startswith(b"/"):
        return None
    decoded = unquote_to_bytes(raw).decode("utf-8", "surrogateescape")
    return remove_dot_segments(decoded)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: ``/a/./b/../c`` becomes ``/a/c``.

    ``..`` never climbs above the root, and a path that ends in ``.`` or
    ``..`` keeps its trailing slash (``/a/b/..`` is ``/a/``).
    """
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments and segments[-1] in (".", ".."):
        kept.append("")
    return "/" + "/".join(kept)


def _route_host(value: str | None) -> str | None:
    """Validate a route's host as written and return it normalised."""
    if value is None:
        return None
    if value.startswith(_WILDCARD):
        return _WILDCARD + _host_name(value, value[len(_WILDCARD) :])
    if "*" in value:
        raise ValueError(
            f"host {value!r}: a wildcard must be the whole first label, as in '*.example.test'"
        )
    if ":" in value and not value.startswith("["):
        raise ValueError(
            f"host {value!r}: routes match names without a port (drop the port; "
            "write an IPv6 address in brackets)"
        )
    name = _host_name(value, value)
    return f"[{name}]" if ":" in name else name


def _host_name(written: str, name: str) -> str:
    try:
        return check_host_name(name)
    except ValueError as exc:
        raise ValueError(f"host {written!r}: {exc}") from None


def _path_prefix(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if not value.startswith("/"):
        raise ValueError(f"path_prefix {value!r} must start with '/'")
    if "?" in value or "#" in value:
        raise ValueError(f"path_prefix {value!r}: routes match the path only, not a query")
    if remove_dot_segments(value) != value:
        raise ValueError(f"path_prefix {value!r} has dot segments ('.' or '..'), which no path has")


def _upstream_name(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError("upstream must name an upstream group")


@attrs.frozen(kw_only=True)
class Route:
    """One rule: requests for ``host`` under ``path_prefix`` go to group ``upstream``.

    Attributes:
        upstream: the name of the upstream group that serves the match.
        host: an exact name, ``*.`` and a name, an IP literal (IPv6 in
            brackets), or None for any host. Stored in lower case, without
            a trailing dot.
        path_prefix: a path starting with ``/``, or None for any path.
            Compared with the normalised path (see the module notes), so it
            is written decoded (``/café/``, not ``/caf%C3%A9/``).

    Raises:
        ValueError: for a malformed host or prefix, or an empty upstream name.
    """

    upstream: str = attrs.field(
        validator=_upstream_name,
        metadata={
            "value": "string",
            "help": "the upstream group (an [upstream.NAME] table) that serves the match",
            "example": '"api"',
        },
    )
    host: str | None = attrs.field(
        default=None,
        converter=_route_host,
        metadata={
            "value": "string",
            "help": "match this host (Host field, without the port, any case): an exact name, "
            "or *.example.test for any name under example.test (not example.test itself)",
            "example": '"api.example.test"',
        },
    )
    path_prefix: str | None = attrs.field(
        default=None,
        validator=_path_prefix,
        metadata={
            "value": "string",
            "help": "match paths that start with this (after percent-decoding and removing "
            "dot segments; case-sensitive; the query is not part of it)",
            "example": '"/v1/"',
        },
    )

    @property
    def is_default(self) -> bool:
        """True for a route without conditions: it matches every request."""
        return self.host is None and self.path_prefix is None

    def matches(self, host: str | None, path: str | None) -> bool:
        """Whether a request for ``host`` and ``path``, already normalised by
        ``request_host`` and ``request_path``, takes this route."""
        return self._host_matches(host) and (
            self.path_prefix is None or (path is not None and path.startswith(self.path_prefix))
        )

    def _host_matches(self, host: str | None) -> bool:
        if self.host is None:
            return True
        if host is None:
            return False
        if self.host.startswith(_WILDCARD):
            suffix = self.host[1:]
            return host.endswith(suffix) and len(host) > len(suffix)
        return host == self.host


class RouteError(ValueError):
    """A route table that cannot be used as written.

    Attributes:
        index: the position (from 0) of the route at fault, so that a config
            loader can point at its line.
    """

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"route {index + 1}: {message}")
        self.index = index


def _as_routes(routes: Iterable[Route]) -> tuple[Route, ...]:
    return tuple(routes)


def _reachable(instance: Any, attribute: attrs.Attribute[Any], routes: tuple[Route, ...]) -> None:
    for index, route in enumerate(routes):
        if route.is_default and index + 1 < len(routes):
            raise RouteError(
                index + 1,
                f"comes after the default route (route {index + 1}, which has no host "
                "and no path_prefix), so it can never match",
            )


@attrs.frozen
class RouteTable:
    """Routes in the order they are tried.

    An empty table routes nothing: every request gets the caller's 404.

    Raises:
        RouteError: for a route after the default route.
    """

    routes: tuple[Route, ...] = attrs.field(converter=_as_routes, validator=_reachable)

    @classmethod
    def single(cls, upstream: str) -> RouteTable:
        """One default route: the ``--upstream URL`` form."""
        return cls((Route(upstream=upstream),))

    def match(self, host: bytes | str | None, path: bytes | str) -> Route | None:
        """The first route that ``host`` and ``path`` match, or None (answer 404).

        Args:
            host: the ``Host`` field (or the authority of an absolute-form
                target) as received, port included; None when there is none.
            path: the origin-form request target, query included, as
                received; ``*`` for ``OPTIONS *``.
        """
        name = request_host(host)
        decoded = request_path(path)
        for route in self.routes:
            if route.matches(name, decoded):
                return route
        return None

    def upstream_names(self) -> frozenset[str]:
        """The group names the routes use, for the caller to check against the
        groups it defines."""
        return frozenset(route.upstream for route in self.routes)

    def check_upstreams(self, defined: Collection[str]) -> None:
        """Raise for the first route that names a group not in ``defined``.

        Raises:
            RouteError: naming the route and the missing group.
        """
        for index, route in enumerate(self.routes):
            if route.upstream not in defined:
                raise RouteError(
                    index,
                    f"upstream {route.upstream!r} is not defined (defined: {_names(defined)})",
                )


def _names(names: Iterable[str]) -> str:
    listed = ", ".join(sorted(names))
    return listed or "none"
