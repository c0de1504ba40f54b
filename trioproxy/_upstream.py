"""Opening connections to upstreams, with failures translated to 502.

The connector is a plain async callable ``(host, port) -> trio.abc.Stream`` so
that tests and embedding applications can inject their own (an in-memory
stream, a resolver that never touches the network, a TLS wrapper). Timeouts are
not applied here: the caller wraps the call in its own deadline (trio's "let
your caller worry about it").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from ._errors import BadGateway

OpenUpstream = Callable[[str, int], Awaitable[trio.abc.Stream]]


async def open_tcp_upstream(host: str, port: int) -> trio.abc.Stream:
    """Open a TCP connection to ``host:port`` (happy eyeballs, via trio).

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
