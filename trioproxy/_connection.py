"""One client connection: a loop of exchanges until it must close.

Per client connection (``handle_connection``):

0. On a TLS listener, the TLS handshake (after the PROXY header, if any),
   within ``tls_handshake_timeout``; a failure costs one access log line and
   the connection (``_tls_legs.accept_tls``).
1. Wait for the next request head: on a new connection within
   ``header_timeout``, on a kept-alive one within ``idle_timeout``, and the
   whole head within ``header_timeout`` from its first byte (``_timeouts``).
   Before h11 parses a head, ``_framing``'s guard checks it against smuggling
   and limits (400, 414, 431).
2. Run the ``Exchange`` (``_exchange``): policy, upstream, request, response.
3. If it failed before its response began, answer the error with
   ``Connection: close`` and linger a moment; if after, close the connection
   with the body unfinished, so the client sees an incomplete transfer.
4. If the exchange allows it, read the next request (keep-alive).

Each exchange gets one access log line (``_accesslog``). Nothing a peer does
escapes ``handle_connection``: a bug is logged with its traceback, and only
this connection ends.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Collection

import h11
import trio

from ._accesslog import logged_exchange
from ._config import ProxyConfig
from ._endpoint import ClientEndpoint
from ._errors import STREAM_ERRORS, ClientGone, ProxyError
from ._exchange import Exchange, ExchangeContext
from ._front import LiveFront
from ._http import error_response
from ._metrics import ProxyMeters
from ._origin import own_addresses, read_client_origin, upstream_preface
from ._policy import client_allowed
from ._pool import UpstreamPool
from ._shutdown import Shutdown
from ._timeouts import read_request_head, wait_for_request
from ._tls_legs import HandshakeFailed, accept_tls
from ._upstream import OpenUpstream, UpstreamConnector, open_tcp_upstream

logger = logging.getLogger("trioproxy")

# After an error response, how long and how much we keep reading (and
# discarding) what the client still sends before closing. Closing a socket with
# unread input makes the kernel send RST, which can destroy the error response
# before the client reads it (the "lingering close" of nginx and Apache).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024


async def handle_connection(
    stream: trio.abc.Stream,
    config: ProxyConfig,
    *,
    open_upstream: OpenUpstream = open_tcp_upstream,
    meters: ProxyMeters | None = None,
    shutdown: Shutdown | None = None,
    client_address: str | None = None,
    listen_addresses: Collection[tuple[str, int]] = (),
    pool: UpstreamPool | None = None,
    fronts: LiveFront | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve proxy requests from one client until it leaves; then close ``stream``.

    The public entry for applications that accept connections themselves:
    any ``trio.abc.Stream`` works (TCP, TLS, Unix, in-memory).

    Memory: per exchange, at most ``config.max_buffered_per_direction`` payload
    bytes per direction, plus h11's buffers (see ``ProxyConfig``).

    Args:
        stream: the client connection; closed when this returns.
        config: sizes, timeouts and mode.
        open_upstream: connector ``(host, port) -> Stream``; TCP by default.
        meters: counters and the memory budget, shared across connections
            if given; else this connection gets its own.
        shutdown: the server's draining state; when it drains, an idle
            connection closes at once and a busy one after its exchange.
        client_address: the client's IP address, checked against
            ``config.allow``. By default the peer address of a TCP stream (or
            of TLS over TCP), or with ``config.proxy_protocol`` the address
            the peer's PROXY header carries (``_origin``); a stream without
            one (in-memory, Unix socket) skips the allow list: its acceptor
            decided who may connect.
        listen_addresses: ``(host, port)`` of the listeners serving this
            connection, for loop detection; the stream's own local address
            and ``config.listen_host:listen_port`` (unless port 0) count too.
        pool: idle upstream connections to reuse, shared across client
            connections (see ``open_upstream_pool``); without one, each
            exchange opens its own upstream connection and closes it.
        fronts: the routes and upstream groups in force, shared across
            client connections so that balancing and health see every
            exchange; a reload replaces its front. Without one, this
            connection gets a front of its own, built from ``config``.
        tls: the listener's TLS context (``_tls_legs.listener_context``):
            the client speaks TLS on ``stream``, after the PROXY header if
            ``config.proxy_protocol``. None: ``stream`` carries HTTP as it is
            (already TLS, if the caller wrapped it).

    Error handling: never raises, except ``trio.Cancelled``. Peer misbehaviour
    is answered, and logged as one access log line with a reason; a bug in trioproxy is logged with
    its traceback, and only this connection ends.
    """
    meters = meters if meters is not None else ProxyMeters.for_config(config)
    meters.client_connections += 1
    shutdown = shutdown if shutdown is not None else Shutdown()
    client_host: str | None = client_address
    ended = False  # False in `finally` only when cancelled
    try:
        origin = await read_client_origin(stream, config, client_address)
        if origin is None:
            ended = True
            return  # logged: no valid PROXY header
        client_host = origin.host
        initial = origin.initial
        if tls is not None:
            started = trio.current_time()
            try:
                stream = await accept_tls(stream, tls, config, meters, initial=initial)
            except HandshakeFailed as failure:
                ended = True
                _log_handshake_failure(client_host, failure, started)
                stream = failure.stream  # closed below; it may own the socket
                return
            initial = b""
        context = ExchangeContext(
            config=config,
            meters=meters,
            upstreams=UpstreamConnector(
                config,
                open_upstream,
                pool if pool is not None else UpstreamPool(max_idle=0),
                meters,
            ),
            fronts=fronts if fronts is not None else LiveFront.of(config),
            client_host=client_host,
            client_allowed=client_host is None or client_allowed(client_host, config.allow),
            own_addresses=own_addresses(stream, config, listen_addresses),
            upstream_preface=upstream_preface(config, origin),
            client_tls=tls is not None,
        )
        client = ClientEndpoint(
            stream,
            read_size=config.read_size,
            max_head_size=config.max_head_size,
            head_limits=config.head_limits,
            initial=initial,
        )
        await _serve_requests(client, context, shutdown)
        ended = True
    except ClientGone as exc:
        ended = True
        logger.debug("client %s left: %s", client_host, exc)
    except Exception:
        ended = True
        logger.exception("bug: unexpected error serving client %s", client_host)
    finally:
        meters.client_connections -= 1
        if not ended and shutdown.draining:
            shutdown.cut += 1  # the drain's deadline cut this connection
        await trio.aclose_forcefully(stream)


