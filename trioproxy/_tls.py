"""TLS on both legs: contexts, two TLS streams with a memory bound, the upstream handshake.

Nothing here knows the server: the listener wraps accepted connections with
``tls_stream(..., server_side=True)`` and ``server_context(...)``; the
upstream connector calls ``open_tls_upstream`` on a TCP stream it opened with
``client_context(...)``. Both legs then look like any other ``trio.abc.Stream``.

Two streams, one choice. ``tls_stream`` is the one place that picks:

* ``SocketTLSStream`` for a bare ``trio.SocketStream`` (nothing read from
  it): the socket is detached from trio into an ``ssl.SSLSocket`` and
  OpenSSL reads and writes the kernel itself, trio only waiting when
  OpenSSL asks. No ciphertext passes through Python. Measured relaying
  1 GiB from a TLS origin (curl <- relay <- nginx): 688 MiB/s and 1.23 s of
  CPU per GiB, against 405 MiB/s and 2.33 s through ``BoundedTLSStream``.
* ``BoundedTLSStream`` for every other transport (in-memory test streams,
  ``_tls_legs.Replayed`` after a PROXY protocol header, TLS inside a parent
  proxy's tunnel): OpenSSL over two memory BIOs that it feeds and drains
  itself, a record at a time. What follows explains why it is not
  ``trio.SSLStream``.

Why not ``trio.SSLStream``. It keeps two OpenSSL memory BIOs, one each way,
and three of its habits break our memory bound:

1. ``send_all(data)`` encrypts *all* of ``data`` into the outgoing BIO before
   it sends a byte, so a 10 MiB argument is 10 MiB of ciphertext waiting for
   the peer.
2. ``receive_some()`` without ``max_bytes`` asks for ``_estimated_receive_size``,
   which grows to the largest transport read ever seen.
3. The transport read itself is ``transport.receive_some()`` with no size: the
   transport decides (64 KiB for ``trio.SocketStream``, everything buffered
   for an in-memory stream). trio once had ``max_refill_bytes`` for this; it
   was never used and was removed in trio 0.18, so there is nothing to pass.

And a fourth that makes any excess permanent: a memory BIO keeps its peak size
allocated after it is drained. One oversize call costs its size for the rest
of the connection. Measured with 200 in-memory connection pairs, each sending
1 MiB in one ``send_all`` and then idle: a bare ``SSLStream`` pair kept
2,144 KiB, a wrapper that sliced its calls 100 KiB at 16 KiB slices and 198
KiB at 64 KiB, against 53 KiB for pairs that had sent 100 bytes.

Slicing its calls bounds ``SSLStream`` but ties the BIOs' peak to the slice,
and small slices are slow: every slice is a transport call and trips
through the scheduler. Measured through the proxy, 16 KiB slices cost 6 s of
CPU per GiB through TLS termination, 64 KiB slices 4 s.
So ``BoundedTLSStream`` drives an ``ssl.SSLObject`` itself: it hands the
BIOs one record (16 KiB) at a time, so their peak is a record whatever the
call size, and moves a whole slice (``max_write``, ``max_read``: the proxy
uses its ``read_size``) per transport call and per ``receive_some``. The
small slice's memory with the large slice's speed; ``BoundedTLSStream`` has
the terms.

``https_compatible`` semantics on both legs, as trio calls them. Without them,
an EOF without a TLS close_notify would be an error, and closing would send
a close_notify (which can block on a stalled peer). Real HTTPS peers
routinely skip close_notify (RFC 2818 2.2.2), and HTTP has its own
end-of-message framing: h11 already refuses a Content-Length or chunked body
that ends early. Only a body delimited by the connection's close cannot be
told from a truncation, and that is so on plain TCP too. In a tunnel the
tunnelled protocol (usually TLS again, end to end) protects itself. So an EOF
with or without close_notify is an EOF, and closing never waits on the peer.

Half-close. A peer's TLS half-close works: after its close_notify we read
``b""`` and can still send (TLS 1.2 and 1.3 alike). Our own is not offered:
it would need a close_notify whose answer we must not wait for.
``BoundedTLSStream`` is therefore a ``trio.abc.Stream``, not a
``HalfCloseableStream``, and a tunnel (``_tunnel``) treats a TLS leg as a sink
that cannot half-close. See ``BoundedTLSStream`` for what that means.

Certificate names for SNI. Choosing a certificate by the client's server name
needs each certificate's DNS names, and Python's ``ssl`` reads a PEM's names
only from a live connection's peer certificate. The alternatives: the private
``ssl._ssl._test_decode_cert`` (CPython internals, may vanish), the
``cryptography`` package (a large compiled dependency for two fields), or an
in-memory handshake per certificate at start-up (it works only when the
certificate verifies, so not for an expired one). A DER walker that reads the
subjectAltName dNSNames and the subject CN is about fifty lines of
bounds-checked parsing of a structure fixed by RFC 5280, and the certificate it
reads is the operator's own file, which OpenSSL then loads and checks in full.
"""

from __future__ import annotations

import operator
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

import trio

from ._errors import BadGateway

StrPath: TypeAlias = str | os.PathLike[str]

# RFC 8446 5.1: a TLS record carries at most 2**14 bytes of plaintext, and one
# SSL read returns at most one record's plaintext (checked: a 64 KiB read of a
# 200 KB transfer returns 16,384 bytes, TLS 1.2 and 1.3). Writes of at most
# this much make one record each.
TLS_RECORD_SIZE = 16 * 1024
# RFC 8446 5.2: a TLS 1.3 record adds at most 256 bytes (header, content type,
# tag, padding). The TLS 1.2 suites OpenSSL offers stay under it: AES-GCM adds
# 29 bytes, CBC with SHA-384 at most 5 + 16 + 48 + 16 = 85.
TLS_RECORD_OVERHEAD = 256
# The defaults: a record per transport call. The BIOs see a record at a time
# whatever the slice (module comment), so a larger slice costs memory only
# while data moves and buys CPU: callers pass their own (the proxy: its
# read_size, see _tls_legs).
DEFAULT_MAX_WRITE = TLS_RECORD_SIZE
DEFAULT_MAX_READ = TLS_RECORD_SIZE

