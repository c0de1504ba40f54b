"""Where TLS meets the proxy: the listener's leg and the upstream leg.

``_tls`` knows TLS and nothing of the proxy; this module knows the settings,
the metrics and what a failure becomes, and is all the rest of the proxy
calls:

* ``listener_context`` / ``upstream_context``: the ``ssl.SSLContext`` of each
  leg, from ``--tls-cert``/``--tls-key`` and ``--upstream-ca``,
  ``--upstream-insecure``, ``--upstream-cert``/``--upstream-key``.
  ``prepare_tls`` builds both once at start, so a bad file stops the
  start with one line instead of failing the first request (forward mode
  with the system store alone builds its upstream context at the first
  ``https://`` target: no file to check, and 1.7 MB spared until then).
* ``accept_tls``: the client's handshake on an accepted connection, within
  ``--tls-handshake-timeout``; a client that speaks plain HTTP, sends garbage
  or stalls raises ``HandshakeFailed`` (counted by reason), and the
  connection ends with one access log line and nothing else.
* ``open_upstream_tls``: TLS over a new upstream connection, SNI and the name
  checked from the URL's host or ``--upstream-sni``; a failure is a 502 whose
  message says why (``certificate verify failed: ...``). The caller's
  ``connect_timeout`` covers TCP and TLS together, and its expiry is a 504.

Which TLS stream a leg gets is not decided here either: both legs call
``_tls.tls_stream`` (through ``open_tls_upstream`` on the upstream's), which
gives a bare TCP connection a ``SocketTLSStream`` (OpenSSL on the socket
itself, about half the CPU per byte) and anything else a
``BoundedTLSStream``: a client connection after a PROXY protocol header
(``Replayed``: bytes were read ahead) and TLS through a parent proxy's
tunnel. Neither offers ``send_eof``, which is how ``_tunnel`` knows a TLS
leg. Which body path a TLS leg takes is not decided here: ``choose_body_path``
(``_exchange``) splices only between two plain sockets, so any TLS leg goes
through the bounded pump, and tunnels likewise (``_switching``).

The slice size. Every TLS stream here writes at most ``read_size`` bytes of
plaintext per transport write and reads at most the ciphertext of
``read_size`` per transport read (``BoundedTLSStream``; ``tls_slices``): the
issue's "≤ read_size per call"; ``SocketTLSStream`` hands OpenSSL at most
``read_size`` per write and returns what it is asked for, at most
``bypass_chunk_size`` per read (a body past h11 reads in chunks of a third of
the per-direction bound, 128 KiB by default; everything else asks for
``read_size``), OpenSSL taking at most one record from the kernel beyond it.
The memory BIOs, which keep their peak size for the connection's life, see
one 16 KiB record at a time whatever the slice, so the slice costs memory
only while data moves (one slice of ciphertext held while the peer is slow),
and a connection that once moved a large body keeps about 32 KiB of BIO
afterwards, not a slice's worth. Why
not smaller: measured through the real proxy (1 GiB, curl, nginx origin,
this 2-core machine), process CPU per GiB fell from 5.8-6.0 s (16 KiB slices)
and 4.6-5.0 s (32 KiB) to 3.9-4.0 s (64 KiB) through TLS termination, and
from 9.2 s and 5.3-5.6 s to 3.6-3.9 s through a TLS upstream; docs/memory.md
has the table.

Upstream contexts are built once per distinct setting and kept
(``upstream_context``): a context loads the CA bundle (the system store is
a few hundred certificates), which costs milliseconds and about a MiB, far
too much per connection. A changed file under the same name is read at the
next start.
"""

from __future__ import annotations

import functools
import ssl
from typing import TYPE_CHECKING

import trio

from ._config import ProxyConfig
from ._errors import BadGateway
from ._metrics import ProxyMeters

# ``_tls`` is imported inside the functions that build a TLS leg: a proxy
# without TLS settings never needs it, and its code is 0.3 MB of RSS
# (measured at idle after a trim: 29.5 MB with it, 29.2 MB without); forward
# mode loads it at the first ``https://`` target.
if TYPE_CHECKING:
    from ._tls import BoundedTLSStream, SocketTLSStream

