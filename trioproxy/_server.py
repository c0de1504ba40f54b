"""Serving proxy connections: one client connection, many exchanges.

Per client connection (``handle_connection``):

1. h11 (server role) reads a request head; a malformed one gets 400 or 431.
   Before h11 parses it, ``_framing``'s guard checks the raw head against
   smuggling and limits (400, 414, 431); then ``_policy`` decides: client
   address (403), credentials (407), CONNECT port (403), loops (508).
2. The target comes from the absolute URI (forward mode) or the fixed
   upstream (reverse mode); the upstream connection is an idle one from the
   pool (``_pool``, reverse mode) or a new one (connect timeout: 504; refused
   or unresolvable: 502). After a clean exchange it goes back to the pool.
3. In the exchange's nursery, the request body is pumped client -> upstream
   while this task waits for the response head (upstream timeout: 504, counted
   from the end of the request body, so slow uploads are not cut), forwards
   1xx responses, sends the head and pumps the response body upstream ->
   client. Each pump is the bounded ``Pump`` of ``_relay``. A request without
   a body (most GETs) needs no nursery: its response is relayed by this task
   (``_relay_response``), and a small one goes out in a single write.
4. If both messages completed and both sides allow it, the next request is read
   from the same client connection (keep-alive).
5. CONNECT (forward mode only) and an upstream's 101 to an Upgrade request
   end the HTTP part: the connection becomes a raw tunnel (``_switching``).

Failure containment: an error before the response head has been sent becomes
an error response (``Connection: close``); after it, the client connection is
closed with the body unfinished, so the client sees an incomplete transfer
(h11's framing guarantees it: a short Content-Length body or a chunked body
without its last chunk). Nothing a peer does escapes ``handle_connection``;
``serve`` never sees a handler exception.

What makes it safe to expose lives in modules of its own, called from here in
a few lines: ``_timeouts`` (idle, request head, body stall), ``_limits``
(connection limit, accept loop), ``_shutdown`` (the drain) and ``_accesslog``
(one line per request).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Collection
from typing import Any

import attrs
import h11
import trio

from ._accesslog import AccessRecord, logged_exchange
from ._body_splice import relay_request_body, relay_response_body, request_splice_pipe_size
from ._config import ProxyConfig
from ._errors import BadGateway, ClientGone, GatewayTimeout, MethodNotAllowed, ProxyError
from ._h11_io import ClientEndpoint, UpstreamEndpoint
from ._http import (
    Target,
    client_response_headers,
    connect_target,
    error_response,
    forward_target,
    request_has_body,
    reverse_target,
    upgrade_fields,
    upstream_request_headers,
)
from ._listen import open_reuse_port_listeners
from ._memory import trim_heap_when_idle
from ._metrics import ProxyMeters, serve_metrics
from ._policy import (
    check_client,
    check_connect_port,
    check_credentials,
    check_not_loop,
    client_allowed,
)
from ._pool import PooledUpstream, UpstreamPool, may_retry, open_upstream_pool
from ._relay import PendingBody, collapse_single_error, send_buffered
from ._shutdown import Shutdown, ShutdownTrigger, serve_until_shutdown
from ._switching import receive_connect_end, tunnel_after_connect, tunnel_after_upgrade
from ._timeouts import StallWatchdog, read_request_head, run_watched, wait_for_request
from ._upstream import OpenUpstream, open_tcp_upstream

logger = logging.getLogger("trioproxy")

# After an error response, how long and how much we keep reading (and
# discarding) what the client still sends before closing. Closing a socket with
# unread input makes the kernel send RST, which can destroy the error response
# before the client reads it (the "lingering close" of nginx and Apache).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024


@attrs.frozen
class _Context:
    """What every exchange of one client connection needs."""

    config: ProxyConfig
    open_upstream: OpenUpstream
    meters: ProxyMeters
    client_host: str | None
    shutdown: Shutdown
    own_addresses: frozenset[tuple[str, int]]
    pool: UpstreamPool
    # The allow-list verdict depends only on the client's address, so it is
    # computed once per connection, not parsed again for every request.
    client_allowed: bool


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
            of TLS over TCP); a stream without one (in-memory, Unix socket)
            skips the allow list: its acceptor decided who may connect.
        listen_addresses: ``(host, port)`` of the listeners serving this
            connection, for loop detection; the stream's own local address
            and ``config.listen_host:listen_port`` (unless port 0) count too.
        pool: idle upstream connections to reuse, shared across client
            connections (see ``open_upstream_pool``); without one, each
            exchange opens its own upstream connection and closes it.

    Error handling: never raises, except ``trio.Cancelled``. Peer misbehaviour
    is answered, and logged as one access log line with a reason; a bug in trioproxy is logged with
    its traceback, and only this connection ends.
    """
    client_host = client_address if client_address is not None else _peer_host(stream)
    context = _Context(
        config=config,
        open_upstream=open_upstream,
        meters=meters if meters is not None else ProxyMeters.for_config(config),
        client_host=client_host,
        shutdown=shutdown if shutdown is not None else Shutdown(),
        own_addresses=_own_addresses(stream, config, listen_addresses),
        pool=pool if pool is not None else UpstreamPool(max_idle=0),
        client_allowed=client_host is None or client_allowed(client_host, config.allow),
    )
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_head_size)
    client = ClientEndpoint(
        stream, conn, read_size=config.read_size, head_limits=config.head_limits
    )
    context.meters.client_connections += 1
    try:
        await _serve_requests(client, context)
    except ClientGone as exc:
        logger.debug("client %s left: %s", context.client_host, exc)
    except Exception:
        logger.exception("bug: unexpected error serving client %s", context.client_host)
    finally:
        context.meters.client_connections -= 1
        await trio.aclose_forcefully(stream)