def _log_handshake_failure(
    client_host: str | None, failure: HandshakeFailed, started: float
) -> None:
    """The one access log line of a connection whose TLS handshake failed."""
    with logged_exchange(client_host) as record:
        record.started = started
        record.client_tls = True
        record.reason = str(failure)


async def _serve_requests(
    client: ClientEndpoint, context: ExchangeContext, shutdown: Shutdown
) -> None:
    """Run exchanges on one client connection until it must close."""
    config = context.config
    first = True
    while True:
        head_deadline = await wait_for_request(client, config, shutdown, first=first)
        if head_deadline is None:
            return  # idle for too long, or the server is draining: close silently.
        first = False
        failure: ProxyError | None = None
        keep_alive = False
        with logged_exchange(context.client_host) as record:
            record.client_tls = context.client_tls
            try:
                event = await read_request_head(client, config, head_deadline)
                if not isinstance(event, h11.Request):
                    record.enabled = False
                    return  # ConnectionClosed before a new request: a clean goodbye.
                record.set_request(event)
                exchange = Exchange(client, event, context, record)
                await exchange.run()
                keep_alive = exchange.keeps_connection()
            except ProxyError as error:
                record.set_error(error, answered=client.can_respond)
                context.meters.count_failure(error.status_code)
                failure = error
        if failure is not None:  # logged above; answering and lingering are not timed
            await _end_with_error(client, failure, context.meters)
            return
        if not keep_alive:
            return
        client.reuse()


async def _end_with_error(client: ClientEndpoint, error: ProxyError, meters: ProxyMeters) -> None:
    """Answer ``error`` if no response has started, else abort; then linger."""
    if not client.can_respond:
        logger.debug("aborting response after it started: %s", error.message)
        return
    logger.debug("answering %d: %s", error.status_code, error.message)
    meters.count_response(error.status_code)
    response, body = error_response(error)
    try:
        await client.send_head(
            response, body=body if client.request_method != b"HEAD" else b"", end=True
        )
    except ClientGone:
        return
    await _linger(client.stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then discard the client's remaining input for a moment.

    Memory: reads into one reused-size buffer; discards at most
    ``LINGER_MAX_BYTES`` for at most ``LINGER_SECONDS``.
    """
    with trio.move_on_after(LINGER_SECONDS):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            discarded = 0
            while discarded < LINGER_MAX_BYTES:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    return
                discarded += len(data)
        except STREAM_ERRORS:
            return