_ALPN = ["http/1.1"]


# --- contexts ----------------------------------------------------------------


def server_context(pairs: Sequence[tuple[StrPath, StrPath]]) -> ssl.SSLContext:
    """The listener's context: TLS 1.2 or later, ALPN http/1.1, certificates by SNI.

    Args:
        pairs: ``(certificate chain PEM, private key PEM)`` files. The first
            pair is the default; another pair is chosen when the client's
            server name matches one of its certificate's DNS names (exactly, or
            a ``*.`` wildcard standing for one label). An exact name wins over
            a wildcard, and an earlier pair over a later one.

    Returns:
        The default pair's context, whose ``sni_callback`` switches to the
        matching pair's context during the handshake.

    Raises:
        ValueError: no pairs, or a file that is missing, unreadable, not PEM,
            an encrypted key, or a key that does not match its certificate;
            the message names the file and the fault.
    """
    if not pairs:
        raise ValueError("TLS needs at least one certificate and key pair")
    loaded = [_server_pair_context(cert, key) for cert, key in pairs]
    contexts = [context for context, _ in loaded]
    if len(contexts) > 1:
        table = _SniTable([names for _, names in loaded])
        contexts[0].sni_callback = table.callback(contexts)
    return contexts[0]


def client_context(
    *,
    ca_file: StrPath | None = None,
    insecure: bool = False,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
) -> ssl.SSLContext:
    """The upstream leg's context: verification on unless ``insecure``, ALPN http/1.1.

    Args:
        ca_file: a PEM bundle to trust instead of the system store.
        insecure: check neither the certificate nor the host name.
        cert_file: a client certificate chain (PEM) to present.
        key_file: its private key, when not in ``cert_file``.

    Raises:
        ValueError: ``ca_file`` with ``insecure``, a key without a certificate,
            or a bad file (the message names it and the fault).
    """
    if insecure and ca_file is not None:
        raise ValueError("an upstream CA file and insecure mode contradict each other")
    if key_file is not None and cert_file is None:
        raise ValueError("an upstream client key needs its certificate")
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        with _file_errors("CA bundle", ca_file):
            context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.create_default_context()
    _configure(context)
    if cert_file is not None:
        _load_chain(context, cert_file, cert_file if key_file is None else key_file)
    return context


def _server_pair_context(cert: StrPath, key: StrPath) -> tuple[ssl.SSLContext, list[str]]:
    """One pair's context, and its certificate's names."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context)
    # A client-initiated renegotiation costs the server a handshake's CPU for
    # nothing a client needs; HTTP/1.1 over TLS 1.2 has no use for it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context, _load_chain(context, cert, key)


def _configure(context: ssl.SSLContext) -> None:
    """What both legs share. Set on every SNI context: after the switch,
    OpenSSL takes ALPN selection from the new context."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)


def _load_chain(context: ssl.SSLContext, cert: StrPath, key: StrPath) -> list[str]:
    """``load_cert_chain`` with faults named (OpenSSL says "PEM lib"); returns
    the certificate's names."""
    names = _certificate_names_from_file(cert)
    with _file_errors("private key", key), open(key, "rb") as file:
        if b"PRIVATE KEY-----" not in file.read():
            raise ValueError("no PEM private key")
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise ValueError(
            f"private key {os.fspath(key)}: encrypted keys are not supported"
        ) from None
    except ssl.SSLError as exc:
        where = f"certificate {os.fspath(cert)} with key {os.fspath(key)}"
        raise ValueError(f"{where}: {_describe_error(exc)}") from exc
    return names


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    # Without a callback, OpenSSL would prompt on the terminal: a server
    # started by a service manager would hang there.
    raise _EncryptedKey