async def _serve_requests(client: ClientEndpoint, context: _Context) -> None:
    """Run exchanges on one client connection until it must close.

    Timeouts (idle, request head) are applied by ``_timeouts``; each request
    gets one access log line (``_accesslog``).
    """
    first = True
    while True:
        head_deadline = await wait_for_request(
            client, context.config, context.shutdown, first=first
        )
        if head_deadline is None:
            return  # idle for too long, or the server is draining: close silently.
        first = False
        failure: ProxyError | None = None
        with logged_exchange(context.client_host) as record:
            try:
                event = await read_request_head(client, context.config, head_deadline)
                if not isinstance(event, h11.Request):
                    record.enabled = False
                    return  # ConnectionClosed before a new request: a clean goodbye.
                record.set_request(event)
                if event.method == b"CONNECT":
                    await _serve_connect(client, event, context, record)
                    return
                await _exchange(client, event, context, record)
            except ProxyError as error:
                record.set_error(error, answered=client.can_respond)
                context.meters.count_failure(error.status_code)
                failure = error
        if failure is not None:  # logged above; answering and lingering are not timed
            await _end_with_error(client, failure, context.meters)
            return
        if client.conn.our_state is not h11.DONE or client.conn.their_state is not h11.DONE:
            return
        client.conn.start_next_cycle()


async def _end_with_error(client: ClientEndpoint, error: ProxyError, meters: ProxyMeters) -> None:
    """Answer ``error`` if no response has started, else abort; then linger."""
    if not client.can_respond:
        logger.debug("aborting response after it started: %s", error.message)
        return
    logger.debug("answering %d: %s", error.status_code, error.message)
    meters.count_response(error.status_code)
    response, body = error_response(error)
    try:
        await client.send(response)
        if client.request_method != b"HEAD":
            await client.send(h11.Data(data=body))
        await client.send(h11.EndOfMessage())
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
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


async def _serve_connect(
    client: ClientEndpoint, request: h11.Request, context: _Context, record: AccessRecord
) -> None:
    """Open a tunnel to the CONNECT target, or raise the error to answer."""
    if context.config.upstream is not None:
        raise MethodNotAllowed("CONNECT is not available on a reverse proxy")
    fields = request.headers.raw_items()
    _check_client(context)
    check_credentials(fields, context.config.credentials)
    target = connect_target(request.target)
    check_connect_port(target.port, context.config.connect_ports)
    check_not_loop(target.host, target.port, fields, context.own_addresses)
    record.set_upstream(target.host, target.port)
    await receive_connect_end(client)
    upstream_stream = await _connect_stream(target, context)
    context.meters.upstream_connections += 1
    try:
        await tunnel_after_connect(client, upstream_stream, context.config, context.meters.tunnels)
    finally:
        context.meters.upstream_connections -= 1
        await trio.aclose_forcefully(upstream_stream)


