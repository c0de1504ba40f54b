"""Where exchanges get their upstream connections: the pool first, else a new one.

The stream opener is a plain async callable ``(host, port) -> trio.abc.Stream``
so that tests and embedding applications can inject their own (an in-memory
stream, a resolver that never touches the network).
``UpstreamConnector`` puts the opener, the pool and the connect timeout
together; it is the one place an exchange asks for an upstream, and where
several servers per upstream will plug in. An ``https://`` upstream or target
(``tls=True``) gets TLS over the opened stream (``_tls_legs``), within the
same ``connect_timeout``; the pool keeps TLS and plain connections apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import trio

from ._config import ProxyConfig
from ._endpoint import UpstreamEndpoint
from ._errors import BadGateway, GatewayTimeout
from ._metrics import ProxyMeters
from ._parent import ParentProxy, parent_refusal
from ._pool import PooledUpstream, UpstreamPool
from ._tls_legs import open_upstream_tls

OpenUpstream = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def open_tcp_upstream(host: str, port: int) -> trio.abc.Stream:
    """Open a TCP connection to ``host:port`` (happy eyeballs, via trio).

    Timeouts are not applied here: the caller wraps the call in its own
    deadline (trio's "let your caller worry about it").

    Raises:
        BadGateway: when the name does not resolve (including names that are
            not valid DNS names, such as a label longer than 63 octets) or
            every address refuses or fails.
    """
    try:
        return await trio.open_tcp_stream(host, port)
    except (OSError, UnicodeError) as exc:
        raise BadGateway(f"cannot connect to {host}:{port}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    """A one-line reason without the repr noise of trio's aggregated errors."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class UpstreamConnector:
    """Hands out upstream connections: pooled ones first, new ones within
    ``connect_timeout``, and takes them back.

    Memory: holds nothing itself; the pool's bound is the pool's
    (``UpstreamPool``).

    Args:
        config: gives ``connect_timeout``, ``read_size`` and ``max_head_size``.
        open_upstream: the stream opener, TCP by default.
        pool: idle keep-alive connections shared by every client connection.
        meters: where TLS handshakes and their failures are counted.
    """

    __slots__ = ("_config", "_meters", "_open", "pool")  # one per client connection: keep it small

    def __init__(
        self,
        config: ProxyConfig,
        open_upstream: OpenUpstream,
        pool: UpstreamPool,
        meters: ProxyMeters | None = None,
    ) -> None:
        self._config = config
        self._open = open_upstream
        self.pool = pool
        self._meters = meters

    async def checkout(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        via: ParentProxy | None = None,
        preface: bytes = b"",
        owner: object = None,
    ) -> PooledUpstream:
        """An idle pooled connection to ``host:port`` if there is one, else a new one.

        ``tls``: the connection speaks TLS (an ``https://`` upstream); only
        such connections are reused for it, and only plain ones otherwise.
        ``via``: a new one goes through this parent (see ``open_stream``).

        ``preface`` (a PROXY protocol header) is written first on a new
        connection; such a connection carries one client's address, so only
        exchanges of its ``owner`` (that client's connection) reuse it.

        Raises:
            BadGateway: the upstream cannot be reached.
            GatewayTimeout: connecting took over ``connect_timeout``.
        """
        upstream = await self.pool.checkout(host, port, owner, tls=tls)
        if upstream is None:
            upstream = await self.connect(
                host, port, tls=tls, via=via, preface=preface, owner=owner
            )
        return upstream

    async def connect(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        via: ParentProxy | None = None,
        preface: bytes = b"",
        owner: object = None,
    ) -> PooledUpstream:
        """A new HTTP connection to ``host:port``; as ``checkout``."""
        stream = await self.open_stream(host, port, tls=tls, via=via)
        config = self._config
        endpoint = UpstreamEndpoint(
            stream, read_size=config.read_size, max_head_size=config.max_head_size
        )
        if preface:
            try:
                await endpoint.send_framed(preface)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return PooledUpstream(endpoint, host, port, owner, tls=tls)

    async def open_stream(
        self, host: str, port: int, *, tls: bool = False, via: ParentProxy | None = None
    ) -> trio.abc.Stream:
        """A new stream to ``host:port`` (a tunnel's, or under ``connect``).

        With ``tls``, TLS over it, handshake done, verified as configured
        (``_tls_legs``). With ``via``, the stream is a CONNECT tunnel through
        that parent proxy (an ``https://`` target in forward mode with a
        parent: TLS end to end, verified by us as if direct).

        Raises:
            BadGateway: the upstream cannot be reached, the parent refused,
                or the TLS handshake failed (the message says why).
            GatewayTimeout: the TCP connect took over ``connect_timeout``, or
                the TLS handshake did, counted after it.
        """
        if via is None:
            stream = await self._open_tcp(host, port)
        else:
            stream = await self._open_through(via, host, port)
        if not tls:
            return stream
        timeout = self._config.connect_timeout
        with trio.move_on_after(timeout):
            return await open_upstream_tls(stream, self._config, self._meters, host=host, port=port)
        if self._meters is not None:
            self._meters.count_tls_failure("upstream", "timeout")
        raise GatewayTimeout(f"the TLS handshake with {host}:{port} took over {timeout:g} s")

    async def _open_tcp(self, host: str, port: int) -> trio.abc.Stream:
        timeout = self._config.connect_timeout
        with trio.move_on_after(timeout):
            return await self._open(host, port)
        raise GatewayTimeout(f"connecting to {host}:{port} took over {timeout:g} s")

    async def _open_through(self, parent: ParentProxy, host: str, port: int) -> trio.abc.Stream:
        """A CONNECT tunnel to ``host:port`` through ``parent``, for TLS inside it."""
        shown = f"[{host}]" if ":" in host else host
        stream, prefix = await self.open_tunnel_via(parent, f"{shown}:{port}".encode("ascii"))
        if prefix:  # a TLS server speaks only after the client's hello
            await trio.aclose_forcefully(stream)
            raise BadGateway(f"the parent proxy's tunnel to {host}:{port} sent bytes unasked")
        return stream

    async def release(self, upstream: PooledUpstream, *, reusable: bool) -> None:
        """Give ``upstream`` back after its exchange: pooled if ``reusable``, else closed."""
        await self.pool.release(upstream, reusable=reusable)

    async def open_tunnel_via(
        self, parent: ParentProxy, authority: bytes
    ) -> tuple[trio.abc.Stream, bytes]:
        """A tunnel to ``authority`` through ``parent``: a CONNECT it answered 2xx.

        Returns the stream to the parent, now carrying the tunnel, and the
        bytes the parent sent past its answer (the tunnel's first bytes).

        Raises:
            BadGateway: the parent cannot be reached, refused (407: our
                credentials), or answered anything but 2xx.
            GatewayTimeout: connecting, or the parent's answer, took too long.
        """
        upstream = await self.connect(parent.host, parent.port)
        endpoint = upstream.endpoint
        try:
            request = h11.Request(
                method=b"CONNECT",
                target=authority,
                headers=[(b"Host", authority), *parent.fields()],
            )
            await endpoint.send_head(request, end=True)
            response = await self._parent_answer(endpoint)
            refusal = parent_refusal(response.status_code, tunnel=True)
            if refusal is not None:
                raise refusal
            return endpoint.stream, endpoint.leftover()
        except BaseException:
            await trio.aclose_forcefully(endpoint.stream)
            raise

    async def _parent_answer(self, endpoint: UpstreamEndpoint) -> h11.Response:
        """The parent's final answer to CONNECT, within ``upstream_timeout``."""
        timeout = self._config.upstream_timeout
        with trio.move_on_after(timeout):
            while True:
                event = await endpoint.next_event()
                if isinstance(event, h11.Response):
                    return event
                if not isinstance(event, h11.InformationalResponse):
                    raise BadGateway(f"the parent proxy sent {type(event).__name__} to CONNECT")
        raise GatewayTimeout(f"the parent proxy did not answer CONNECT within {timeout:g} s")

    @staticmethod
    async def discard(upstream: PooledUpstream) -> None:
        """Close ``upstream`` at once (a failed or cancelled exchange)."""
        await trio.aclose_forcefully(upstream.endpoint.stream)
