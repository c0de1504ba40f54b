"""HAProxy's PROXY protocol, versions 1 (text) and 2 (binary), sans-I/O.

A balancer in front of the proxy opens its own TCP connection to us, so the
peer address we see is the balancer's. The PROXY protocol has it write the
client's address first, before any byte of HTTP: one text line in version 1
(``PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n``), a binary block in
version 2 (a 12-byte signature, version and command, family, a 16-bit length,
the addresses, then optional TLVs). The spec is HAProxy's
``doc/proxy-protocol.txt``; section numbers below refer to it.

What this module decides, and why:

* **Never guess** (sections 2 and 5). The caller configures a listener to
  expect the header; here the first bytes must be one of the two signatures
  (``PROXY `` or ``\\r\\n\\r\\n\\x00\\r\\nQUIT\\n``) and anything else is an
  error at the first byte that departs from both. There is no "no header"
  result: a client that could skip the header could spoof its address.
* **Reject what is not exactly the format**, as the spec asks (2.1: "any
  sequence which does not exactly match the protocol must be discarded"):
  single spaces, CRLF and not a lone CR or LF, decimal numbers without
  leading zeroes, addresses of the announced family, ports 0-65535, version
  nibble 2, commands LOCAL and PROXY only, the defined families and
  protocols only, a length that holds the announced addresses and TLVs that
  fit exactly.
* **Keep the peer's address** where the spec says the sender could not fill
  it: v1 ``UNKNOWN`` (its rest of line is ignored, 2.1), v2 ``LOCAL`` (a
  health check by the balancer itself; family and addresses are ignored),
  and v2 ``PROXY`` with an unspecified family or protocol, ``AF_UNIX``, or
  UDP: the spec lets a receiver that does not support a valid combination
  "fall back to the UNSPEC mode" (2.2), and a UNIX path or a datagram
  source is no client for an HTTP proxy's allow list or logs.
* **Bounded buffering.** A v1 line must end within 107 bytes (2.1's worst
  case, ``PROXY UNKNOWN`` with two full IPv6 addresses and ports). A v2
  header is 16 bytes plus its length field, at most 65,535; we cap the length
  at ``MAX_V2_LENGTH`` (below) so a pending connection cannot make us hold
  64 KiB.
* **Consume only the header.** The parser takes from each chunk only the
  bytes that belong to the header and says where they end; what follows is
  the start of HTTP and stays the caller's.
* **TLVs are skipped**, but their framing is checked (type, 16-bit length,
  value within the header), as HAProxy's receiver does. PP2_TYPE_CRC32C is
  not verified: the spec makes it optional for receivers.

``read_proxy_header`` is the I/O half: it reads from a trio stream, never
more than the header can still need, and takes no timeout: the caller wraps
it in ``trio.fail_after`` (the spec suggests at least 3 s, to cover a TCP
retransmission).
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from typing import Final, Literal

import attrs
import trio

Address = tuple[str, int]

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# 2.1: "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", the
# longest line a sender may produce, CRLF included.
V1_MAX_LINE: Final = 107
# Signature, version and command, family and protocol, 16-bit length.
V2_FIXED_LENGTH: Final = 16
# The largest v2 length field we accept (the addresses plus TLVs). The field
# allows 65,535, but the addresses take at most 216 bytes (two AF_UNIX paths)
# and the TLVs balancers send are small: ALPN, the authority (a host name,
# at most 255), a unique ID (at most 128, 2.2.5), SSL details (version,
# client certificate CN, cipher and algorithm names), cloud endpoint IDs;
# together well under 1 KiB. 4 KiB leaves room for that and keeps what one
# connection can make us hold before it is accepted at 16 + 4,096 bytes
# instead of 65,551.
MAX_V2_LENGTH: Final = 4096
# A v2 header in its shortest form: 16 bytes. Reading no more than this
# before the version is known never reads past a v2 header; a v1 line is at
# least 15 bytes ("PROXY UNKNOWN\r\n"), so this first read takes at most one byte
# of what follows it (handed back with the header).
_FIRST_READ: Final = V2_FIXED_LENGTH

_COMMAND_LOCAL: Final = 0x0
_COMMAND_PROXY: Final = 0x1
_FAMILY_UNSPEC: Final = 0x0
_FAMILY_INET: Final = 0x1
_FAMILY_INET6: Final = 0x2
_FAMILY_UNIX: Final = 0x3
_PROTOCOL_UNSPEC: Final = 0x0
_PROTOCOL_STREAM: Final = 0x1
_PROTOCOL_DGRAM: Final = 0x2
# Bytes of the address block for each family (2.2): two addresses, then two
# 16-bit ports for INET and INET6.
_ADDRESS_BLOCK_LENGTH: Final = {
    _FAMILY_UNSPEC: 0,
    _FAMILY_INET: 2 * 4 + 2 * 2,
    _FAMILY_INET6: 2 * 16 + 2 * 2,
    _FAMILY_UNIX: 2 * 108,
}
_TLV_HEAD: Final = struct.Struct(">BH")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
# How much of a rejected header an error message shows (it goes to a log).
_SHOWN_BYTES: Final = 40


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY protocol header; close the connection."""