async def _exchange(
    client: ClientEndpoint, request: h11.Request, context: _Context, record: AccessRecord
) -> None:
    """Forward one request and its response; see the module comment.

    The upstream connection comes from the pool if one is idle; after a clean
    exchange it goes back (the pool decides whether it can be reused), after a
    failed one it is closed. A request without a body that fails on a reused
    connection before any response byte came is sent once more on a new
    connection if its method allows (see ``_pool``).
    """
    fields = request.headers.raw_items()
    _check_client(context)
    check_credentials(fields, context.config.credentials)
    target = _target_for(request, context.config)
    check_not_loop(target.host, target.port, fields, context.own_addresses)
    record.set_upstream(target.host, target.port)
    headers = upstream_request_headers(
        fields,
        target=target,
        client_host=context.client_host,
        reverse=context.config.upstream is not None,
    )
    headers += upgrade_fields(fields)
    upstream_request = h11.Request(method=request.method, target=target.path, headers=headers)
    has_body = request_has_body(request)
    if not has_body:
        client.next_event_nowait()  # its EndOfMessage, already parsed: nothing to pump
    upstream = await context.pool.checkout(target.host, target.port)
    if upstream is None:
        upstream = await _connect(target, context)
    context.meters.upstream_connections += 1  # in use by an exchange; idle ones are the pool's
    try:
        try:
            await _forward(
                client, upstream.endpoint, upstream_request, request, context, record, has_body
            )
        except BadGateway as error:
            if not may_retry(upstream, request, has_body=has_body):
                raise
            logger.debug("reused upstream connection failed (%s); retrying on a new one", error)
            await trio.aclose_forcefully(upstream.endpoint.stream)
            upstream = await _connect(target, context)
            await _forward(
                client, upstream.endpoint, upstream_request, request, context, record, has_body
            )
    except BaseException:
        await trio.aclose_forcefully(upstream.endpoint.stream)
        raise
    finally:
        context.meters.upstream_connections -= 1
    await context.pool.release(upstream)


async def _forward(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    upstream_request: h11.Request,
    request: h11.Request,
    context: _Context,
    record: AccessRecord,
    has_body: bool,
) -> None:
    """Send ``upstream_request`` (the client's ``request`` as it goes upstream)
    and, when it has no body (``has_body``, from ``request_has_body``), its
    end; then relay."""
    await upstream.send(upstream_request)
    if has_body:
        await _relay_messages(client, upstream, request, context, record)
    else:
        await upstream.send(h11.EndOfMessage())
        await _relay_response(client, upstream, request, context, record)


def _check_client(context: _Context) -> None:
    """``check_client`` on the connection's cached verdict: raises Forbidden."""
    if not context.client_allowed:
        check_client(context.client_host, context.config.allow)


def _target_for(request: h11.Request, config: ProxyConfig) -> Target:
    if config.upstream is None:
        return forward_target(request.target)
    return reverse_target(request.target, config.upstream)


async def _connect(target: Target, context: _Context) -> PooledUpstream:
    """Open a new upstream connection within ``connect_timeout`` (else 504)."""
    stream = await _connect_stream(target, context)
    config = context.config
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=config.max_head_size)
    endpoint = UpstreamEndpoint(stream, conn, read_size=config.read_size)
    return PooledUpstream(endpoint, target.host, target.port)


async def _connect_stream(target: Target, context: _Context) -> trio.abc.Stream:
    """Open the upstream stream within ``connect_timeout`` (else 504)."""
    timeout = context.config.connect_timeout
    with trio.move_on_after(timeout):
        return await context.open_upstream(target.host, target.port)
    raise GatewayTimeout(f"connecting to {target.host}:{target.port} took over {timeout:g} s")


