"""The server: listeners, the accept loop's limits, the drain, and what runs beside.

``serve`` opens the listeners (SO_REUSEPORT ones for workers, see ``_listen``
and ``_workers``), the upstream pool, the metrics endpoint and the idle heap
trimmer, and hands every accepted connection to ``handle_connection``
(``_connection``) under the connection limit (``_limits``) until a shutdown
trigger drains it (``_shutdown``). The routes and upstream groups in force
(the front, ``_front``) are shared by every connection; ``_reload`` runs
their health checks and swaps them when a new configuration arrives.
"""

from __future__ import annotations

from collections.abc import AsyncIterable

import trio

from ._config import ProxyConfig
from ._connection import handle_connection
from ._front import LiveFront
from ._listen import open_reuse_port_listeners
from ._memory import trim_heap_when_idle
from ._metrics import ProxyMeters, serve_metrics
from ._pool import open_upstream_pool
from ._reload import serve_front
from ._shutdown import DrainReport, Shutdown, ShutdownTrigger, serve_until_shutdown
from ._tls_legs import prepare_tls
from ._upstream import OpenUpstream, open_tcp_upstream


async def serve(
    config: ProxyConfig,
    *,
    open_upstream: OpenUpstream = open_tcp_upstream,
    meters: ProxyMeters | None = None,
    shutdown_trigger: ShutdownTrigger | None = None,
    reloads: AsyncIterable[ProxyConfig] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> DrainReport:
    """Listen on ``config.listen_host:listen_port`` and serve until cancelled,
    or until ``shutdown_trigger()`` returns and the server has drained.

    Use ``await nursery.start(serve, config)`` to get the listeners (and so
    the real port when ``listen_port`` is 0) once they accept connections.

    Resource handling: at most ``config.max_connections`` connections are
    served at once (see ``_limits``); each runs ``handle_connection`` and is
    closed when it ends. Cancelling ``serve`` closes the listeners and every
    connection; a shutdown trigger closes the listeners at once and gives
    in-flight exchanges ``config.shutdown_timeout`` seconds (see ``_shutdown``).
    The metrics endpoint (if ``config.metrics_listen``), the idle heap
    trimmer, and the upstream health checks run beside them. With
    ``config.tls_cert`` every connection speaks TLS (``_tls_legs``).

    Reload: each configuration from ``reloads`` applies to new exchanges and
    connections, and nothing that runs is dropped (see ``_reload``).

    Raises:
        ValueError: a TLS certificate, key or CA file is missing or bad.
    """
    tls = prepare_tls(config)
    shared_meters = meters if meters is not None else ProxyMeters.for_config(config)
    shutdown = Shutdown()
    # Workers share the port with SO_REUSEPORT (see _listen, _workers).
    open_listeners = open_reuse_port_listeners if config.reuse_port else trio.open_tcp_listeners
    listeners = await open_listeners(config.listen_port, host=config.listen_host)
    listen_addresses = [listener.socket.getsockname()[:2] for listener in listeners]
    live = LiveFront.of(config)
    shared_meters.groups = lambda: live.current.groups.values()
    # Pooled: connections to the servers of reverse mode, or to the parent proxy.
    total, per_server = config.pool_caps
    async with (
        open_upstream_pool(
            max_idle=total,
            max_idle_per_server=per_server,
            idle_timeout=config.upstream_idle_timeout,
        ) as pool,
        trio.open_nursery() as nursery,
    ):

        async def handler(stream: trio.SocketStream) -> None:
            await handle_connection(
                stream,
                live.current.config,
                open_upstream=open_upstream,
                meters=shared_meters,
                shutdown=shutdown,
                listen_addresses=listen_addresses,
                pool=pool,
                fronts=live,
                tls=tls,
            )

        shared_meters.pooled_upstreams = lambda: pool.idle_count
        # Memory: the metrics endpoint and the idle heap trimmer (issue 4).
        if config.metrics_listen is not None:
            await nursery.start(serve_metrics, shared_meters, *config.metrics_listen)
        nursery.start_soon(trim_heap_when_idle, shared_meters, lambda: pool.idle_count)
        await nursery.start(
            lambda task_status: serve_front(
                live, reloads, pool=pool, open_upstream=open_upstream, task_status=task_status
            )
        )
        report = await serve_until_shutdown(
            handler,
            listeners,
            config=config,
            shutdown=shutdown,
            trigger=shutdown_trigger,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()  # drained: the side tasks end with the server
    return report