class Family(enum.Enum):
    """What a header says about the client's address.

    ``TCP4`` and ``TCP6`` carry it; ``LOCAL`` (v2) and ``UNKNOWN`` (v1, and
    v2 PROXY headers whose family we do not use) mean: keep the address of
    the peer that sent the header.
    """

    TCP4 = "TCP4"
    TCP6 = "TCP6"
    LOCAL = "LOCAL"
    UNKNOWN = "UNKNOWN"


@attrs.frozen
class ProxyHeader:
    """One parsed PROXY protocol header.

    Attributes:
        version: 1 (text) or 2 (binary).
        family: TCP4 or TCP6 when addresses are carried; LOCAL or UNKNOWN
            when the peer's own address is to be kept.
        source: the client's (host, port), or None for LOCAL and UNKNOWN.
        destination: the address the client connected to, or None.
        length: bytes the header took on the wire, signature to last TLV.
    """

    version: Literal[1, 2]
    family: Family
    source: Address | None = None
    destination: Address | None = None
    length: int = 0

    def client_address(self, peer: Address) -> Address:
        """The client: the carried source, or ``peer`` when none is carried."""
        return peer if self.source is None else self.source


@attrs.frozen
class Complete:
    """The header is complete.

    Attributes:
        header: what it carried.
        end: offset in the chunk just fed where the header ended;
            ``data[end:]`` is the start of what follows (HTTP).
    """

    header: ProxyHeader
    end: int


class NeedData(enum.Enum):
    """The header is not complete yet: feed more bytes."""

    NEED_DATA = enum.auto()


NEED_DATA: Final = NeedData.NEED_DATA


def _shown(data: bytes | bytearray) -> str:
    shown = bytes(data[:_SHOWN_BYTES])
    return repr(shown) + ("..." if len(data) > _SHOWN_BYTES else "")


