"""One exchange: a request from the client, its response from the upstream.

An ``Exchange`` owns everything one request/response needs: the client
endpoint, the upstream connection, the request and its target, the access log
record, the stall watchdog and the memory budget's gauges. It is the one place
that decides how a body moves (``choose_body_path``: splice between two plain
sockets, else the bounded pump, past h11 for a large Content-Length body) and
whether what is left may be used again (``may_keep_alive``, ``may_pool``,
``may_retry``). Those decisions need no I/O and are plain functions, tested
without streams (hypercorn's ``protocol/`` split); the ``Exchange`` carries
them out.

The path of a request:

1. Policy (``_policy``): client address (403), credentials (407), loops (508).
2. The target (``_http``). Forward mode reads it from the request. Reverse
   mode asks the front (``_front``, taken once when the exchange starts) for
   the group of the first matching route (404 when none matches) and the
   group for a server (``_balance``: 502 at once when every server is out).
   Then an upstream connection from the connector (``_upstream``): a pooled
   one, or a new one (504 past ``connect_timeout``, 502 when refused or
   unresolvable).
3. The request head goes up; a request without a body goes whole, in one
   write. A request body is pumped (or spliced) up in a task of the exchange's
   nursery while the response comes down: an upstream may answer early.
4. The response head (504 past ``upstream_timeout``, counted from the end of
   the request body so slow uploads are not cut); 1xx heads are forwarded. The
   head goes to the client with the body bytes that came with it; a small
   response is then complete, in one write. Otherwise the body follows by the
   chosen path, under the stall watchdog (``_watchdog``).
5. CONNECT (forward mode only) and an upstream's 101 to an Upgrade request end
   the HTTP part: the exchange becomes a tunnel (``_switching``).

Passive health and the retry on the next server (reverse mode). A server's
attempt is judged once: a response head is a success; a connect failure
(refused, unresolvable, ``connect_timeout``) or a 502-class failure before
any response byte (reset, close, nonsense) is a failure; a response head
that does not come within ``upstream_timeout`` gives no verdict (the server
is slow, not gone), nor does a client that leaves. A stale pooled connection
is retried on a new connection to the same server first (``may_retry``) and
is not the server's failure. Then, when ``may_retry_on_next_server`` allows
it (a connect failure, for any method: the body is read only after the
connection is up; or a safe method without a body and no response byte),
the request goes once to the next server of the group.

Errors are raised as ``ProxyError`` (the connection answers them, or aborts a
response that has begun) or ``ClientGone``; the upstream connection of an
exchange that raised is closed, never pooled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Collection

import attrs
import h11
import trio

from ._accesslog import AccessRecord
from ._balance import RETRY_SAFE_METHODS, Attempt, UpstreamGroup, may_retry_on_next_server
from ._body import bypass_body, bypass_min_body, pump_body, send_buffered, splice_body
from ._config import ProxyConfig
from ._endpoint import ClientEndpoint, H11Endpoint, MessageState, UpstreamEndpoint
from ._errors import (
    BadGateway,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    collapse_single_error,
)
from ._front import LiveFront
from ._http import (
    Target,
    client_response_headers,
    connect_target,
    forward_target,
    request_authority,
    request_content_length,
    request_has_body,
    response_content_length,
    reverse_path,
    server_target,
    upgrade_fields,
    upstream_request_headers,
)
from ._metrics import ProxyMeters
from ._parent import ParentProxy, absolute_target, goes_direct, parent_refusal
from ._policy import check_client, check_connect_port, check_credentials, check_not_loop
from ._pool import PooledUpstream
from ._relay import BufferGauge, PendingBody, Progress
from ._splice import splice_pipe_size
from ._switching import (
    TunnelOutcome,
    receive_connect_end,
    tunnel_after_connect,
    tunnel_after_upgrade,
)
from ._upstream import UpstreamConnector
from ._watchdog import StallWatchdog, watch_stalls

logger = logging.getLogger("trioproxy")


# --- Decisions: plain functions, no I/O --------------------------------------


@attrs.frozen
class BodyPath:
    """How one body moves: by splice through a pipe of ``pipe_size`` bytes;
    else through the bounded pump, past h11 if ``bypass`` (in chunks of at
    most ``chunk_size``, ``buffer_chunks`` of them in its channel), else
    through it.

    ``length`` is the body's Content-Length, None for any other framing.
    """

    length: int | None
    pipe_size: int | None
    bypass: bool = False
    chunk_size: int = 0
    buffer_chunks: int = 0

    @property
    def spliced(self) -> bool:
        return self.pipe_size is not None

    @property
    def past_h11(self) -> bool:
        """True if the body goes past the source's h11, whose connection
        then cannot be used again (``_body``)."""
        return self.spliced or self.bypass


def choose_body_path(
    config: ProxyConfig,
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    length: int | None,
) -> BodyPath:
    """Splice a Content-Length body of ``length`` bytes between two plain
    sockets when ``_splice`` says it pays; pump any other Content-Length body
    of at least ``bypass_min_body`` bytes past h11 (a TLS leg, in-memory
    streams, ``--no-splice``); pump everything else through h11 (chunked or
    close-delimited bodies, small ones)."""
    if length is None:
        return BodyPath(None, None)
    pipe_size = splice_pipe_size(config, source, sink, length)
    if pipe_size is not None or length < bypass_min_body(source):
        return BodyPath(length, pipe_size)
    chunk_size = config.bypass_chunk_size
    chunk_size = min(chunk_size, _most_per_read(source, chunk_size))
    buffer_chunks = max(1, config.max_buffered_per_direction // chunk_size - 2)
    return BodyPath(length, None, True, chunk_size, buffer_chunks)


def _most_per_read(stream: trio.abc.ReceiveStream, default: int) -> int:
    """The most one read of ``stream`` returns: a TLS stream's ``max_read``
    (``_tls``; a ``BoundedTLSStream`` keeps ``read_size``), else ``default``.

    The pump past h11 sizes its channel by it: chunks smaller than it asked
    for get as many slots as ``pump_body`` would give them, so the
    per-direction bound stays the same and is filled as deep."""
    most = getattr(stream, "max_read", None)
    return most if isinstance(most, int) else default


def may_keep_alive(client: MessageState) -> bool:
    """Whether the client connection may carry another request.

    Only when both messages ended as h11 sees them: a body that went by
    splice never reached the client's h11 (an upload) and leaves it short of
    ``DONE``; a request or response that said ``Connection: close``, an
    HTTP/1.0 exchange without keep-alive, or an aborted response do too.
    """
    return client.both_done


def may_pool(upstream: MessageState) -> bool:
    """Whether an upstream connection may serve another request, after an
    exchange that raised nothing.

    Only when both messages ended (h11 ``DONE`` on both sides: not a response
    left unread, an upload left unfinished, a failed write, an upstream that
    asked to close, or a switched protocol), no body went by splice on it (a
    spliced upload leaves h11 ``DONE``, since the passthrough counted the
    bytes, so the flag is what refuses it), and nothing was received past the
    response (bytes sent unasked are junk or the start of an error).
    """
    return upstream.both_done and not upstream.body_bypassed and not upstream.unparsed


def may_retry(upstream: PooledUpstream, request: h11.Request, *, has_body: bool) -> bool:
    """Whether a request that failed on ``upstream`` may be sent again on a new one.

    Only when the connection was reused (a new one failing will fail again),
    the method is idempotent and safe to repeat, the request has no body (it
    was read from the client once and is gone), and not a byte of the
    response arrived (nothing was passed to the client).
    """
    return (
        upstream.reused
        and not has_body
        and request.method in RETRY_SAFE_METHODS
        and upstream.endpoint.bytes_received == upstream.bytes_before
    )


def may_try_next_server(
    method: bytes, error: ProxyError, attempt: ServerAttempt, *, has_body: bool
) -> bool:
    """Whether a request whose ``attempt`` ended in ``error`` goes once more,
    to the next server: ``may_retry_on_next_server``, for connect failures
    and for 502s (a response head that did not come in time is not retried:
    the client would wait for a second ``upstream_timeout``)."""
    if isinstance(error, GatewayTimeout) and not attempt.connect_failed:
        return False
    return may_retry_on_next_server(
        method,
        has_body=has_body,
        sent_any_byte=True,  # unknown: a write that failed may have sent part
        received_any_byte=attempt.received,
        connect_failed=attempt.connect_failed,
    )


def client_head(response: h11.Response, *, close: bool = False) -> h11.Response:
    """The upstream's response head as it goes to the client, with
    ``Connection: close`` if ``close`` (h11 then ends the connection after it)."""
    headers = client_response_headers(response.headers.raw_items())
    if close:
        headers.append((b"Connection", b"close"))
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


# --- The exchange ------------------------------------------------------------


@attrs.define(eq=False)
class ServerAttempt:
    """One try on a server of a group, and what the exchange saw of it.

    Attributes:
        group: the group the server was picked from (an exchange keeps it
            through a reload).
        attempt: the group's record of the try.
        connect_failed: connecting to the server failed (TCP or timeout).
        received: a byte of the response came from the server.
    """

    group: UpstreamGroup
    attempt: Attempt
    connect_failed: bool = False
    received: bool = False

    def judge(self, *, ok: bool) -> None:
        """Give the group its verdict on the server, once."""
        if not self.attempt.reported:
            self.group.report(self.attempt, ok=ok, now=trio.current_time())


@attrs.frozen(eq=False)
class ExchangeContext:
    """What every exchange of one client connection shares.

    Attributes:
        config: sizes, timeouts and mode.
        meters: counters and the memory budget, shared across connections.
        upstreams: where upstream connections come from and go back to.
        fronts: the routes and groups in force; each exchange takes the
            current front when it starts.
        client_host: the client's IP address, or None for non-IP streams.
        client_allowed: the allow list's verdict on ``client_host``, computed
            once per connection, not parsed again for every request.
        own_addresses: every ``(host, port)`` that reaches this proxy.
        upstream_preface: the PROXY protocol header each new upstream
            connection starts with (``--upstream-send-proxy``), or b"".
        client_tls: the client's connection is TLS (our listener's).
    """

    config: ProxyConfig
    meters: ProxyMeters
    upstreams: UpstreamConnector
    fronts: LiveFront
    client_host: str | None
    client_allowed: bool
    own_addresses: Collection[tuple[str, int]]
    upstream_preface: bytes = b""
    client_tls: bool = False


class Exchange:
    """One request/response on a client connection, from head to keep-alive.

    Single-use: create with the request head just read, ``await run()``, then
    ask ``keeps_connection()``.

    Memory: at most ``config.max_buffered_per_direction`` payload bytes per
    direction (the pump's bound; none by splice), all within the global
    budget, plus the two endpoints' h11 buffers.

    Args:
        client: the client endpoint the request came on.
        request: the request head.
        context: what the connection's exchanges share.
        record: the access log record this exchange fills in.
    """

    def __init__(
        self,
        client: ClientEndpoint,
        request: h11.Request,
        context: ExchangeContext,
        record: AccessRecord,
    ) -> None:
        self.client = client
        self.request = request
        self.context = context
        self.config = context.config
        self.meters = context.meters
        self.record = record
        self.front = context.fronts.current
        # Reverse mode: the server this exchange is trying now.
        self._attempt: ServerAttempt | None = None
        self._tunneled = False
        self._parent: ParentProxy | None = None
        # Between the end of the request body and the response head, the
        # head's clock runs (upstream_timeout); set by whichever comes first.
        self._awaiting_head = True

    async def run(self) -> None:
        """Carry the exchange out; see the module comment.

        Raises:
            ProxyError: to be answered (or, once the response began, to abort it).
            ClientGone: the client left.
        """
        if self.request.method == b"CONNECT":
            await self._tunnel_to_target()
        else:
            await self._forward()

    def keeps_connection(self) -> bool:
        """Whether the client connection may carry another request after ``run``."""
        return not self._tunneled and may_keep_alive(self.client.state())

    # --- policy and target ---

    def _authorize(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Refuse the client or its credentials: raises Forbidden or 407."""
        context = self.context
        if not context.client_allowed:
            check_client(context.client_host, self.config.allow)
        check_credentials(fields, self.config.credentials)

    def _check_target(self, target: Target, fields: list[tuple[bytes, bytes]]) -> None:
        check_not_loop(target.host, target.port, fields, self.context.own_addresses)
        self.record.set_upstream(target.host, target.port, tls=target.tls)

    # --- CONNECT ---

    async def _tunnel_to_target(self) -> None:
        """Open a tunnel to the CONNECT target, or raise the error to answer."""
        if self.front.reverse:
            raise MethodNotAllowed("CONNECT is not available on a reverse proxy")
        fields = self.request.headers.raw_items()
        self._authorize(fields)
        target = connect_target(self.request.target)
        check_connect_port(target.port, self.config.connect_ports)
        self._check_target(target, fields)
        await receive_connect_end(self.client)
        parent = self._parent_for(target)
        upstreams = self.context.upstreams
        if parent is None:
            stream, prefix = await upstreams.open_stream(target.host, target.port), b""
        else:
            stream, prefix = await upstreams.open_tunnel_via(parent, target.authority)
        self.meters.upstream_connections += 1
        try:
            self.record.status = 200
            await self._tunnel(
                tunnel_after_connect(
                    self.client, stream, self.config, self.meters.tunnels, upstream_prefix=prefix
                )
            )
        finally:
            self.meters.upstream_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _tunnel(self, tunnel: Awaitable[TunnelOutcome]) -> None:
        """Run ``tunnel`` (from ``_switching``), counted open while it runs;
        then log and count what it carried."""
        self._tunneled = True
        self.meters.tunnels_open += 1
        try:
            outcome = await tunnel
        finally:
            self.meters.tunnels_open -= 1
        self.meters.count_tunnel(outcome.bytes_up, outcome.bytes_down)
        self.record.set_tunnel(
            bytes_up=outcome.bytes_up,
            bytes_down=outcome.bytes_down,
            ended=outcome.ended,
            error=outcome.error,
        )

    # --- HTTP ---

    async def _forward(self) -> None:
        """Forward the request: to its target (forward mode) or to a server of
        its route's group (reverse mode)."""
        request = self.request
        fields = request.headers.raw_items()
        self._authorize(fields)
        has_body = request_has_body(request)
        if self.front.reverse:
            await self._forward_to_group(fields, has_body)
            return
        target = forward_target(request.target)
        self._check_target(target, fields)
        host, port, tls, via = self._first_hop(target)
        upstream_request = self._upstream_request(target, fields)
        if not has_body:
            self.client.next_event_nowait()  # its EndOfMessage, already parsed: nothing to pump
        await self._exchange_on(host, port, upstream_request, has_body, tls=tls, via=via)

    async def _forward_to_group(self, fields: list[tuple[bytes, bytes]], has_body: bool) -> None:
        """Route the request to a group and send it to one of its servers;
        once more to the next server when ``may_try_next_server`` allows."""
        request = self.request
        path = reverse_path(request.target)
        group = self.front.group_for(request_authority(request.target, fields), path)
        if group is None:
            raise NotFound("no route matches this host and path")
        if not has_body:
            self.client.next_event_nowait()  # its EndOfMessage, already parsed: nothing to pump
        attempt = group.pick(trio.current_time())
        if attempt is None:
            raise BadGateway(f"every server of upstream {group.name!r} is down")
        try:
            await self._forward_to_server(group, attempt, path, fields, has_body)
        except (BadGateway, GatewayTimeout) as error:
            tried = self._attempt
            assert tried is not None
            if not may_try_next_server(request.method, error, tried, has_body=has_body):
                raise
            retry = group.next_after(attempt, trio.current_time())
            if retry is None:
                raise
            logger.info(
                "upstream %s: %s failed (%s); trying %s",
                group.name,
                attempt.server,
                error.message,
                retry.server,
            )
            await self._forward_to_server(group, retry, path, fields, has_body)

    async def _forward_to_server(
        self,
        group: UpstreamGroup,
        attempt: Attempt,
        path: bytes,
        fields: list[tuple[bytes, bytes]],
        has_body: bool,
    ) -> None:
        """Send the request to ``attempt``'s server and relay its response;
        tell the group how the server did, and that the attempt is over."""
        tried = self._attempt = ServerAttempt(group, attempt)
        server = attempt.server
        try:
            target = server_target(path, server)
            self._check_target(target, fields)
            self.record.group = group.name
            upstream_request = self._upstream_request(target, fields)
            await self._exchange_on(
                server.host, server.port, upstream_request, has_body, tls=server.scheme == "https"
            )
        except (BadGateway, GatewayTimeout) as error:
            if not tried.received and (tried.connect_failed or isinstance(error, BadGateway)):
                tried.judge(ok=False)
            raise
        finally:
            group.finished(attempt)

    async def _exchange_on(
        self,
        host: str,
        port: int,
        upstream_request: h11.Request,
        has_body: bool,
        *,
        tls: bool = False,
        via: ParentProxy | None = None,
    ) -> None:
        """Forward the request on a pooled or new connection to ``host:port``;
        retry once on a new one when ``may_retry`` allows; give the
        connection back (to the pool only while the front has the server)."""
        upstreams = self.context.upstreams
        upstream = await self._connect(host, port, pooled=True, tls=tls, via=via)
        self.meters.upstream_connections += 1  # in use by an exchange; idle ones are the pool's
        try:
            try:
                await self._send_on(upstream.endpoint, upstream_request, has_body)
            except BadGateway as error:
                if not may_retry(upstream, self.request, has_body=has_body):
                    raise
                logger.debug("reused upstream connection failed (%s); retrying on a new one", error)
                await upstreams.discard(upstream)
                upstream = await self._connect(host, port, pooled=False, tls=tls, via=via)
                await self._send_on(upstream.endpoint, upstream_request, has_body)
        except BaseException:
            answered = upstream.endpoint.bytes_received > upstream.bytes_before
            if self._attempt is not None and answered:
                self._attempt.received = True
            await upstreams.discard(upstream)
            raise
        finally:
            self.meters.upstream_connections -= 1
        reusable = may_pool(upstream.endpoint.state())
        if self._attempt is not None:  # a server no longer configured: let its connection go
            reusable = reusable and self.context.fronts.current.serves(host, port)
        await upstreams.release(upstream, reusable=reusable)

    async def _connect(
        self, host: str, port: int, *, pooled: bool, tls: bool, via: ParentProxy | None
    ) -> PooledUpstream:
        """A pooled connection to ``host:port`` (if ``pooled`` and there is
        one) or a new one, over TLS if ``tls``, through the parent ``via``
        if given; a failure is a connect failure of the attempt."""
        upstreams = self.context.upstreams
        preface = self.context.upstream_preface
        owner = self.context if preface else None  # such a connection is this client's alone
        get = upstreams.checkout if pooled else upstreams.connect
        try:
            return await get(host, port, tls=tls, via=via, preface=preface, owner=owner)
        except ProxyError:
            if self._attempt is not None:
                self._attempt.connect_failed = True
            raise

    def _first_hop(self, target: Target) -> tuple[str, int, bool, ParentProxy | None]:
        """Where the upstream connection goes: ``(host, port, tls, via)``.

        The target itself, unless a parent proxy carries it: a plain target
        goes to the parent in absolute form (``self._parent``); an
        ``https://`` target goes in TLS of our own, end to end, inside a
        CONNECT tunnel through the parent (``via``), so that we verify the
        origin's certificate as for a direct one.
        """
        parent = self._parent_for(target)
        if parent is None:
            return target.host, target.port, target.tls, None
        if target.tls:
            return target.host, target.port, True, parent
        self._parent = parent
        return parent.host, parent.port, False, None

    def _upstream_request(self, target: Target, fields: list[tuple[bytes, bytes]]) -> h11.Request:
        headers = upstream_request_headers(
            fields,
            target=target,
            client_host=self.context.client_host,
            reverse=self.front.reverse,
            client_tls=self.context.client_tls,
        )
        headers += upgrade_fields(fields)
        if self._parent is None:
            return h11.Request(method=self.request.method, target=target.path, headers=headers)
        headers += self._parent.fields()
        request_target = absolute_target(target.authority, target.path)
        return h11.Request(method=self.request.method, target=request_target, headers=headers)

    def _parent_for(self, target: Target) -> ParentProxy | None:
        """The parent proxy this target goes through, or None to go direct."""
        parent = self.config.parent_proxy
        if parent is None or goes_direct(target.host, self.config.no_parent_for):
            return None
        return parent

    async def _send_on(
        self, upstream: UpstreamEndpoint, upstream_request: h11.Request, has_body: bool
    ) -> None:
        """Send the request on ``upstream`` and relay the response back."""
        self._awaiting_head = True
        if not has_body:
            await upstream.send_head(upstream_request, end=True)
            clock = trio.CancelScope(deadline=trio.current_time() + self.config.upstream_timeout)
            await self._forward_response(upstream, clock, watchdog=None)
            return
        await upstream.send_head(upstream_request)
        await self._forward_with_request_body(upstream)

    async def _forward_with_request_body(self, upstream: UpstreamEndpoint) -> None:
        """Pump the request body up while the response comes down.

        The response may start before the request body ends (an upstream may
        answer early, e.g. 413); when the response is complete, an unfinished
        upload is abandoned and the client connection will close. A stall (no
        byte moving either way for ``stall_timeout`` during a body) ends the
        exchange with a 504, or an aborted response once it has begun.
        """
        clock = trio.CancelScope()  # the head's deadline starts with the request's end
        request_sent = trio.Event()
        length = request_content_length(self.request)
        path = choose_body_path(self.config, self.client.stream, upstream.stream, length)
        record = self.record
        watchdog = StallWatchdog(
            [record.request_body, record.response_body], self.config.stall_timeout
        )
        with collapse_single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog.watch, nursery.cancel_scope)
                nursery.start_soon(self._send_request_body, upstream, path, clock, request_sent)
                # An upload past h11 leaves the client's h11 short of DONE:
                # the response says Connection: close, and the connection closes.
                await self._forward_response(
                    upstream,
                    clock,
                    watchdog=watchdog,
                    request_sent=request_sent,
                    close=path.past_h11,
                )
                nursery.cancel_scope.cancel()  # an unfinished upload is abandoned
        if watchdog.stalled:
            raise self._stalled()

    async def _send_request_body(
        self,
        upstream: UpstreamEndpoint,
        path: BodyPath,
        clock: trio.CancelScope,
        request_sent: trio.Event,
    ) -> None:
        """Move the request body up, then start the response head's clock."""
        try:
            await self._move_body(
                self.client, upstream, path, self.meters.request_bodies, self.record.request_body
            )
        except BadGateway as exc:
            # The upstream stopped reading; its response (or its silence)
            # tells the client what happened, so wait for that.
            logger.debug("upstream stopped reading the request body: %s", exc)
        if self._awaiting_head:
            clock.deadline = trio.current_time() + self.config.upstream_timeout
        request_sent.set()

    async def _forward_response(
        self,
        upstream: UpstreamEndpoint,
        clock: trio.CancelScope,
        *,
        watchdog: StallWatchdog | None,
        request_sent: trio.Event | None = None,
        close: bool = False,
    ) -> None:
        """Relay the response: its head under ``clock``, then its body.

        With no ``watchdog`` (nothing is uploaded alongside), the same scope
        then times the head's write to the client with ``stall_timeout``, the
        watchdog's rule when one write is all that moves: a scope costs more
        than a short exchange's parsing, and most responses are one write.
        Only a body that needs a pump gets a watchdog task of its own.
        """
        response: h11.Response | h11.InformationalResponse | None = None
        ended = True
        pending = PendingBody()
        with clock:
            response = await self._response_head(upstream)
            if self._attempt is not None:  # the server answered: a success
                self._attempt.received = True
                self._attempt.judge(ok=True)
            if self._parent is not None:
                refusal = parent_refusal(response.status_code, tunnel=False)
                if refusal is not None:
                    raise refusal
            self._awaiting_head = False
            clock.deadline = (
                math.inf if watchdog else trio.current_time() + self.config.stall_timeout
            )
            self.record.status = response.status_code
            self.meters.count_response(response.status_code)
            if isinstance(response, h11.Response):
                pending, ended = await send_buffered(
                    upstream,
                    self.client,
                    client_head(response, close=close),
                    gauge=self.meters.response_bodies,
                    progress=self.record.response_body,
                )
        if clock.cancelled_caught:
            raise self._no_response_head() if self._awaiting_head else self._stalled()
        assert response is not None
        if isinstance(response, h11.InformationalResponse):  # 101: a tunnel from here on
            await self._switch_protocols(upstream, response, request_sent)
        elif not ended:
            await self._response_body(upstream, response, pending, watched=watchdog is not None)

    async def _response_body(
        self,
        upstream: UpstreamEndpoint,
        response: h11.Response,
        pending: PendingBody,
        *,
        watched: bool,
    ) -> None:
        """The rest of a response body after its head (and ``pending``, the
        body bytes ``send_buffered`` pulled), under a stall watchdog."""
        length = response_content_length(self.request.method, response)
        path = choose_body_path(self.config, upstream.stream, self.client.stream, length)
        gauge, progress = self.meters.response_bodies, self.record.response_body
        if watched:
            await self._move_body(upstream, self.client, path, gauge, progress, pending)
            return
        async with watch_stalls([progress], self.config.stall_timeout) as watchdog:
            await self._move_body(upstream, self.client, path, gauge, progress, pending)
        if watchdog.stalled:
            raise self._stalled()

    async def _move_body(
        self,
        source: H11Endpoint,
        sink: H11Endpoint,
        path: BodyPath,
        gauge: BufferGauge,
        progress: Progress,
        first_chunk: PendingBody | None = None,
    ) -> None:
        """Move one body, ``first_chunk`` first, by the path chosen for it."""
        if path.bypass and path.length is not None:
            await bypass_body(
                source,
                sink,
                length=path.length,
                chunk_size=path.chunk_size,
                buffer_chunks=path.buffer_chunks,
                gauge=gauge,
                progress=progress,
                budget=self.meters.budget,
                first_chunk=first_chunk,
            )
        elif path.pipe_size is None or path.length is None:
            await pump_body(
                source,
                sink,
                buffer_chunks=self.config.buffer_chunks,
                gauge=gauge,
                progress=progress,
                budget=self.meters.budget,
                first_chunk=first_chunk,
            )
        else:
            await splice_body(
                source,
                sink,
                length=path.length,
                pipe_size=path.pipe_size,
                gauge=gauge,
                progress=progress,
                first_chunk=first_chunk,
            )

    async def _switch_protocols(
        self,
        upstream: UpstreamEndpoint,
        response: h11.InformationalResponse,
        request_sent: trio.Event | None,
    ) -> None:
        """Forward a 101 and tunnel, once the whole request went up.

        An upstream that sends 101 and then neither reads the body nor closes
        stalls here, as it would stall any upload.
        """
        if request_sent is not None:
            await request_sent.wait()
        await self._tunnel(
            tunnel_after_upgrade(self.client, upstream, response, self.config, self.meters.tunnels)
        )

    async def _response_head(
        self, upstream: UpstreamEndpoint
    ) -> h11.Response | h11.InformationalResponse:
        """Wait for the final response head, forwarding 1xx responses.

        A 101 to a request that asked for an Upgrade is final too: it is
        returned for the caller to switch to a tunnel. The caller's scope
        carries the deadline.

        Raises:
            BadGateway: when the upstream closes or answers nonsense.
        """
        request = self.request
        while True:
            event = await upstream.next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise BadGateway(f"upstream sent {type(event).__name__} instead of a response")
            if event.status_code == 101:
                if upgrade_fields(request.headers.raw_items()):
                    return event
                raise BadGateway("upstream switched protocols, which was not asked for")
            if request.http_version == b"1.1":
                await self.client.send_head(
                    h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=client_response_headers(event.headers.raw_items()),
                        reason=event.reason,
                    )
                )

    def _stalled(self) -> GatewayTimeout:
        return GatewayTimeout(f"no byte moved for {self.config.stall_timeout:g} s")

    @staticmethod
    def _no_response_head() -> GatewayTimeout:
        return GatewayTimeout("the upstream did not send a response head in time")