@contextmanager
def _file_errors(what: str, path: StrPath) -> Iterator[None]:
    """Re-raise OS errors and parse errors as one-line ValueErrors naming ``path``."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {os.fspath(path)}: {_describe_error(exc)}") from exc


# --- SNI ---------------------------------------------------------------------


class _SniTable:
    """Server name -> index of the pair whose certificate carries it."""

    def __init__(self, names_per_pair: Sequence[Sequence[str]]) -> None:
        self._exact: dict[str, int] = {}
        self._wildcard: dict[str, int] = {}  # "*.example.com" under "example.com"
        for index, names in enumerate(names_per_pair):
            for name in names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], index)
                else:
                    self._exact.setdefault(name, index)

    def lookup(self, server_name: str) -> int | None:
        """The pair for ``server_name`` (an IDNA A-label, any case), or None."""
        name = server_name.rstrip(".").lower()
        if name in self._exact:
            return self._exact[name]
        _, dot, parent = name.partition(".")
        return self._wildcard.get(parent) if dot else None

    def callback(self, contexts: Sequence[ssl.SSLContext]) -> _SniCallback:
        # The default context holds this callback; the callback must not hold
        # the default context (a cycle), and never needs to: index 0 means
        # "stay", as does no match.
        return _SniCallback(self, [None, *contexts[1:]])


class _SniCallback:
    def __init__(self, table: _SniTable, contexts: list[ssl.SSLContext | None]) -> None:
        self._table = table
        self._contexts = contexts

    def __call__(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        if server_name is None:
            return
        index = self._table.lookup(server_name)
        chosen = None if index is None else self._contexts[index]
        if chosen is not None:
            ssl_object.context = chosen


# --- certificate names (a minimal DER walker, see the module comment) ----------

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_SEQUENCE, _SET, _OID, _OCTET_STRING = 0x30, 0x31, 0x06, 0x04
_VERSION, _EXTENSIONS = 0xA0, 0xA3  # [0] and [3] EXPLICIT in TBSCertificate
_DNS_NAME = 0x82  # GeneralName dNSName: [2] IMPLICIT IA5String
_SUBJECT_ALT_NAME = bytes.fromhex("551d11")  # OID 2.5.29.17
_COMMON_NAME = bytes.fromhex("550403")  # OID 2.5.4.3
_TEXT_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii"}  # UTF8, Printable, IA5
_Element: TypeAlias = tuple[int, int, int]  # tag, start of value, end of value


def _certificate_names_from_file(path: StrPath) -> list[str]:
    with _file_errors("certificate", path):
        with open(path, "rb") as file:
            match = _PEM_CERTIFICATE.search(file.read())
        if match is None:
            raise ValueError("no PEM certificate")
        return certificate_names(ssl.PEM_cert_to_DER_cert(match.group().decode("ascii")))


def certificate_names(der: bytes) -> list[str]:
    """The DNS names a certificate is for, lower-cased, in certificate order.

    The subjectAltName dNSNames; the subject CN only when there are none (as
    RFC 6125 6.4.4 lets clients fall back). IP addresses and other kinds of
    name are not server names and are skipped.

    Raises:
        ValueError: ``der`` is not a well-formed X.509 certificate.
    """
    certificate = _only(der, (_SEQUENCE, 0, len(der)), _SEQUENCE)
    fields = _children(der, _children(der, certificate, None)[0], None)
    if fields and fields[0][0] == _VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo, ...
    if len(fields) < 6:
        raise ValueError("not an X.509 certificate")
    names = [
        der[start:end].decode("ascii").lower()
        for extensions in fields[6:]
        if extensions[0] == _EXTENSIONS
        for value in _extension_values(der, extensions, _SUBJECT_ALT_NAME)
        for tag, start, end in _children(der, _only(der, value, _SEQUENCE), None)
        if tag == _DNS_NAME
    ]
    return names or _common_names(der, fields[4])


def _extension_values(der: bytes, extensions: _Element, oid: bytes) -> Iterator[_Element]:
    """The extnValue OCTET STRINGs of the extensions with ``oid``."""
    for extension in _children(der, _only(der, extensions, _SEQUENCE), _SEQUENCE):
        parts = _children(der, extension, None)
        if parts[0][0] == _OID and der[parts[0][1] : parts[0][2]] == oid:
            if parts[-1][0] != _OCTET_STRING:
                raise ValueError("malformed certificate extension")
            yield parts[-1]


def _common_names(der: bytes, subject: _Element) -> list[str]:
    names = []
    for attribute in (
        attribute
        for rdn in _children(der, subject, _SET)
        for attribute in _children(der, rdn, _SEQUENCE)
    ):
        parts = _children(der, attribute, None)
        (_, oid_start, oid_end), (tag, start, end) = parts[0], parts[-1]
        if der[oid_start:oid_end] == _COMMON_NAME and tag in _TEXT_TAGS:
            names.append(der[start:end].decode(_TEXT_TAGS[tag]).lower())
    return names


def _only(der: bytes, parent: _Element, tag: int) -> _Element:
    """The one element inside ``parent`` (an OCTET STRING or EXPLICIT wrapper)."""
    elements = _children(der, parent, tag)
    if len(elements) != 1:
        raise ValueError("malformed certificate")
    return elements[0]


def _children(der: bytes, parent: _Element, tag: int | None) -> list[_Element]:
    """The elements inside ``parent``'s value; each must have ``tag`` unless None."""
    elements = list(_elements(der, parent[1], parent[2]))
    if not elements or (tag is not None and any(element[0] != tag for element in elements)):
        raise ValueError("malformed certificate")
    return elements


def _elements(der: bytes, pos: int, end: int) -> Iterator[_Element]:
    """Parse the DER elements in ``der[pos:end]`` (definite lengths only)."""
    while pos < end:
        if pos + 2 > end:
            raise ValueError("truncated certificate")
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            count = length & 0x7F
            if not 1 <= count <= 4 or pos + count > end:
                raise ValueError("malformed certificate length")
            length = int.from_bytes(der[pos : pos + count], "big")
            pos += count
        if pos + length > end:
            raise ValueError("truncated certificate")
        yield tag, pos, pos + length
        pos += length


# --- the bounded stream ---------------------------------------------------------


