"""Listening sockets that several processes share: SO_REUSEPORT.

``trio.open_tcp_listeners`` sets SO_REUSEADDR but not SO_REUSEPORT, so a
second process cannot bind the port. Workers (``_workers``) each open their
own listeners here instead: with SO_REUSEPORT on every socket, Linux keeps one
accept queue per socket and hashes each new connection (by its address
four-tuple) to one of the listening sockets in the group, so the workers share
the load without a shared accept queue and without a thundering herd.

This is ``trio.open_tcp_listeners`` with one more socket option, and nothing
else: one listener per address the host resolves to, IPv6 sockets IPv6-only,
the same backlog. Only processes of the same user may join a port's group,
so another user cannot steal connections.
"""

from __future__ import annotations

import errno

import trio

# The backlog trio.open_tcp_listeners uses by default: the largest value
# listen(2) takes, which the kernel clamps to net.core.somaxconn.
DEFAULT_BACKLOG = 0xFFFF


async def open_reuse_port_listeners(
    port: int, *, host: str | None = None, backlog: int | None = None
) -> list[trio.SocketListener]:
    """Like ``trio.open_tcp_listeners``, with SO_REUSEPORT set on each socket.

    Args:
        port: the port to listen on. 0 gives each socket a port of its own,
            which defeats sharing: pass the concrete port every worker uses.
        host: the address or name to bind; a name that resolves to several
            addresses gets one listener each. ``None``: both wildcards.
        backlog: the listen backlog; ``None`` for the system's maximum.

    Returns:
        The listeners, listening.

    Raises:
        OSError: if an address cannot be bound (e.g. another user's socket,
            or one without SO_REUSEPORT, holds the port).
    """
    addresses = await trio.socket.getaddrinfo(
        host, port, type=trio.socket.SOCK_STREAM, flags=trio.socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # e.g. no IPv6 here: serve the other family
                raise
            listeners.append(await _listen(sock, sockaddr, backlog))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} is supported here")
    return listeners


async def _listen(
    sock: trio.socket.SocketType, sockaddr: object, backlog: int | None
) -> trio.SocketListener:
    """Set the options, bind and listen; close ``sock`` on any failure."""
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        if sock.family == trio.socket.AF_INET6:
            sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(DEFAULT_BACKLOG if backlog is None else min(backlog, DEFAULT_BACKLOG))
        return trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise


def listening_line(host: str, port: int, *, tls: bool = False) -> str:
    """The one startup line on stderr, which scripts wait for and parse;
    ``https://`` when the listener speaks TLS."""
    shown = f"[{host}]" if ":" in host else host
    return f"trioproxy listening on {'https' if tls else 'http'}://{shown}:{port}"
