"""Reload: a new configuration for what comes next, nothing dropped.

``serve_front`` runs beside the server. It runs the active health checks of
the current front (``_health``), and applies every configuration that
arrives on ``reloads`` (the CLI sends one per SIGHUP, once the file has
passed validation; an embedding application may send its own):

1. Settings that cannot change without a restart (``Setting.restart``:
   ``listen``, ``workers``, ``max_connections``, ``max_buffer_memory``,
   ``metrics``; and the mode) keep their value, and each one changed is
   logged as "needs a restart" (``keep_restart_settings``).
2. A new front is built, with the state of the servers that stay
   (``Front.build``), and swapped in (``LiveFront``). Nothing that runs is
   touched: exchanges in flight finish with the front they took; connections
   accepted from now on get the new configuration (timeouts, limits, the
   allow list), and every new exchange, on any connection, the new routes
   and groups.
3. The pool takes the new caps, and closes its idle connections to servers
   that are gone; their connections in use are closed when their exchanges
   end (``_exchange`` does not pool them).
4. The old front's health checks are cancelled and the new front's start.

Memory: one front per configuration still in use by an exchange; the
channel of ``reloads`` is the caller's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable

import trio

from ._config import ProxyConfig, keep_restart_settings
from ._front import Front, LiveFront
from ._health import check_front_forever
from ._pool import UpstreamPool
from ._upstream import OpenUpstream

logger = logging.getLogger("trioproxy")


async def serve_front(
    live: LiveFront,
    reloads: AsyncIterable[ProxyConfig] | None,
    *,
    pool: UpstreamPool,
    open_upstream: OpenUpstream,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the current front's health checks and apply each reload, until
    cancelled (see the module notes).

    Error handling: a configuration is applied whole; one that cannot be
    (a bug) is logged, and the running one stays.
    """
    async with trio.open_nursery() as nursery:
        checks = await nursery.start(_checks_of, live.current, open_upstream)
        task_status.started()
        if reloads is None:
            return
        async for config in reloads:
            try:
                front = apply_reload(live, config, pool)
            except Exception:
                logger.exception("bug: the new configuration could not be applied")
                continue
            closed = await pool.close_idle_except(front.addresses)
            if closed:
                logger.info("reload: closed %d idle connections to removed servers", closed)
            checks.cancel()
            checks = await nursery.start(_checks_of, front, open_upstream)


def apply_reload(live: LiveFront, config: ProxyConfig, pool: UpstreamPool) -> Front:
    """Swap in the front of ``config`` (restart-only settings kept) and give
    the pool its new caps; returns the new front."""
    old = live.current
    kept, notes = keep_restart_settings(old.config, config)
    for note in notes:
        logger.warning("reload: %s", note)
    front = Front.build(kept, previous=old)
    live.current = front
    pool.max_idle, pool.max_idle_per_server = kept.pool_caps
    pool.idle_timeout = kept.upstream_idle_timeout
    servers = sum(len(spec.servers) for spec in front.specs)
    logger.info(
        "reload: configuration applied (%d routes, %d upstream groups, %d servers)",
        len(front.routes.routes) if front.routes is not None else 0,
        len(front.specs),
        servers,
    )
    return front


async def _checks_of(
    front: Front,
    open_upstream: OpenUpstream,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``front``'s health checks until the scope it reports is cancelled."""
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await check_front_forever(front, open_upstream)