class ProxyHeaderParser:
    """Parses one PROXY protocol header fed in chunks of any size.

    ``feed`` returns ``NEED_DATA`` until the header is complete, then a
    ``Complete``; it raises ``ProxyProtocolError`` as soon as the bytes so far
    cannot begin a valid header, or when a complete one is invalid. Feeding
    after it has finished (either way) is a ``RuntimeError``.

    Memory: it copies only the header's own bytes: at most ``V1_MAX_LINE``
    (107) for a v1 line, at most ``V2_FIXED_LENGTH + max_v2_length``
    (16 + 4,096 by default) for a v2 header.

    Args:
        max_v2_length: the largest v2 length field accepted.
    """

    def __init__(self, *, max_v2_length: int = MAX_V2_LENGTH) -> None:
        if not 0 <= max_v2_length <= 0xFFFF:
            raise ValueError(f"max_v2_length must be 0 to 65535, not {max_v2_length}")
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._version: Literal[0, 1, 2] = 0  # 0: not known yet
        self._v2_total: int | None = None  # 16 + the length field, once read
        self._finished = False

    @property
    def buffered(self) -> int:
        """Bytes of the header received so far."""
        return len(self._buffer)

    @property
    def bytes_wanted(self) -> int:
        """The most bytes the header can still take: a read of this size never
        reaches past a v2 header, and past a v1 line only by what the line
        turns out not to need."""
        if self._version == 1:
            return V1_MAX_LINE - len(self._buffer)
        if self._v2_total is not None:
            return self._v2_total - len(self._buffer)
        return _FIRST_READ - len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> Complete | NeedData:
        """Take the header's bytes from the start of ``data``.

        Returns:
            ``NEED_DATA`` if all of ``data`` belonged to the header and it is
            not complete; else ``Complete`` with where the header ended in
            ``data``.

        Raises:
            ProxyProtocolError: the bytes are not a valid header.
            RuntimeError: the parser has already finished.
        """
        if self._finished:
            raise RuntimeError("this parser has already finished; use a new one")
        if not data:
            return NEED_DATA
        self._finished = True  # until proven otherwise: errors finish it too
        if self._version == 0:
            self._version = 1 if data[0] == V1_SIGNATURE[0] else 2
        result = self._feed_v1(data) if self._version == 1 else self._feed_v2(data)
        self._finished = result is not NEED_DATA
        return result

    def _check_signature(self, signature: bytes) -> None:
        seen = bytes(self._buffer[: len(signature)])
        if not signature.startswith(seen):
            raise ProxyProtocolError(
                f"not a PROXY protocol header: starts with {_shown(self._buffer)}"
            )

    def _feed_v1(self, data: bytes | bytearray | memoryview) -> Complete | NeedData:
        chunk = bytes(data[: V1_MAX_LINE - len(self._buffer)])
        newline = chunk.find(b"\n")
        taken = len(chunk) if newline < 0 else newline + 1
        self._buffer += chunk[:taken]
        self._check_signature(V1_SIGNATURE)
        if newline < 0:
            if len(self._buffer) >= V1_MAX_LINE:
                raise ProxyProtocolError(
                    f"PROXY v1 line has no CRLF within {V1_MAX_LINE} bytes: {_shown(self._buffer)}"
                )
            return NEED_DATA
        header = parse_v1_line(bytes(self._buffer))
        return Complete(header, taken)

    def _feed_v2(self, data: bytes | bytearray | memoryview) -> Complete | NeedData:
        taken = min(len(data), self.bytes_wanted)
        self._buffer += data[:taken]
        self._check_signature(V2_SIGNATURE)
        if self._v2_total is None and len(self._buffer) >= V2_FIXED_LENGTH:
            self._v2_total = V2_FIXED_LENGTH + _v2_length(self._buffer, self._max_v2_length)
            more = min(len(data) - taken, self.bytes_wanted)
            self._buffer += data[taken : taken + more]
            taken += more
        if self._v2_total is None or len(self._buffer) < self._v2_total:
            return NEED_DATA
        header = parse_v2_header(bytes(self._buffer))
        return Complete(header, taken)


# -- version 1 ---------------------------------------------------------------


def parse_v1_line(line: bytes) -> ProxyHeader:
    """Parse one complete v1 line, ``PROXY ...\\r\\n``.

    Raises:
        ProxyProtocolError: it is not exactly the v1 format.
    """
    if not line.startswith(V1_SIGNATURE) or not line.endswith(b"\r\n"):
        raise ProxyProtocolError(
            f"PROXY v1 line must start with 'PROXY ' and end in CRLF: {_shown(line)}"
        )
    if len(line) > V1_MAX_LINE:
        raise ProxyProtocolError(f"PROXY v1 line is over {V1_MAX_LINE} bytes: {_shown(line)}")
    body = line[len(V1_SIGNATURE) : -2]
    if b"\r" in body or b"\n" in body:
        raise ProxyProtocolError(f"PROXY v1 line has a lone CR or LF: {_shown(line)}")
    fields = body.split(b" ")
    if fields[0] == b"UNKNOWN":  # 2.1: the rest of the line is to be ignored
        return ProxyHeader(1, Family.UNKNOWN, length=len(line))
    if fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, not {_shown(fields[0])}"
        )
    if len(fields) != 5:
        raise ProxyProtocolError(
            "PROXY v1 line must be 'PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT' "
            f"with single spaces: {_shown(line)}"
        )
    family = Family(fields[0].decode())
    source, destination = (_v1_address(family, field) for field in fields[1:3])
    source_port, destination_port = (_v1_port(field) for field in fields[3:5])
    return ProxyHeader(1, family, (source, source_port), (destination, destination_port), len(line))


