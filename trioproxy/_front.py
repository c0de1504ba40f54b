"""The front: the routes and the live upstream groups they lead to, as one value
that a reload replaces whole.

A reverse proxy's front is what a request meets first: which group serves it
(``_routes``) and which server of the group (``_balance``). ``Front.build``
makes one from a ``ProxyConfig``: the configured groups and routes, or for
``--upstream URL`` one group ``default`` and one default route, so the
one-line form takes the same path as a config file. In forward mode a front
has no routes and no groups.

Reload. The server keeps the current front in a ``LiveFront``; a reload
builds a new front from the new configuration and swaps the reference.
Each exchange takes the current front once, when it starts, and keeps it:
an exchange in flight finishes with the routes, the group and the server it
began with, and the next request on the same connection meets the new
front. Servers that stay in a group of the same name keep their state
(``UpstreamGroup.adopt``): health, failure window, in-flight count. A group
that no longer asks for active health checks lets its servers back in.

No I/O: ``_reload`` swaps fronts, ``_health`` checks servers.

Memory: per front, its routes, one ``UpstreamGroup`` per group (a few
counters per server, see ``_balance``) and the set of server addresses. An
old front lives as long as the last exchange that took it.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._balance import GroupSpec, UpstreamGroup
from ._config import ProxyConfig
from ._routes import RouteTable


@attrs.frozen(eq=False)
class Front:
    """Routes and live groups, built from one configuration.

    Attributes:
        config: the configuration it was built from.
        routes: the routes, tried in order; None in forward mode.
        groups: the live groups, by name.
        specs: the groups as configured, in the order written.
        addresses: ``(host, port)`` of every server of every group.
    """

    config: ProxyConfig
    routes: RouteTable | None
    groups: Mapping[str, UpstreamGroup]
    specs: tuple[GroupSpec, ...]
    addresses: frozenset[tuple[str, int]]

    @classmethod
    def build(cls, config: ProxyConfig, previous: Front | None = None) -> Front:
        """The front of ``config``; with ``previous``, servers that stay in a
        group of the same name keep their state."""
        specs, routes = config.groups_and_routes()
        groups: dict[str, UpstreamGroup] = {}
        for spec in specs:
            group = UpstreamGroup.from_spec(spec)
            old = previous.groups.get(spec.name) if previous is not None else None
            if old is not None:
                group.adopt(old)
                if spec.health_check is None:  # nothing will ever mark them up
                    for state in group.states:
                        group.mark_up(state)
            groups[spec.name] = group
        addresses = frozenset(
            (server.host, server.port) for spec in specs for server in spec.servers
        )
        return cls(config, routes, groups, specs, addresses)

    @property
    def reverse(self) -> bool:
        """True when requests follow routes; False for a forward proxy."""
        return self.routes is not None

    def group_for(self, host: bytes | None, path: bytes) -> UpstreamGroup | None:
        """The group of the first route ``host`` and ``path`` match (see
        ``RouteTable.match``), or None: answer 404."""
        if self.routes is None:
            return None
        route = self.routes.match(host, path)
        return None if route is None else self.groups[route.upstream]

    def serves(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is a server of this front (an idle connection
        to it is worth keeping)."""
        return (host, port) in self.addresses


class LiveFront:
    """The front that new exchanges take; a reload replaces ``current``.

    Attributes:
        current: the front of the configuration in force.
    """

    def __init__(self, front: Front) -> None:
        self.current = front

    @classmethod
    def of(cls, config: ProxyConfig) -> LiveFront:
        """A live front of ``config``, for a server or a lone connection."""
        return cls(Front.build(config))