def ciphertext_size(plaintext: int) -> int:
    """The most ciphertext ``plaintext`` bytes can take, in records of 16 KiB."""
    return plaintext + -(-plaintext // TLS_RECORD_SIZE) * TLS_RECORD_OVERHEAD


class _TLSStreamState(trio.abc.Stream):
    """What both TLS streams keep the same way: their terms, the one-task
    guards, and the state (open, broken: sends fail, closed)."""

    def _start(self, max_write: int, max_read: int) -> None:
        if max_write < 1 or max_read < 1:
            raise ValueError(f"max_write and max_read must be at least 1: {max_write}, {max_read}")
        self._max_write = max_write
        self._max_read = max_read
        self._handshake_done = False
        self._handshake_lock = trio.Lock()
        self._sending = _Busy("another task is sending on this TLS stream")
        self._receiving = _Busy("another task is receiving on this TLS stream")
        self._state = "open"  # open, broken (sends fail), closed
        self._eof = False  # receives return b"" from now on

    async def do_handshake(self) -> None:
        """Complete the handshake now (the first read or write would anyway).

        The deadline is the caller's: wrap it in ``trio.fail_after``.
        """
        self._check_usable()
        async with self._handshake_lock:
            if self._handshake_done:
                await trio.lowlevel.checkpoint()
                return
            try:
                await self._handshake()
            except BaseException:
                self._break()
                raise
            self._handshake_done = True

    async def _handshake(self) -> None:
        raise NotImplementedError

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``, ``max_write`` bytes of plaintext at a time."""
        with self._sending:
            self._check_sendable()
            if not self._handshake_done:
                await self.do_handshake()
            with memoryview(data) as whole, whole.cast("B") as view:
                if not view:
                    await trio.lowlevel.checkpoint()
                    return
                try:
                    for start in range(0, len(view), self._max_write):
                        await self._send_slice(view[start : start + self._max_write])
                except BaseException:  # part of a record may have gone: no more sends
                    self._break()
                    raise

    async def _send_slice(self, plaintext: memoryview) -> None:
        """Send one slice of at most ``max_write`` bytes, all of it."""
        raise NotImplementedError

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Up to ``min(max_bytes, max_read)`` bytes of plaintext; ``b""`` at EOF."""
        limit = self._receive_limit(max_bytes)
        with self._receiving:
            self._check_usable()
            if not self._handshake_done:
                await self.do_handshake()
            return await self._receive(limit)

    async def _receive(self, limit: int) -> bytes | bytearray:
        """At most ``limit`` bytes of plaintext, after the handshake; a checkpoint."""
        raise NotImplementedError

    @property
    def max_read(self) -> int:
        """The most plaintext one ``receive_some`` returns."""
        return self._max_read

    def _receive_limit(self, max_bytes: int | None) -> int:
        """``min(max_bytes, max_read)``, checked."""
        limit = self._max_read if max_bytes is None else operator.index(max_bytes)
        if limit < 1:
            raise ValueError(f"max_bytes must be at least 1, got {limit}")
        return min(limit, self._max_read)

    def _break(self) -> None:
        if self._state == "open":
            self._state = "broken"

    def _check_usable(self) -> None:
        if self._state == "closed":
            raise trio.ClosedResourceError
        if self._state == "broken" and not self._eof:
            raise trio.BrokenResourceError

    def _check_sendable(self) -> None:
        if self._state == "closed":
            raise trio.ClosedResourceError
        if self._state == "broken":
            raise trio.BrokenResourceError


class BoundedTLSStream(_TLSStreamState):
    """TLS over ``transport_stream`` with a stated bound on every buffer.

    A ``trio.abc.Stream`` driving an ``ssl.SSLObject`` over two memory BIOs
    (see the module comment for why not ``trio.SSLStream``):

    * ``send_all`` takes ``max_write`` bytes of plaintext at a time, encrypts
      them one record (16 KiB) at a time, reading each record's ciphertext
      out of the outgoing BIO at once, and sends the slice's records in one
      transport write;
    * ``receive_some`` reads the transport (at most the ciphertext of
      ``max_read``, ``ciphertext_size``) only when no whole record is
      waiting, feeds the incoming BIO one record's worth at a time, and
      returns the plaintext of as many records as fit in ``min(max_bytes,
      max_read)`` without waiting for more;
    * ``https_compatible`` semantics (module comment): an EOF with or without
      close_notify is an EOF, and ``aclose`` never sends close_notify.

    Memory: per stream, with ``W = max_write``, ``R = max_read`` and records
    of at most 16 KiB plaintext + 256 B framing (``TLS_RECORD_*``), besides
    the plaintext the caller hands in or gets back:

    * the BIOs keep their peak size for the connection's life (module
      comment), and that peak is now the record, not the call: at most one
      record in the outgoing BIO (16.25 KiB) and one record's worth fed into
      the incoming BIO (16.25 KiB), 32.5 KiB in all, whatever ``W`` and ``R``;
    * sending: one slice's ciphertext, ``C = W + ceil(W / 16 KiB) * 256 B``,
      held twice at the peak (the records and their join), then once until
      the transport takes it;
    * receiving: one transport read of at most ``C(R)`` bytes (the
      ciphertext of ``R``), fed to the BIO a record at a time and released
      once fed; the plaintext returned (at most ``R``) is the caller's.

    With ``W = R = 64 KiB`` (what the proxy uses: its ``read_size``): at most
    32.5 + 2 x 65 + 65 = 227.5 KiB while data moves, of which 32.5 KiB stays
    allocated when the connection idles, and 65 KiB (one slice of
    ciphertext) while a slow peer stalls a send. Not counted: OpenSSL's own
    per-connection state (keys, its record buffers, the peer's certificate);
    ``scripts/measure_overhead.py`` measures it.

    Concurrency: one task may send while another receives (a tunnel does);
    a second concurrent sender, or receiver, gets ``trio.BusyResourceError``.
    The transport is written under one lock: a receive may have to answer
    (the handshake, a TLS 1.3 key update).

    EOF and tunnels: ``receive_some`` returns ``b""`` when the peer ends the
    TLS session (close_notify) or just closes TCP. There is no ``send_eof``.
    In a tunnel (``_tunnel.tunnel``) that means:

    * EOF *from* the TLS leg is passed on as ``send_eof`` to the other leg
      when that leg can half-close (plain TCP). After a close_notify the TLS
      leg stays writable and the other direction keeps flowing. After a bare
      TCP close the stream is broken (as ``trio.SSLStream`` marks it), so the
      next write towards the TLS leg fails and the tunnel ends with a stream
      error (a peer that closed TCP has usually gone entirely).
    * EOF from the other leg *towards* the TLS leg is not passed on: the TLS
      peer sees nothing, that direction just ends, and the tunnel closes both
      legs once the TLS leg's own direction ends too (its peer closes) or the
      caller's idle timeout fires. A TLS peer that waits for EOF before it
      answers therefore waits for that timeout.

    Error handling: a TLS failure (handshake, a bad record) raises
    ``trio.BrokenResourceError`` whose ``__cause__`` is the ``ssl.SSLError``,
    as ``trio.SSLStream`` does; the transport's errors pass through. Either,
    or a cancelled send, leaves the stream broken: sends fail from then on.

    Args:
        transport_stream: the stream to run TLS over (usually a
            ``trio.SocketStream``). Kept as ``transport_stream``.
        ssl_context: from ``server_context`` or ``client_context``.
        server_side: True on the listener's side.
        server_hostname: the SNI and the name checked (client side).
        max_write: the most plaintext encrypted per transport write, at least 1.
        max_read: the largest read from the transport and the most plaintext
            returned per call, at least 1.

    Attributes:
        ssl_object: the ``ssl.SSLObject``, for ``cipher()``, ``version()``,
            ``selected_alpn_protocol()``, ``getpeercert()``. Do not read from
            or write to it directly.
        transport_stream: the transport passed in.
    """

    def __init__(
        self,
        transport_stream: trio.abc.Stream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        max_write: int = DEFAULT_MAX_WRITE,
        max_read: int = DEFAULT_MAX_READ,
    ) -> None:
        self._start(max_write, max_read)
        self.transport_stream = transport_stream
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = ssl_context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._max_read_ciphertext = ciphertext_size(max_read)
        self._unfed = _NOTHING  # transport bytes not yet in the incoming BIO
        self._delayed = b""  # a TLS 1.3 server's session tickets (do_handshake)
        self._transport_eof = False
        self._eof_fed = False
        self._transport_send_lock = trio.StrictFIFOLock()

    async def _handshake(self) -> None:
        while self._tls_step(self.ssl_object.do_handshake) is _WANT_READ:
            await self._flush()
            await self._fill()
        if self.ssl_object.server_side and self.ssl_object.version() == "TLSv1.3":
            # OpenSSL writes the session tickets at the end of a TLS
            # 1.3 server handshake; sent now, they could block on a
            # client that only sends (as trio.SSLStream found, its
            # issue 819). They go with our first data.
            self._delayed = self._outgoing.read()
        await self._flush()

    async def _send_slice(self, plaintext: memoryview) -> None:
        # One transport write per slice. Encrypting under the lock keeps the
        # order of the records with what a receive sends (a key update). The
        # lock is nearly always free:
        # take it without the scheduler round trip that ``async with`` costs
        # (the transport's send_all is this call's checkpoint).
        lock = self._transport_send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            ciphertext = self._encrypt(plaintext)
            if self._delayed:
                ciphertext, self._delayed = self._delayed + ciphertext, b""
            await self.transport_stream.send_all(ciphertext)
        finally:
            lock.release()

    def _encrypt(self, plaintext: memoryview) -> bytes:
        """The records of ``plaintext`` (and anything the outgoing BIO held
        before them), one record at a time through the BIO."""
        records = []
        for start in range(0, len(plaintext), TLS_RECORD_SIZE):
            self._tls_step(self.ssl_object.write, plaintext[start : start + TLS_RECORD_SIZE])
            records.append(self._outgoing.read())
        return records[0] if len(records) == 1 else b"".join(records)

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_sendable()
            await self.transport_stream.wait_send_all_might_not_block()

    async def _receive(self, limit: int) -> bytes | bytearray:
        waited = False
        while not self._eof:
            data = self._decrypt(limit)
            if data or self._eof:
                break
            await self._flush()  # what reading produced (a key update's answer)
            await self._fill()
            waited = True
        else:
            data = b""
        if not waited:
            await trio.lowlevel.checkpoint()
        return data

    def _decrypt(self, limit: int) -> bytes | bytearray:
        """The plaintext of the whole records waiting, at most ``limit``
        bytes; b"" if more must be read from the transport (or at the end of
        the session). The first record comes as its own bytes; when more fit,
        they are read into one buffer (no join)."""
        first: bytes = self._read_record(min(limit, TLS_RECORD_SIZE))
        if not first or len(first) >= limit:
            return first
        buffer = bytearray(limit)
        view = memoryview(buffer)
        view[: len(first)] = first
        size = len(first)
        while size < limit:
            got = self._read_record(min(limit - size, TLS_RECORD_SIZE), view[size:])
            if not got:
                break
            assert isinstance(got, int)
            size += got
        view.release()
        del buffer[size:]
        return buffer

    def _read_record(self, size: int, into: memoryview | None = None) -> Any:
        """One record's plaintext (at most ``size`` bytes, into ``into`` if
        given: then its length): feeds the incoming BIO first, so that it
        holds one record's worth, then reads; a falsy result when no whole
        record is there, or at the end of the session (``self._eof``)."""
        wanted = TLS_RECORD_SIZE + TLS_RECORD_OVERHEAD
        while True:
            if self._incoming.pending < wanted:
                self._feed(wanted - self._incoming.pending)
            args = (size,) if into is None else (size, into)
            try:
                got = self._tls_step(self.ssl_object.read, *args)
            except _Eof as eof:
                self._eof = True
                if eof.unclean:
                    self._state = "broken"  # as trio.SSLStream: only closing is left
                return b""
            if got is not _WANT_READ:
                if not got:  # the peer's close_notify (ssl says b"" rather than raise)
                    self._eof = True
                return got
            if not self._feed(wanted):
                return b""

    def _feed(self, size: int) -> bool:
        """Move up to ``size`` transport bytes into the incoming BIO, or the
        EOF once all are in; False when there is nothing to move."""
        if self._unfed:
            if size <= 0:
                return False
            piece = self._unfed[:size]
            self._incoming.write(piece)
            rest = self._unfed[len(piece) :]
            self._unfed = rest if rest else _NOTHING  # keep no view of a spent read
            return True
        if self._transport_eof and not self._eof_fed:
            self._incoming.write_eof()
            self._eof_fed = True
            return True
        return False

    async def _fill(self) -> None:
        """Read the transport once: at most the ciphertext of ``max_read``
        bytes of plaintext, so that one peer write of ``max_read`` comes in
        one read, not a full read and a sliver."""
        if not self._transport_eof:
            data = await self.transport_stream.receive_some(self._max_read_ciphertext)
            if data:
                self._unfed = memoryview(data)
            else:
                self._transport_eof = True
        self._feed(TLS_RECORD_SIZE + TLS_RECORD_OVERHEAD - self._incoming.pending)

    async def _flush(self) -> None:
        """Send whatever the TLS object put in the outgoing BIO."""
        if self._outgoing.pending:
            async with self._transport_send_lock:
                if self._outgoing.pending:
                    await self.transport_stream.send_all(self._outgoing.read())

    def _tls_step(self, operation: Callable[..., object], *args: object) -> object:
        """Run one SSLObject call: its result, or _WANT_READ when it needs
        more bytes from the peer. Raises _Eof at the end of the session, and
        BrokenResourceError (the SSLError as cause) on any TLS failure."""
        try:
            return operation(*args)
        except ssl.SSLWantReadError:
            return _WANT_READ
        except ssl.SSLZeroReturnError:
            raise _Eof(unclean=False) from None
        except ssl.SSLEOFError as exc:
            if self._handshake_done:
                raise _Eof(unclean=True) from None
            self._break()
            raise trio.BrokenResourceError from exc
        except ssl.SSLError as exc:
            self._break()
            raise trio.BrokenResourceError from exc

    async def aclose(self) -> None:
        """Close the transport (no close_notify: ``https_compatible``)."""
        self._state = "closed"
        await self.transport_stream.aclose()


_WANT_READ = object()
_NOTHING = memoryview(b"")


class _Eof(Exception):
    """The TLS session ended: close_notify (clean) or a bare TCP close."""

    def __init__(self, *, unclean: bool) -> None:
        self.unclean = unclean


class _Busy:
    """Refuses a second task in a block meant for one at a time."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


# --- the socket-backed stream ----------------------------------------------------


class SocketTLSStream(_TLSStreamState):
    """TLS over a TCP socket taken from a ``trio.SocketStream``: OpenSSL reads
    and writes the kernel socket itself (an ``ssl.SSLSocket``, non-blocking).

    ``BoundedTLSStream`` moves every byte of ciphertext through Python twice
    (a transport read, then a BIO write; a BIO read, then a transport write).
    Here OpenSSL reads each record straight from the kernel and writes each
    straight to it; trio only waits (``wait_readable``/``wait_writable``)
    when OpenSSL says it must (``SSLWantReadError``/``SSLWantWriteError``).
    Measured relaying 1 GiB from a TLS origin to a plain client: 1.2 s of CPU
    per GiB against 2.3 s for ``BoundedTLSStream``. It needs a real socket
    with nothing read ahead of it: ``tls_stream`` picks it for a bare
    ``trio.SocketStream`` and ``BoundedTLSStream`` for any other transport.

    The same terms as ``BoundedTLSStream``: ``https_compatible`` (an EOF with
    or without close_notify is an EOF, after a bare TCP close sends fail;
    ``aclose`` never sends close_notify nor waits on the peer), no
    ``send_eof`` (a tunnel treats it as a TLS leg), the same errors.

    Memory: per stream, besides the plaintext the caller hands in or gets back:

    * receiving: ``receive_some(max_bytes)`` returns at most ``min(max_bytes,
      max_read)`` bytes, read into one buffer of that size by one
      ``recv_into`` per record; the buffer is made when records are there,
      not while the call waits (an idle keep-alive connection holds none:
      measured, 64 KiB per idle connection otherwise). What it returns holds
      no more memory than its length: a shorter read is copied out of the
      buffer (a bytearray shrunk by less than half keeps its allocation, and
      a pump holding partial 128 KiB reads of a stalled download held ~50 KiB
      per connection more than it counted). OpenSSL reads a record only
      when asked for plaintext, and the whole record, so it holds at most one record
      (16 KiB + 256 B) beyond what was returned: the rest of a record that
      did not fit. Read-ahead (OpenSSL's ``SSL_CTX_set_read_ahead``) would
      let it take more from the kernel; it is off by default and Python's
      ``ssl`` cannot turn it on. Everything else waits in the kernel's
      receive buffer, where TCP flow control stops the peer.
    * sending: ``send_all`` hands OpenSSL ``max_write`` bytes of plaintext
      at a time (a view of the caller's data, not a copy); OpenSSL encrypts
      one record at a time into its write buffer and writes it to the
      kernel. A stalled peer therefore holds the kernel's send buffer, one
      slice of the caller's data and one record in OpenSSL.
    * OpenSSL's own per-connection state (keys, its two record buffers of
      about 17 KiB each, the peer's certificate): ``scripts/measure_overhead.py``.

    Concurrency: one task may send while another receives; a second
    concurrent sender or receiver gets ``trio.BusyResourceError``.

    Error handling: a TLS failure raises ``trio.BrokenResourceError`` whose
    ``__cause__`` is the ``ssl.SSLError`` (an OS error likewise), so
    ``describe_tls_failure`` and ``handshake_failure_reason`` read it as
    they read ``BoundedTLSStream``'s. A failed or cancelled handshake or
    send leaves the stream broken (a record may be half written): sends
    fail from then on. A receive cancelled while it waits loses nothing
    (OpenSSL had asked for more bytes and took none) and the stream stays
    usable, so a timeout on a read can still be answered.

    Args:
        transport_stream: a connected ``trio.SocketStream`` from which
            nothing has been read; its socket is detached into this stream
            (the ``trio.SocketStream`` is left empty; closing it does
            nothing).
        ssl_context: from ``server_context`` or ``client_context``.
        server_side: True on the listener's side.
        server_hostname: the SNI and the name checked (client side).
        max_write: the most plaintext handed to OpenSSL per write, at least 1.
        max_read: the most plaintext returned per call, at least 1.

    Raises:
        ValueError: ``max_write`` or ``max_read`` below 1.
        UnicodeError: ``server_hostname`` is no valid IDNA name (the socket
            is closed).

    Attributes:
        ssl_object: the ``ssl.SSLSocket``, for ``cipher()``, ``version()``,
            ``selected_alpn_protocol()``, ``getpeercert()``, ``getpeername()``.
            Do not read from or write to it directly.
        socket: the same object: the TCP socket under the stream.
    """

    def __init__(
        self,
        transport_stream: trio.SocketStream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        max_write: int = DEFAULT_MAX_WRITE,
        max_read: int = DEFAULT_MAX_READ,
    ) -> None:
        self._start(max_write, max_read)
        if server_hostname is not None:
            # ssl encodes the name as IDNA after it has taken the socket
            # over, and a bad name would leave that socket open: fail first.
            server_hostname.encode("idna")
        trio_socket = transport_stream.socket
        family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
        raw = socket.socket(family, kind, proto, fileno=trio_socket.detach())
        raw.setblocking(False)
        try:
            self.ssl_object = ssl_context.wrap_socket(
                raw,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,  # told apart below: a bare close breaks sends
            )
        except BaseException:
            raw.close()
            raise
        self.socket = self.ssl_object
        self._read_wait = trio.Lock()  # a send may wait readable, a receive writable
        self._write_wait = trio.Lock()

    async def _handshake(self) -> None:
        await self._retry(self.ssl_object.do_handshake)

    async def _send_slice(self, plaintext: memoryview) -> None:
        # One OpenSSL write per slice.
        while plaintext:  # send() takes all of it (no partial writes), or raises
            sent = await self._retry(self.ssl_object.send, plaintext)
            plaintext = plaintext[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_sendable()
            await trio.lowlevel.wait_writable(self.ssl_object)

    async def _receive(self, limit: int) -> bytes | bytearray:
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        data: bytearray = await self._retry(self._receive_now, limit)
        return data

    def _receive_now(self, limit: int) -> bytearray:
        """The plaintext of the records there, at most ``limit`` bytes;
        raises SSLWantReadError when none is. The buffer exists only while
        records are read: a stream waiting for its peer holds none."""
        buffer = bytearray(limit)
        with memoryview(buffer) as view:
            size = self._recv_into(view)
            size += self._recv_ready(view[size:]) if size else 0
            if size < limit:  # exactly its length (the class comment says why)
                return bytearray(view[:size])
        return buffer

    def _recv_into(self, view: memoryview) -> int:
        """One record's plaintext into ``view`` (its length), 0 at the end
        of the session; raises SSLWantReadError when no record is there."""
        try:
            got = self.ssl_object.recv_into(view, len(view))
        except ssl.SSLEOFError:  # a bare TCP close: EOF, as https_compatible wants
            self._eof = True
            self._break()  # as trio.SSLStream: only closing is left to do
            return 0
        if not got:  # the peer's close_notify
            self._eof = True
        return got

    def _recv_ready(self, view: memoryview) -> int:
        """More records' plaintext into ``view`` while they are there
        without waiting; their length."""
        size = 0
        while size < len(view):
            try:
                got = self._tls_call(self._recv_into, view[size:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not got:
                break
            size += got
        return size

    async def _retry(self, operation: Callable[..., Any], *args: object) -> Any:
        """Run ``operation(*args)`` until OpenSSL stops asking to wait; its result.

        A checkpoint either way; cancellation is seen only before the call
        or while waiting, never after the call has done its work."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                result = self._tls_call(operation, *args)
            except ssl.SSLWantReadError:
                lock, wait = self._read_wait, trio.lowlevel.wait_readable
            except ssl.SSLWantWriteError:
                lock, wait = self._write_wait, trio.lowlevel.wait_writable
            else:
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return result
            # Waiting outside the except block: the exception's traceback
            # would keep the failed attempt's frame (and its buffer) alive.
            async with lock:
                await wait(self.ssl_object)
            waited = True

    def _tls_call(self, operation: Callable[..., Any], *args: object) -> Any:
        """``operation(*args)``; the want errors pass, every other TLS or OS
        error becomes BrokenResourceError (the error as cause)."""
        if self._state == "closed":
            raise trio.ClosedResourceError
        try:
            return operation(*args)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except (ssl.SSLError, OSError) as exc:
            self._break()
            raise trio.BrokenResourceError from exc

    async def aclose(self) -> None:
        """Close the socket (no close_notify: ``https_compatible``)."""
        if self._state != "closed":
            self._state = "closed"
            trio.lowlevel.notify_closing(self.ssl_object)
            self.ssl_object.close()
        await trio.lowlevel.checkpoint()


def tls_stream(
    transport_stream: trio.abc.Stream,
    ssl_context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    max_write: int = DEFAULT_MAX_WRITE,
    max_read: int = DEFAULT_MAX_READ,
    max_socket_read: int | None = None,
) -> BoundedTLSStream | SocketTLSStream:
    """TLS over ``transport_stream``: the one place that picks the class.

    A bare ``trio.SocketStream`` (nothing read from it, so OpenSSL may take
    over its socket) gets a ``SocketTLSStream``; any other transport (an
    in-memory stream, bytes put back after a PROXY protocol header, TLS in a
    tunnel) a ``BoundedTLSStream``. The arguments are theirs, but for
    ``max_socket_read``: the ``SocketTLSStream``'s ``max_read`` if given. A
    larger cap costs that class nothing until a caller asks for more (each
    read takes what it is asked for, and one record beyond), where a
    ``BoundedTLSStream`` reads the transport by its ``max_read`` whatever it
    is asked for, and may hold that much while its reader waits.
    """
    if isinstance(transport_stream, trio.SocketStream):
        return SocketTLSStream(
            transport_stream,
            ssl_context,
            server_side=server_side,
            server_hostname=server_hostname,
            max_write=max_write,
            max_read=max_read if max_socket_read is None else max_socket_read,
        )
    return BoundedTLSStream(
        transport_stream,
        ssl_context,
        server_side=server_side,
        server_hostname=server_hostname,
        max_write=max_write,
        max_read=max_read,
    )


# --- the upstream handshake and its failures ---------------------------------------

# What a failed handshake raises: SSLStream turns every ssl.SSLError into
# BrokenResourceError (the SSLError as __cause__); transports raise these.
_HANDSHAKE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def open_tls_upstream(
    transport_stream: trio.abc.Stream,
    ssl_context: ssl.SSLContext,
    *,
    host: str,
    port: int,
    server_hostname: str | None = None,
    max_write: int = DEFAULT_MAX_WRITE,
    max_read: int = DEFAULT_MAX_READ,
    max_socket_read: int | None = None,
) -> BoundedTLSStream | SocketTLSStream:
    """Run TLS over an open connection to an upstream and finish the handshake.

    Args:
        transport_stream: the open connection to ``host:port``; this call owns it.
        ssl_context: usually from ``client_context``.
        host, port: the upstream, for the error message; ``host`` is the SNI
            and the name checked unless ``server_hostname`` is given.
        server_hostname: another name to send and check.
        max_write, max_read, max_socket_read: see ``tls_stream``.

    Returns:
        The TLS stream, handshake done (ALPN, certificate, cipher known).

    Raises:
        BadGateway: the handshake failed; one line such as ``TLS to
            example.com:443 failed: certificate verify failed: self-signed
            certificate``.

    Resource handling: on any failure, cancellation included, the transport
    is closed before this raises.

    Error handling: the deadline is the caller's, as for the TCP connect:
    ``with trio.fail_after(connect_timeout): await open_tls_upstream(...)``,
    and the caller maps the ``trio.TooSlowError`` to 504 (``GatewayTimeout``).
    """
    name = host if server_hostname is None else server_hostname
    try:
        stream = tls_stream(
            transport_stream,
            ssl_context,
            server_hostname=name,
            max_write=max_write,
            max_read=max_read,
            max_socket_read=max_socket_read,
        )
    except UnicodeError as exc:  # ssl IDNA-encodes the name (a label over 63 octets...)
        await trio.aclose_forcefully(transport_stream)
        raise BadGateway(f"TLS to {host}:{port} failed: invalid server name {name!r}") from exc
    done = False
    try:
        await stream.do_handshake()
        done = True
    except _HANDSHAKE_ERRORS as exc:
        raise BadGateway(f"TLS to {host}:{port} failed: {describe_tls_failure(exc)}") from exc
    finally:
        if not done:
            await trio.aclose_forcefully(stream)
    return stream


def describe_tls_failure(exc: BaseException) -> str:
    """A one-line reason for a failed TLS handshake, for logs and error pages.

    ``certificate verify failed: <OpenSSL's verify message>`` for a
    certificate, OpenSSL's reason in words (``wrong version number``) for
    other TLS errors, ``connection closed during the handshake`` for an EOF.
    """
    cause = _cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    if handshake_failure_reason(cause) == "eof":
        return "connection closed during the handshake"
    return _describe_error(cause)


# OpenSSL reasons -> labels. "not_tls": the bytes were no TLS record at all (a
# plain HTTP request or response, garbage). "protocol_version": TLS, but a
# version the other side refuses (a TLS 1.1 client). "cert_rejected": the peer
# refused our certificate (its alert; a verify failure on our side is
# "verify_failed").
_REASON_LABELS = {
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "WRONG_VERSION_NUMBER": "not_tls",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "SSLV3_ALERT_BAD_CERTIFICATE": "cert_rejected",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "cert_rejected",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "cert_rejected",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "cert_rejected",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "cert_rejected",
    "TLSV1_ALERT_UNKNOWN_CA": "cert_rejected",
}


def handshake_failure_reason(exc: BaseException) -> str:
    """A short label for a failed handshake, for a metrics counter.

    One of ``verify_failed``, ``cert_rejected``, ``not_tls``,
    ``protocol_version``, ``timeout`` (``trio.TooSlowError``), ``eof`` (the
    peer closed or reset the connection) or ``other``. Accepts what the
    handshake raised, or a ``BadGateway`` raised from it.
    """
    cause = _cause(exc)
    if isinstance(cause, trio.TooSlowError):
        return "timeout"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return "verify_failed"
    if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return "eof"
    if isinstance(cause, ssl.SSLError):
        return _REASON_LABELS.get(_openssl_reason(cause), "other")
    if isinstance(cause, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return "eof"
    return "other"


def _cause(exc: BaseException) -> BaseException:
    """The first OS or TLS error (or timeout) in the ``__cause__`` chain, else the last link."""
    while not isinstance(exc, OSError | trio.TooSlowError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _openssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code (``WRONG_VERSION_NUMBER``); "" for an SSLError
    made without one (by Python code rather than by the ssl module)."""
    return getattr(exc, "reason", None) or ""


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and _openssl_reason(exc):
        return _openssl_reason(exc).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