def _v1_address(family: Family, field: bytes) -> str:
    """An address of ``family`` in canonical text form (2.1)."""
    cls = ipaddress.IPv4Address if family is Family.TCP4 else ipaddress.IPv6Address
    kind = "IPv4" if family is Family.TCP4 else "IPv6"
    try:
        text = field.decode("ascii")
        if "%" in text:  # ipaddress accepts a scope ID; the spec has 128 bits only
            raise ValueError("scope IDs are not part of the format")
        # Both refuse leading zeroes in IPv4 octets (CPython >= 3.9.5).
        return str(cls(text))
    except ValueError as exc:
        raise ProxyProtocolError(
            f"PROXY v1 {family.value} address is not an {kind} address: {_shown(field)}"
        ) from exc


def _v1_port(field: bytes) -> int:
    """A port: decimal 0-65535 without leading zeroes (2.1)."""
    if _PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyProtocolError(
            f"PROXY v1 port must be 0-65535 without leading zeroes: {_shown(field)}"
        )
    return int(field)


# -- version 2 ---------------------------------------------------------------


def _v2_length(fixed: bytes | bytearray, max_length: int) -> int:
    """Check the 16 fixed bytes of a v2 header and return its length field."""
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {version}, not 2")
    if command not in (_COMMAND_LOCAL, _COMMAND_PROXY):
        raise ProxyProtocolError(f"PROXY v2 command must be LOCAL (0) or PROXY (1), not {command}")
    family, protocol = fixed[13] >> 4, fixed[13] & 0x0F
    if family not in _ADDRESS_BLOCK_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 address family {family} is not defined")
    if protocol not in (_PROTOCOL_UNSPEC, _PROTOCOL_STREAM, _PROTOCOL_DGRAM):
        raise ProxyProtocolError(f"PROXY v2 transport protocol {protocol} is not defined")
    (length,) = struct.unpack_from(">H", fixed, 14)
    if length > max_length:
        raise ProxyProtocolError(
            f"PROXY v2 header length {length} is over the {max_length} bytes we accept"
        )
    return int(length)


def parse_v2_header(header: bytes) -> ProxyHeader:
    """Parse one complete v2 header (exactly 16 + its length field bytes).

    Raises:
        ProxyProtocolError: it is not a valid v2 header.
    """
    if not header.startswith(V2_SIGNATURE) or len(header) < V2_FIXED_LENGTH:
        raise ProxyProtocolError(f"not a PROXY v2 header: {_shown(header)}")
    length = _v2_length(header, 0xFFFF)
    if len(header) != V2_FIXED_LENGTH + length:
        raise ProxyProtocolError(
            f"PROXY v2 header of {len(header)} bytes, its length field says {16 + length}"
        )
    if header[12] & 0x0F == _COMMAND_LOCAL:  # 2.2: family and addresses ignored
        return ProxyHeader(2, Family.LOCAL, length=len(header))
    family, protocol = header[13] >> 4, header[13] & 0x0F
    if family == _FAMILY_UNSPEC or protocol == _PROTOCOL_UNSPEC:
        # 2.2: ignore the address information; its size is not defined, so
        # neither is where TLVs would start.
        return ProxyHeader(2, Family.UNKNOWN, length=len(header))
    block = _ADDRESS_BLOCK_LENGTH[family]
    if length < block:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is too short for the addresses of family {family}"
            f" ({block} bytes)"
        )
    payload = header[V2_FIXED_LENGTH:]
    _check_tlvs(payload[block:])
    if family == _FAMILY_UNIX or protocol == _PROTOCOL_DGRAM:
        return ProxyHeader(2, Family.UNKNOWN, length=len(header))  # 2.2: fall back to UNSPEC
    return _v2_tcp(family, payload, len(header))