async def _relay_messages(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    request: h11.Request,
    context: _Context,
    record: AccessRecord,
) -> None:
    """Pump the request body up while the response comes down.

    The response may start before the request body ends (an upstream may
    answer early, e.g. 413); when the response is complete, an unfinished
    upload is abandoned and the client connection will close. A stall (no
    byte moving either way for ``stall_timeout`` during a body) ends the
    exchange with a 504, or an aborted response once it has begun.
    """
    config = context.config
    head_deadline = trio.CancelScope()
    request_sent = trio.Event()
    watchdog = StallWatchdog([record.request_body, record.response_body], config.stall_timeout)
    # A spliced upload bypasses the client's h11, which so never reaches DONE:
    # the response says Connection: close, and the connection closes after it.
    upload_pipe_size = request_splice_pipe_size(client, upstream, request, config)

    async def send_request_body() -> None:
        try:
            await relay_request_body(
                client,
                upstream,
                request,
                pipe_size=upload_pipe_size,
                config=config,
                gauge=context.meters.request_bodies,
                progress=record.request_body,
                budget=context.meters.budget,
            )
        except BadGateway as exc:
            # The upstream stopped reading; its response (or its silence)
            # tells the client what happened, so wait for that.
            logger.debug("upstream stopped reading the request body: %s", exc)
        head_deadline.deadline = trio.current_time() + config.upstream_timeout
        request_sent.set()

    with collapse_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog.watch, nursery.cancel_scope)
            nursery.start_soon(send_request_body)
            response = await _receive_response_head(client, upstream, request, head_deadline)
            if isinstance(response, h11.InformationalResponse):  # 101: a tunnel from here on
                # The switch happens after the whole request. An upstream that
                # sends 101 and then neither reads the body nor closes stalls
                # here, as it would stall any upload.
                await request_sent.wait()
                record.status = response.status_code
                context.meters.count_response(response.status_code)
                await tunnel_after_upgrade(
                    client, upstream, response, config, context.meters.tunnels
                )
                nursery.cancel_scope.cancel()  # the stall watchdog ends with the exchange
                return
            record.status = response.status_code
            context.meters.count_response(response.status_code)
            # The head goes with the body's first bytes; the response body's
            # progress runs while it is written, so the watchdog guards it.
            pending, ended = await send_buffered(
                upstream,
                client,
                _client_head(response, close=upload_pipe_size is not None),
                gauge=context.meters.response_bodies,
                progress=record.response_body,
            )
            if not ended:
                await _relay_response_body(
                    client, upstream, request, response, context, record, pending
                )
            nursery.cancel_scope.cancel()
    if watchdog.stalled:
        raise _stalled(config)


async def _relay_response(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    request: h11.Request,
    context: _Context,
    record: AccessRecord,
) -> None:
    """Relay the response to a request without a body (most GETs).

    Nothing is uploaded alongside, so the usual small response needs no
    nursery and no task: its head and the body that came with it go out in
    one write (``send_buffered``) under a plain ``stall_timeout`` deadline,
    which is the watchdog's rule when one write is all that moves. Only a
    body that needs a pump gets the watchdog task, as in ``_relay_messages``.
    """
    config = context.config
    gauge = context.meters.response_bodies
    progress = record.response_body
    response: h11.Response | h11.InformationalResponse | None = None
    # One cancel scope for two deadlines in turn, the response head's and then
    # the write's: a scope costs more than a short exchange's parsing, and this
    # runs once per request (issue 5, CPU per request).
    with trio.CancelScope(deadline=trio.current_time() + config.upstream_timeout) as deadline:
        response = await _response_head(client, upstream, request)
        record.status = response.status_code
        context.meters.count_response(response.status_code)
        if isinstance(response, h11.Response):
            deadline.deadline = trio.current_time() + config.stall_timeout
            pending, ended = await send_buffered(
                upstream, client, _client_head(response), gauge=gauge, progress=progress
            )
    if response is None:  # the head's deadline passed
        raise _no_response_head()
    if deadline.cancelled_caught:  # the write's
        raise _stalled(config)
    if isinstance(response, h11.InformationalResponse):  # 101: a tunnel from here on
        await tunnel_after_upgrade(client, upstream, response, config, context.meters.tunnels)
        return
    if ended:
        return
    stalled = await run_watched(
        [progress],
        config.stall_timeout,
        lambda: _relay_response_body(client, upstream, request, response, context, record, pending),
    )
    if stalled:
        raise _stalled(config)


async def _relay_response_body(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    request: h11.Request,
    response: h11.Response,
    context: _Context,
    record: AccessRecord,
    pending: PendingBody,
) -> None:
    """The rest of a response body after its head (and ``pending``, the body
    bytes ``send_buffered`` pulled), by splice(2) when it can (_body_splice)."""
    await relay_response_body(
        upstream,
        client,
        request,
        response,
        config=context.config,
        gauge=context.meters.response_bodies,
        progress=record.response_body,
        budget=context.meters.budget,
        first_chunk=pending,
    )


def _client_head(response: h11.Response, *, close: bool = False) -> h11.Response:
    """The upstream's response head as it goes to the client, with
    ``Connection: close`` if ``close`` (h11 then ends the connection after it)."""
    headers = client_response_headers(response.headers.raw_items())
    if close:
        headers.append((b"Connection", b"close"))
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


def _stalled(config: ProxyConfig) -> GatewayTimeout:
    return GatewayTimeout(f"no byte moved for {config.stall_timeout:g} s")


