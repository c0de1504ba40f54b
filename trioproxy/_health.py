"""Active health checks: ask every server of a group for a path, now and then.

A group with ``health_check = "/healthz"`` has each of its servers asked
``GET /healthz`` every ``health_interval`` seconds, each time on a new
connection (never a pooled one: the question is whether a new connection
works, and a check must not take a connection a request could use), within
``health_timeout`` seconds, connecting included. A 2xx or 3xx answer passes;
anything else fails: another status, a refused or reset connection, an
answer that is not HTTP, silence. A server that fails is held out of its
group (``UpstreamGroup.mark_down``) until a check passes (``mark_up``). This
is independent of passive health (``_balance``): a server takes requests
when neither holds it out.

The first round runs at once, so a server that is down when the proxy starts,
or when a reload adds it, is out within ``health_timeout``; until then it is
in, as a server without checks would be. Rounds start every
``health_interval`` seconds, whatever one takes (a check that takes longer
than the interval delays the next round of its group, never piles rounds up).

Only the response head is read; the check's connection is closed after it
(``Connection: close`` asks the server to do the same).

Memory: per group that is checked, one task and one nursery; per check in
flight, one connection and its h11 buffer (at most ``max_head_size``).
"""

from __future__ import annotations

import logging

import h11
import trio

from ._balance import GroupSpec, ServerState, UpstreamGroup, UpstreamServer
from ._errors import ProxyError
from ._front import Front
from ._pool import UpstreamPool
from ._upstream import OpenUpstream, UpstreamConnector

logger = logging.getLogger("trioproxy")

USER_AGENT = b"trioproxy-health-check"


async def check_server(
    connector: UpstreamConnector, server: UpstreamServer, path: str
) -> str | None:
    """Ask ``server`` for ``path`` once, on a new connection.

    The caller bounds the time (``health_timeout``).

    Returns:
        None when the server passes (2xx or 3xx), else why it failed.
    """
    try:
        upstream = await connector.connect(server.host, server.port, tls=server.scheme == "https")
    except ProxyError as exc:
        return exc.message
    endpoint = upstream.endpoint
    try:
        request = h11.Request(
            method="GET",
            target=path.encode("ascii"),
            headers=[
                (b"Host", server.authority.encode("ascii")),
                (b"User-Agent", USER_AGENT),
                (b"Connection", b"close"),
            ],
        )
        await endpoint.send_head(request, end=True)
        while True:
            event = await endpoint.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                return None if 200 <= status < 400 else f"answered {status}"
            if not isinstance(event, h11.InformationalResponse):
                return f"sent {type(event).__name__} instead of a response"
    except ProxyError as exc:
        return exc.message
    finally:
        await connector.discard(upstream)


async def _check_one(
    group: UpstreamGroup, state: ServerState, spec: GroupSpec, connector: UpstreamConnector
) -> None:
    """Check one server and hold it out, or let it back in, accordingly."""
    assert spec.health_check is not None
    failure: str | None = f"no answer within {spec.health_timeout:g} s"
    with trio.move_on_after(spec.health_timeout):
        failure = await check_server(connector, state.server, spec.health_check)
    if failure is None:
        if state.held_down:
            logger.warning(
                "upstream %s: %s passed its health check; back in", group.name, state.server
            )
        group.mark_up(state)
        return
    if not state.held_down:
        logger.warning(
            "upstream %s: %s failed its health check (%s); out until it passes",
            group.name,
            state.server,
            failure,
        )
    group.mark_down(state)


async def check_group_forever(
    group: UpstreamGroup, spec: GroupSpec, connector: UpstreamConnector
) -> None:
    """Check every server of ``group`` each ``spec.health_interval`` seconds,
    until cancelled."""
    while True:
        round_started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for state in group.states:
                nursery.start_soon(_check_one, group, state, spec, connector)
        await trio.sleep_until(round_started + spec.health_interval)


async def check_front_forever(front: Front, open_upstream: OpenUpstream) -> None:
    """Run the health checks of every group of ``front`` that asks for them,
    until cancelled (a reload cancels them and starts the new front's)."""
    connector = UpstreamConnector(front.config, open_upstream, UpstreamPool(max_idle=0))
    async with trio.open_nursery() as nursery:
        for spec in front.specs:
            if spec.health_check is not None:
                nursery.start_soon(check_group_forever, front.groups[spec.name], spec, connector)