def _v2_tcp(family: int, payload: bytes, length: int) -> ProxyHeader:
    size = 4 if family == _FAMILY_INET else 16
    cls = ipaddress.IPv4Address if family == _FAMILY_INET else ipaddress.IPv6Address
    source, destination = str(cls(payload[:size])), str(cls(payload[size : 2 * size]))
    source_port, destination_port = struct.unpack_from(">HH", payload, 2 * size)
    return ProxyHeader(
        2,
        Family.TCP4 if family == _FAMILY_INET else Family.TCP6,
        (source, source_port),
        (destination, destination_port),
        length,
    )


def _check_tlvs(tlvs: bytes) -> None:
    """Each TLV must fit: a type byte, a 16-bit length, that many bytes."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < _TLV_HEAD.size:
            raise ProxyProtocolError(f"PROXY v2 TLV truncated at byte {offset} of the TLVs")
        kind, size = _TLV_HEAD.unpack_from(tlvs, offset)
        offset += _TLV_HEAD.size + size
        if offset > len(tlvs):
            raise ProxyProtocolError(
                f"PROXY v2 TLV of type {kind:#04x} says {size} bytes, past the header's end"
            )


# -- encoders ----------------------------------------------------------------


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_pair(source: Address, destination: Address) -> tuple[_IP, _IP]:
    """Both addresses as IP objects of one family, their ports checked."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError(f"source {src} and destination {dst} are not of one address family")
    for port in (source[1], destination[1]):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is not 0-65535")
    return src, dst


def encode_v1(source: Address, destination: Address) -> bytes:
    """The v1 line for a TCP connection from ``source`` to ``destination``.

    Raises:
        ValueError: an address is not IP, the two differ in family, or a port
            is out of range.
    """
    src, dst = _ip_pair(source, destination)
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v1_unknown() -> bytes:
    """The v1 line that tells the receiver to keep its peer's address."""
    return b"PROXY UNKNOWN\r\n"


def encode_v2(source: Address, destination: Address) -> bytes:
    """The v2 PROXY header (no TLVs) for a TCP connection from ``source`` to
    ``destination``.

    Raises:
        ValueError: as ``encode_v1``.
    """
    src, dst = _ip_pair(source, destination)
    family = _FAMILY_INET if src.version == 4 else _FAMILY_INET6
    block = src.packed + dst.packed + struct.pack(">HH", source[1], destination[1])
    return _v2(_COMMAND_PROXY, family << 4 | _PROTOCOL_STREAM, block)


def encode_v2_local() -> bytes:
    """The v2 LOCAL header: the connection is the sender's own (a health check)."""
    return _v2(_COMMAND_LOCAL, _FAMILY_UNSPEC << 4 | _PROTOCOL_UNSPEC, b"")


def _v2(command: int, family_protocol: int, payload: bytes) -> bytes:
    return (
        V2_SIGNATURE + struct.pack(">BBH", 0x20 | command, family_protocol, len(payload)) + payload
    )


# -- I/O ---------------------------------------------------------------------


async def read_proxy_header(
    stream: trio.abc.ReceiveStream, *, max_bytes: int
) -> tuple[ProxyHeader, bytes]:
    """Read one PROXY protocol header from the start of ``stream``.

    Each read asks for at most ``max_bytes`` and never for more than the
    header can still need (``ProxyHeaderParser.bytes_wanted``), so a v2 header
    is read exactly and a v1 line with at most the bytes that follow it within
    107. No timeout of its own: wrap it in ``trio.fail_after``.

    Returns:
        The header, and the bytes read after it (the start of HTTP; often
        empty).

    Raises:
        ProxyProtocolError: the header is invalid, or the stream ended first.

    Memory: the parser's copy of the header (at most 107 bytes for v1,
    16 + ``MAX_V2_LENGTH`` for v2) and one read of at most ``max_bytes``.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
    parser = ProxyHeaderParser()
    while True:
        data = await stream.receive_some(min(max_bytes, parser.bytes_wanted))
        if not data:
            raise ProxyProtocolError(
                f"connection closed after {parser.buffered} bytes of a PROXY protocol header"
            )
        result = parser.feed(data)
        if isinstance(result, Complete):
            return result.header, bytes(data[result.end :])