async def _receive_response_head(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    request: h11.Request,
    deadline: trio.CancelScope,
) -> h11.Response | h11.InformationalResponse:
    """Wait for the final response head, forwarding 1xx responses.

    A 101 to a request that asked for an Upgrade is final too: it is returned
    for the caller to switch to a tunnel.

    Raises:
        GatewayTimeout: when ``deadline`` passes first.
        BadGateway: when the upstream closes or answers nonsense.
    """
    with deadline:
        return await _response_head(client, upstream, request)
    raise _no_response_head()


async def _response_head(
    client: ClientEndpoint, upstream: UpstreamEndpoint, request: h11.Request
) -> h11.Response | h11.InformationalResponse:
    """``_receive_response_head`` without its deadline, which the caller sets."""
    while True:
        event = await upstream.next_event()
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                if upgrade_fields(request.headers.raw_items()):
                    return event
                raise BadGateway("upstream switched protocols, which was not asked for")
            if request.http_version == b"1.1":
                await client.send(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=client_response_headers(event.headers.raw_items()),
                        reason=event.reason,
                    )
                )
            continue
        raise BadGateway(f"upstream sent {type(event).__name__} instead of a response")


def _no_response_head() -> GatewayTimeout:
    return GatewayTimeout("the upstream did not send a response head in time")


def _tcp_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The TCP socket under ``stream`` (through TLS), if there is one."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    if stream.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return stream.socket


def _peer_host(stream: trio.abc.Stream) -> str | None:
    """The client's IP address, if ``stream`` is TCP (or TLS over TCP)."""
    sock = _tcp_socket(stream)
    if sock is None:
        return None
    try:
        address: Any = sock.getpeername()
    except OSError:
        # The client already left (ENOTCONN). Fail closed: "unknown" is in
        # no allow list, so anything it may have sent is refused.
        return "unknown"
    return str(address[0])


def _own_addresses(
    stream: trio.abc.Stream, config: ProxyConfig, listen_addresses: Collection[tuple[str, int]]
) -> frozenset[tuple[str, int]]:
    """Every ``(host, port)`` that reaches this proxy, as far as we know."""
    own = set(listen_addresses)
    if config.listen_port != 0:
        own.add((config.listen_host, config.listen_port))
    sock = _tcp_socket(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            address: Any = sock.getsockname()
            own.add((str(address[0]), int(address[1])))
    return frozenset(own)


async def serve(
    config: ProxyConfig,
    *,
    open_upstream: OpenUpstream = open_tcp_upstream,
    meters: ProxyMeters | None = None,
    shutdown_trigger: ShutdownTrigger | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``config.listen_host:listen_port`` and serve until cancelled,
    or until ``shutdown_trigger()`` returns and the server has drained.

    Use ``await nursery.start(serve, config)`` to get the listeners (and so
    the real port when ``listen_port`` is 0) once they accept connections.

    Resource handling: at most ``config.max_connections`` connections are
    served at once (see ``_limits``); each runs ``handle_connection`` and is
    closed when it ends. Cancelling ``serve`` closes the listeners and every
    connection; a shutdown trigger closes the listeners at once and gives
    in-flight exchanges ``config.shutdown_timeout`` seconds (see ``_shutdown``).
    The metrics endpoint (if ``config.metrics_listen``) and the idle heap
    trimmer run beside them.
    """
    shared_meters = meters if meters is not None else ProxyMeters.for_config(config)
    shutdown = Shutdown()
    # Workers share the port with SO_REUSEPORT (see _listen, _workers).
    open_listeners = open_reuse_port_listeners if config.reuse_port else trio.open_tcp_listeners
    listeners = await open_listeners(config.listen_port, host=config.listen_host)
    listen_addresses = [listener.socket.getsockname()[:2] for listener in listeners]
    pool_size = config.upstream_pool_size if config.upstream is not None else 0
    async with (
        open_upstream_pool(max_idle=pool_size, idle_timeout=config.upstream_idle_timeout) as pool,
        trio.open_nursery() as nursery,
    ):

        async def handler(stream: trio.SocketStream) -> None:
            await handle_connection(
                stream,
                config,
                open_upstream=open_upstream,
                meters=shared_meters,
                shutdown=shutdown,
                listen_addresses=listen_addresses,
                pool=pool,
            )

        # Memory: the metrics endpoint and the idle heap trimmer (issue 4).
        if config.metrics_listen is not None:
            await nursery.start(serve_metrics, shared_meters, *config.metrics_listen)
        nursery.start_soon(trim_heap_when_idle, shared_meters, lambda: pool.idle_count)
        await serve_until_shutdown(
            handler,
            listeners,
            config=config,
            shutdown=shutdown,
            trigger=shutdown_trigger,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()  # drained: the side tasks end with the server