# What a failed server-side handshake raises: trio wraps every ssl.SSLError
# in BrokenResourceError; transports raise the others.
_HANDSHAKE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def tls_slices(config: ProxyConfig) -> tuple[int, int, int]:
    """``(max_write, max_read, max_socket_read)`` of every TLS stream:
    ``read_size``, but for the most a ``SocketTLSStream`` returns, which is
    ``bypass_chunk_size``: a body past h11 asks for that much per read (the
    module comment says why)."""
    return config.read_size, config.read_size, config.bypass_chunk_size


class HandshakeFailed(Exception):
    """A client's TLS handshake failed; already counted in the meters.

    Attributes:
        reason: the label (``handshake_failure_reason``): ``not_tls``,
            ``timeout``, ``eof``, ...
        description: one line for the log (``wrong version number``).
        stream: the TLS stream whose handshake failed, not closed yet; it
            owns the connection's socket when it took it over
            (``_tls.SocketTLSStream``), so the caller closes this one.
    """

    def __init__(self, reason: str, description: str, stream: trio.abc.Stream) -> None:
        super().__init__(f"TLS handshake failed: {description}")
        self.reason = reason
        self.description = description
        self.stream = stream


# --- contexts ------------------------------------------------------------------


def listener_context(config: ProxyConfig) -> ssl.SSLContext | None:
    """The listener's context (``--tls-cert``/``--tls-key``), or None for plain TCP.

    Raises:
        ValueError: a certificate or key file is missing or bad (the message
            names it).
    """
    if not config.tls_pairs:
        return None
    from ._tls import server_context

    return server_context(config.tls_pairs)


def upstream_context(config: ProxyConfig) -> ssl.SSLContext:
    """The context for TLS to upstreams, shared by every connection with
    the same settings.

    Raises:
        ValueError: the CA bundle or client certificate is missing or bad.
    """
    return _client_context(
        config.upstream_ca, config.upstream_insecure, config.upstream_cert, config.upstream_key
    )


# A handful of distinct settings per process at most (one config, or a few
# across reloads); each entry is one context.
@functools.lru_cache(maxsize=8)
def _client_context(
    ca_file: str | None, insecure: bool, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    from ._tls import client_context

    return client_context(
        ca_file=ca_file, insecure=insecure, cert_file=cert_file, key_file=key_file
    )


def needs_upstream_tls(config: ProxyConfig) -> bool:
    """Whether upstream TLS can happen: an https:// upstream, or forward
    mode (an https:// target may come)."""
    return config.upstream is None or config.upstream.tls


def _names_upstream_tls_files(config: ProxyConfig) -> bool:
    """Whether the upstream context depends on anything but the system store."""
    return bool(config.upstream_ca or config.upstream_cert or config.upstream_insecure)


def prepare_tls(config: ProxyConfig) -> ssl.SSLContext | None:
    """Build every context the settings ask for, so that a bad file stops
    the start rather than the first request; return the listener's.

    Forward mode with the default upstream trust (the system store, no file
    named) builds its upstream context at the first ``https://`` target
    instead: no file can be wrong, and the store's certificates cost 1.7 MB
    of RSS (measured idle: 31.3 MB with it, 29.6 MB without) that a proxy
    never asked for an https:// target would carry for nothing. Loading
    them then holds the event loop once, for ~25 ms (144 certificates). Not
    in a worker thread: a thread's real time lets a test's autojump clock
    run ahead while it works, and a hop per new TLS connection buys nothing
    once the context is cached.

    Raises:
        ValueError: naming the file and the fault.
    """
    reverse_https = config.upstream is not None and config.upstream.tls
    if reverse_https or (needs_upstream_tls(config) and _names_upstream_tls_files(config)):
        upstream_context(config)
    return listener_context(config)


# --- the client's leg -------------------------------------------------------------


async def accept_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    config: ProxyConfig,
    meters: ProxyMeters,
    *,
    initial: bytes = b"",
) -> BoundedTLSStream | SocketTLSStream:
    """Run the server side of TLS on an accepted connection, handshake done.

    Args:
        stream: the accepted connection; the returned stream owns it.
        context: from ``listener_context``.
        config: gives ``tls_handshake_timeout``.
        meters: counts the handshake or its failure.
        initial: bytes already read from ``stream`` (past a PROXY protocol
            header): the start of the client's handshake.

    Raises:
        HandshakeFailed: no handshake within ``tls_handshake_timeout``, or a
            client that is not speaking TLS, refused our certificate, or
            left. Its ``stream`` is the TLS stream, for the caller to
            close (after logging, so that the log line comes first): it
            may own ``stream``'s socket now (``_tls.tls_stream``).

    Memory: the ``SocketTLSStream`` terms (a bare TCP connection) or the
    ``BoundedTLSStream`` terms (after a PROXY header: bytes read ahead) for
    slices of ``read_size`` (``tls_slices``), plus OpenSSL's own
    per-connection state.
    """
    from ._tls import tls_stream

    transport = stream if not initial else Replayed(stream, initial)
    max_write, max_read, max_socket_read = tls_slices(config)
    client = tls_stream(
        transport,
        context,
        server_side=True,
        max_write=max_write,
        max_read=max_read,
        max_socket_read=max_socket_read,
    )
    try:
        with trio.fail_after(config.tls_handshake_timeout):
            await client.do_handshake()
    except (trio.TooSlowError, *_HANDSHAKE_ERRORS) as exc:
        raise _handshake_failed(exc, config, meters, client) from exc
    except BaseException:  # cancelled: the TLS stream may own the socket now
        await trio.aclose_forcefully(client)
        raise
    meters.count_tls_handshake("client")
    return client


