"""Turning an HTTP exchange into a tunnel: CONNECT's 2xx and Upgrade's 101.

Both are the same move. A head is answered (``200 Connection established`` to
CONNECT, the upstream's ``101 Switching Protocols`` to an Upgrade request),
after which h11 says ``SWITCHED_PROTOCOL`` and the connection carries raw
bytes. h11 may already have read bytes past the last head; it hands them out
as the endpoint's ``leftover``, and they go into the tunnel first, so no byte
is lost (a TLS ClientHello sent right after CONNECT, a WebSocket frame sent
right after the 101).

The exchange decides when to switch; this module does the switch.
"""

from __future__ import annotations

import logging

import attrs
import h11
import trio

from ._config import ProxyConfig
from ._endpoint import ClientEndpoint, UpstreamEndpoint
from ._errors import BadGateway, BadRequest
from ._http import VIA_VALUE, client_response_headers, upgrade_fields
from ._relay import BufferGauge
from ._splice import splice_pipe_size
from ._tunnel import Tunnel, TunnelStatistics
from ._watchdog import watch_stalls

logger = logging.getLogger("trioproxy")


@attrs.frozen
class TunnelOutcome:
    """What a tunnel carried and how it ended, for the log and the metrics.

    Attributes:
        bytes_up: bytes relayed client -> upstream (the prefix included).
        bytes_down: bytes relayed upstream -> client.
        ended: ``"client EOF"`` or ``"upstream EOF"`` (whichever side
            finished first; the other then finished too), ``"stall timeout"``,
            or ``"error"``.
        error: the stream error that broke it off, if ``ended`` is ``"error"``.
    """

    bytes_up: int
    bytes_down: int
    ended: str
    error: str | None = None

    @classmethod
    def of(cls, statistics: TunnelStatistics, *, stalled: bool) -> TunnelOutcome:
        up, down = statistics.a_to_b.bytes_relayed, statistics.b_to_a.bytes_relayed
        if stalled:
            return cls(up, down, "stall timeout")
        if statistics.error is not None:
            return cls(up, down, "error", statistics.error)
        return cls(up, down, "client EOF" if statistics.first_eof == "a" else "upstream EOF")


async def receive_connect_end(client: ClientEndpoint) -> None:
    """Read the end of a CONNECT request, which must have no body.

    Raises:
        BadRequest: when the CONNECT request announces a body (it has no
            defined meaning, and its bytes would be mistaken for the tunnel's).
    """
    event = await client.next_event()
    if not isinstance(event, h11.EndOfMessage):
        raise BadRequest("a CONNECT request must not have a body")


async def tunnel_after_connect(
    client: ClientEndpoint,
    upstream_stream: trio.abc.Stream,
    config: ProxyConfig,
    gauge: BufferGauge,
    *,
    upstream_prefix: bytes = b"",
) -> TunnelOutcome:
    """Answer ``200 Connection established``, then tunnel client <-> upstream.

    ``upstream_prefix``: bytes already read from the upstream (a parent
    proxy's, past its answer to our CONNECT); they reach the client first.

    Resource handling: both streams are closed when this returns.
    """
    await client.send_head(
        h11.Response(
            status_code=200, headers=[(b"Via", VIA_VALUE)], reason=b"Connection established"
        )
    )
    return await _tunnel(
        client.stream, upstream_stream, client.leftover(), upstream_prefix, config, gauge
    )


async def tunnel_after_upgrade(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    response: h11.InformationalResponse,
    config: ProxyConfig,
    gauge: BufferGauge,
) -> TunnelOutcome:
    """Forward the upstream's 101 with its Upgrade fields, then tunnel.

    Call once the request body pump has ended; if it delivered the whole
    request, both h11 connections can switch.

    Resource handling: both streams are closed when this returns.

    Raises:
        BadGateway: if the request did not reach the upstream whole (it
            switched, then stopped reading), so the switch cannot be made.
    """
    if not upstream.switched:
        raise BadGateway("upstream switched protocols before it read the whole request")
    raw = response.headers.raw_items()
    await client.send_head(
        h11.InformationalResponse(
            status_code=101,
            headers=[*client_response_headers(raw), *upgrade_fields(raw)],
            reason=response.reason,
        )
    )
    return await _tunnel(
        client.stream, upstream.stream, client.leftover(), upstream.leftover(), config, gauge
    )


async def _tunnel(
    client_stream: trio.abc.Stream,
    upstream_stream: trio.abc.Stream,
    client_prefix: bytes,
    upstream_prefix: bytes,
    config: ProxyConfig,
    gauge: BufferGauge,
) -> TunnelOutcome:
    """Run the tunnel; end it once no byte has moved either way for
    ``config.stall_timeout`` (a peer that went silent, or half-closed and
    never finished, must not hold two connections for ever).

    The prefixes are what each side's h11 read past its last head (at most
    ``read_size`` each); they reach the other side first.
    """
    relay = Tunnel(
        read_size=config.read_size,
        buffer_chunks=config.buffer_chunks,
        gauge=gauge,
        # Zero-copy where both are plain sockets on Linux (and not --no-splice).
        splice_pipe_size=splice_pipe_size(config, client_stream, upstream_stream, None),
    )
    async with watch_stalls(relay.progress, config.stall_timeout) as watchdog:
        await relay.run(
            client_stream, upstream_stream, a_prefix=client_prefix, b_prefix=upstream_prefix
        )
    outcome = TunnelOutcome.of(relay.statistics(), stalled=watchdog.stalled)
    logger.debug(
        "tunnel ended (%s): %d bytes up, %d bytes down",
        outcome.ended,
        outcome.bytes_up,
        outcome.bytes_down,
    )
    return outcome