def _handshake_failed(
    exc: BaseException, config: ProxyConfig, meters: ProxyMeters, stream: trio.abc.Stream
) -> HandshakeFailed:
    """What a failed client handshake raises, counted by its reason."""
    from ._tls import describe_tls_failure, handshake_failure_reason

    reason = handshake_failure_reason(exc)
    meters.count_tls_failure("client", reason)
    if reason == "timeout":
        description = f"no handshake within {config.tls_handshake_timeout:g} s"
    else:
        description = describe_tls_failure(exc)
    return HandshakeFailed(reason, description, stream)


class Replayed(trio.abc.Stream):
    """``stream`` with ``initial`` bytes put back in front of what it receives.

    Memory: ``initial`` (at most one read of the caller's) until it is read.
    """

    def __init__(self, stream: trio.abc.Stream, initial: bytes) -> None:
        self.transport_stream = stream
        self._initial = initial

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._initial:
            return await self.transport_stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._initial) if max_bytes is None else max_bytes
        data, self._initial = self._initial[:size], self._initial[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


# --- the upstream's leg -------------------------------------------------------------


async def open_upstream_tls(
    stream: trio.abc.Stream,
    config: ProxyConfig,
    meters: ProxyMeters | None,
    *,
    host: str,
    port: int,
) -> BoundedTLSStream | SocketTLSStream:
    """TLS over a new connection to ``host:port``, verified as the settings say.

    The name sent and checked is ``host``, or ``--upstream-sni`` for the
    reverse-mode upstream itself. The deadline is the caller's (the
    connector's ``connect_timeout``, which covers TCP and TLS together).

    Raises:
        BadGateway: the handshake failed; the message says why, e.g. ``TLS
            to origin.test:443 failed: certificate verify failed:
            self-signed certificate``. ``stream`` is closed.
    """
    from ._tls import handshake_failure_reason, open_tls_upstream

    upstream = config.upstream
    server_hostname = None
    if upstream is not None and (upstream.host, upstream.port) == (host, port):
        server_hostname = config.upstream_sni
    max_write, max_read, max_socket_read = tls_slices(config)
    try:
        tls_stream = await open_tls_upstream(
            stream,
            upstream_context(config),
            host=host,
            port=port,
            server_hostname=server_hostname,
            max_write=max_write,
            max_read=max_read,
            max_socket_read=max_socket_read,
        )
    except BadGateway as exc:
        if meters is not None:
            meters.count_tls_failure("upstream", handshake_failure_reason(exc))
        raise
    if meters is not None:
        meters.count_tls_handshake("upstream")
    return tls_stream
