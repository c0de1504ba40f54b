"""The PROXY protocol parser, encoders and reader (HAProxy's proxy-protocol.txt).

Every valid form parses into the right addresses and the right length, in
one chunk or byte by byte; every malformed form is a ProxyProtocolError, never
a header and never "no header"; the parser holds only the header's bytes
and leaves what follows it to the caller.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._proxy_protocol import (
    MAX_V2_LENGTH,
    NEED_DATA,
    V1_MAX_LINE,
    V2_FIXED_LENGTH,
    V2_SIGNATURE,
    Complete,
    Family,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
    encode_v2_local,
    parse_v1_line,
    parse_v2_header,
    read_proxy_header,
)

HTTP = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8:0:0:0:0:0:1 2001:DB8::2 65535 0\r\n"
FULL_V6 = ":".join(["ffff"] * 8)
# 2.1's worst case: exactly V1_MAX_LINE bytes.
V1_LONGEST = f"PROXY UNKNOWN {FULL_V6} {FULL_V6} 65535 65535\r\n".encode()
# HAProxy writing a v2 TCP4 header (a capture: 172.19.0.1:42578 -> 172.19.0.3:80).
V2_TCP4_CAPTURE = bytes.fromhex("0d0a0d0a000d0a515549540a 2111000c ac130001 ac130003 a652 0050")


def v2(ver_cmd: int, fam: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A v2 header from its parts; ``length`` overrides the length field."""
    size = len(payload) if length is None else length
    return V2_SIGNATURE + struct.pack(">BBH", ver_cmd, fam, size) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


V4_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">HH", 1234, 80)
V6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("::1").packed
    + struct.pack(">HH", 40000, 8443)
)


def parse(data: bytes) -> Complete:
    """Feed ``data`` in one chunk; it must hold a complete header."""
    result = ProxyHeaderParser().feed(data)
    assert isinstance(result, Complete)
    return result


def feed_chunks(chunks: list[bytes]) -> tuple[ProxyHeader, bytes]:
    """Feed chunks until the header completes; return it and everything after."""
    parser = ProxyHeaderParser()
    for index, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if isinstance(result, Complete):
            return result.header, chunk[result.end :] + b"".join(chunks[index + 1 :])
    raise AssertionError("the header never completed")


def parse_error(data: bytes) -> str:
    """Feed ``data`` byte by byte; the parser must raise before or at its end."""
    parser = ProxyHeaderParser()
    for index in range(len(data)):
        try:
            result = parser.feed(data[index : index + 1])
        except ProxyProtocolError as exc:
            return str(exc)
        assert result is NEED_DATA
    raise AssertionError("no error by the last byte")


# -- valid headers -----------------------------------------------------------


def test_v1_tcp4() -> None:
    """A v1 TCP4 line carries both addresses and ports; the header ends after CRLF."""
    result = parse(V1_TCP4 + HTTP)
    assert result.header == ProxyHeader(
        1, Family.TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443), len(V1_TCP4)
    )
    assert result.end == len(V1_TCP4)


def test_v1_tcp6_addresses_are_normalised() -> None:
    """IPv6 addresses in any valid text form come out compressed and lower case."""
    header = parse(V1_TCP6).header
    assert header.family is Family.TCP6
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("2001:db8::2", 0)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWN anything at all, ignored\r\n",
        V1_LONGEST,
    ],
)
def test_v1_unknown_keeps_the_peer_address(line: bytes) -> None:
    """UNKNOWN, with or without the rest of the line, carries no address."""
    assert len(V1_LONGEST) == V1_MAX_LINE
    header = parse(line).header
    assert header == ProxyHeader(1, Family.UNKNOWN, length=len(line))
    assert header.client_address(("10.9.8.7", 5555)) == ("10.9.8.7", 5555)


def test_v2_tcp4_capture() -> None:
    """The bytes HAProxy sent in a capture parse into its addresses."""
    result = parse(V2_TCP4_CAPTURE + HTTP)
    assert result.header == ProxyHeader(
        2, Family.TCP4, ("172.19.0.1", 42578), ("172.19.0.3", 80), 28
    )
    assert result.end == 28
    assert result.header.client_address(("127.0.0.1", 1)) == ("172.19.0.1", 42578)


def test_v2_tcp6() -> None:
    """A v2 TCP6 header carries 16-byte addresses and ports."""
    header = parse(v2(0x21, 0x21, V6_BLOCK)).header
    assert header == ProxyHeader(2, Family.TCP6, ("2001:db8::1", 40000), ("::1", 8443), 52)


@pytest.mark.parametrize(
    "data",
    [
        v2(0x20, 0x00, b""),
        v2(0x20, 0x11, V4_BLOCK),  # 2.2: a LOCAL header's addresses are skipped
        v2(0x20, 0x21, b"\x00" * 5),  # ... whatever their length
    ],
)
def test_v2_local_keeps_the_peer_address(data: bytes) -> None:
    """LOCAL is the balancer's own connection: no client address, all bytes skipped."""
    result = parse(data + HTTP)
    assert result.header == ProxyHeader(2, Family.LOCAL, length=len(data))
    assert result.end == len(data)


@pytest.mark.parametrize(
    ("fam", "payload"),
    [
        (0x00, b""),  # AF_UNSPEC
        (0x00, b"\x01\x02\x03"),  # AF_UNSPEC with bytes we must skip unread
        (0x10, V4_BLOCK),  # AF_INET, protocol UNSPEC
        (0x12, V4_BLOCK),  # UDP over IPv4
        (0x22, V6_BLOCK),  # UDP over IPv6
        (0x31, b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")),
        (0x32, b"\0" * 216 + tlv(0x04, b"")),
    ],
)
def test_v2_proxy_without_a_tcp_address_keeps_the_peer_address(fam: int, payload: bytes) -> None:
    """PROXY with an unspecified family or protocol, AF_UNIX or UDP falls back to
    the peer's own address (2.2: "fall back to the UNSPEC mode")."""
    header = parse(v2(0x21, fam, payload)).header
    assert header == ProxyHeader(2, Family.UNKNOWN, length=V2_FIXED_LENGTH + len(payload))


def test_v2_tlvs_are_skipped() -> None:
    """TLVs after the addresses count in the length and change nothing else."""
    tlvs = (
        tlv(0x01, b"http/1.1")  # ALPN
        + tlv(0x02, b"example.com")  # authority
        + tlv(0x05, bytes(range(128)))  # unique ID
        + tlv(0xEA, b"\x01vpce-0123456789abcdef")  # AWS VPC endpoint
        + tlv(0x04, b"")  # NOOP, empty
    )
    data = v2(0x21, 0x11, V4_BLOCK + tlvs)
    result = parse(data + HTTP)
    assert result.header.source == ("10.0.0.1", 1234)
    assert result.header.destination == ("10.0.0.2", 80)
    assert result.header.length == result.end == len(data)


def test_v2_length_at_the_cap_is_accepted() -> None:
    """A header of exactly 16 + MAX_V2_LENGTH bytes is valid."""
    padding = tlv(0x04, b"\0" * (MAX_V2_LENGTH - len(V4_BLOCK) - 3))
    data = v2(0x21, 0x11, V4_BLOCK + padding)
    assert parse(data).header.length == V2_FIXED_LENGTH + MAX_V2_LENGTH


ALL_VALID = [
    V1_TCP4,
    V1_TCP6,
    b"PROXY UNKNOWN\r\n",
    V1_LONGEST,
    V2_TCP4_CAPTURE,
    v2(0x21, 0x21, V6_BLOCK),
    v2(0x20, 0x00, b""),
    v2(0x21, 0x11, V4_BLOCK + tlv(0x02, b"example.com")),
]


@pytest.mark.parametrize("data", ALL_VALID)
def test_byte_by_byte_gives_the_same_header(data: bytes) -> None:
    """Fed one byte at a time, the parser needs data until the last byte, then
    gives the same header as in one chunk and takes exactly that last byte."""
    parser = ProxyHeaderParser()
    for byte in data[:-1]:
        assert parser.feed(bytes([byte])) is NEED_DATA
    assert parser.buffered == len(data) - 1
    result = parser.feed(data[-1:] + HTTP)
    assert isinstance(result, Complete)
    assert result.end == 1
    assert result.header == parse(data).header


@pytest.mark.parametrize("data", ALL_VALID)
def test_bytes_after_the_header_are_left_alone(data: bytes) -> None:
    """Whatever follows the header in its last chunk is not consumed or copied."""
    header, rest = feed_chunks([data[:5], data[5:] + HTTP + b"\r\n\x00more"])
    assert rest == HTTP + b"\r\n\x00more"
    assert header.length == len(data)


def test_parser_is_finished_after_a_header_or_an_error() -> None:
    """One parser, one header: feeding it after it finished is a programming error."""
    parser = ProxyHeaderParser()
    assert isinstance(parser.feed(V1_TCP4), Complete)
    with pytest.raises(RuntimeError):
        parser.feed(HTTP)
    failed = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        failed.feed(b"GET")
    with pytest.raises(RuntimeError):
        failed.feed(V1_TCP4)


def test_empty_chunk_needs_data() -> None:
    """An empty chunk changes nothing."""
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is NEED_DATA
    assert parser.buffered == 0
    assert isinstance(parser.feed(V1_TCP4), Complete)


@pytest.mark.parametrize("data", ALL_VALID)
def test_truncated_header_is_never_complete(data: bytes) -> None:
    """Any proper prefix of a header only ever needs more data."""
    for cut in range(len(data)):
        parser = ProxyHeaderParser()
        assert parser.feed(data[:cut]) is NEED_DATA


# -- malformed headers -------------------------------------------------------

MALFORMED = [
    # Neither signature: the usual things a misdirected client sends.
    ("http", b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
    ("put", b"PUT / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
    ("tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY protocol header"),
    ("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    ("no-space", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
    ("v2-bad-signature", b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x0c", "not a PROXY protocol"),
    ("v2-signature-lf-only", b"\r\n\n", "not a PROXY protocol header"),
    # v1 fields.
    ("v1-protocol", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-udp", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-empty", b"PROXY \r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-unknown-glued", b"PROXY UNKNOWNX\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-double-space", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
    ("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "single spaces"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "single spaces"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "single spaces"),
    ("v1-tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "single spaces"),
    ("v1-two-spaces", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "single spaces"),
    ("v1-tcp4-only-3-octets", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-octet-256", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-leading-zero", b"PROXY TCP4 1.2.3.4 05.6.7.8 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-integer", b"PROXY TCP4 16909060 5.6.7.8 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-non-ascii", "PROXY TCP4 1.2.3.\u0664 5.6.7.8 1 2\r\n".encode(), "not an IPv4"),
    ("v1-tcp4-with-ipv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4"),
    ("v1-tcp4-mixed", b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "not an IPv4"),
    ("v1-tcp6-with-ipv4", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an IPv6"),
    ("v1-tcp6-scope-id", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not an IPv6"),
    ("v1-tcp6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "not an IPv6"),
    ("v1-port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "0-65535"),
    ("v1-port-huge", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 999999\r\n", "0-65535"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "0-65535"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "0-65535"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "0-65535"),
    ("v1-port-empty", b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", "0-65535"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", "0-65535"),
    ("v1-bare-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "end in CRLF"),
    ("v1-lone-cr", b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "lone CR"),
    ("v1-unknown-lone-cr", b"PROXY UNKNOWN a\rb\r\n", "lone CR"),
    ("v1-cr-cr-lf", b"PROXY UNKNOWN\r\r\n", "lone CR"),
    # v1 length: no CRLF within 107 bytes, however the line continues.
    ("v1-no-crlf", b"PROXY UNKNOWN " + b"f" * 200, "no CRLF within 107"),
    ("v1-crlf-at-108", V1_LONGEST[:-2] + b"f\r\n", "no CRLF within 107"),
    # v2 fixed part.
    ("v2-version-1", v2(0x11, 0x11, V4_BLOCK), "version 1, not 2"),
    ("v2-version-3", v2(0x31, 0x11, V4_BLOCK), "version 3, not 2"),
    ("v2-version-0", v2(0x01, 0x11, V4_BLOCK), "version 0, not 2"),
    ("v2-command-2", v2(0x22, 0x11, V4_BLOCK), "command must be LOCAL (0) or PROXY (1), not 2"),
    ("v2-command-15", v2(0x2F, 0x11, V4_BLOCK), "not 15"),
    ("v2-family-4", v2(0x21, 0x41, V4_BLOCK), "address family 4 is not defined"),
    ("v2-protocol-3", v2(0x21, 0x13, V4_BLOCK), "transport protocol 3 is not defined"),
    ("v2-local-bad-family", v2(0x20, 0xF0, b""), "address family 15 is not defined"),
    ("v2-over-cap", v2(0x21, 0x11, b"", length=MAX_V2_LENGTH + 1), "over the 4096 bytes"),
    ("v2-length-max", v2(0x21, 0x11, b"", length=0xFFFF), "over the 4096 bytes"),
    # v2 length too short for the announced family.
    ("v2-tcp4-short", v2(0x21, 0x11, V4_BLOCK[:11]), "too short for the addresses of family 1"),
    ("v2-tcp4-empty", v2(0x21, 0x11, b""), "too short"),
    ("v2-tcp6-short", v2(0x21, 0x21, V6_BLOCK[:35]), "too short for the addresses of family 2"),
    ("v2-tcp6-as-tcp4-size", v2(0x21, 0x21, V4_BLOCK), "too short"),
    ("v2-unix-short", v2(0x21, 0x31, b"\0" * 215), "too short for the addresses of family 3"),
    # v2 TLVs that do not fit.
    ("v2-tlv-two-bytes", v2(0x21, 0x11, V4_BLOCK + b"\x04\x00"), "TLV truncated at byte 0"),
    ("v2-tlv-overrun", v2(0x21, 0x11, V4_BLOCK + tlv(4, b"abc")[:-1]), "past the header's end"),
    (
        "v2-second-tlv-overrun",
        v2(0x21, 0x11, V4_BLOCK + tlv(2, b"ab") + b"\x01\x00\x09xyz"),
        "type 0x01 says 9 bytes",
    ),
]


@pytest.mark.parametrize(
    ("data", "message"), [row[1:] for row in MALFORMED], ids=[row[0] for row in MALFORMED]
)
def test_malformed_header_is_an_error(data: bytes, message: str) -> None:
    """Each malformed form is refused with a message naming what is wrong, fed
    byte by byte or in one chunk."""
    assert message in parse_error(data)
    with pytest.raises(ProxyProtocolError, match=re.escape(message)):
        ProxyHeaderParser().feed(data + HTTP)


@pytest.mark.parametrize(
    ("data", "at"),
    [
        (b"G", 1),
        (b"\x16", 1),
        (b"PUT", 2),
        (b"PROXY\t", 6),
        (b"\r\n\r\n\x00\r\nQUIZ", 11),
    ],
)
def test_not_a_signature_is_refused_at_the_first_wrong_byte(data: bytes, at: int) -> None:
    """The parser does not wait for a full line or 16 bytes to refuse a
    connection that cannot be sending either signature."""
    parser = ProxyHeaderParser()
    for byte in data[: at - 1]:
        assert parser.feed(bytes([byte])) is NEED_DATA
    with pytest.raises(ProxyProtocolError, match="not a PROXY protocol header"):
        parser.feed(data[at - 1 : at])


def test_v2_length_cap_is_checked_before_the_payload_arrives() -> None:
    """An oversized length field is refused with the 16 fixed bytes, so no
    payload is ever buffered for it."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="over the 4096"):
        parser.feed(v2(0x21, 0x11, b"", length=MAX_V2_LENGTH + 1))
    assert parser.buffered == V2_FIXED_LENGTH


def test_v2_cap_is_configurable() -> None:
    """``max_v2_length`` lowers the cap; the field's own range bounds it."""
    data = v2(0x21, 0x11, V4_BLOCK + tlv(0x04, b"\0" * 20))
    with pytest.raises(ProxyProtocolError, match="over the 12 bytes"):
        ProxyHeaderParser(max_v2_length=12).feed(data)
    assert isinstance(ProxyHeaderParser(max_v2_length=0xFFFF).feed(data), Complete)
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError, match="max_v2_length"):
            ProxyHeaderParser(max_v2_length=bad)


def test_whole_header_parsers_check_their_input() -> None:
    """``parse_v1_line`` and ``parse_v2_header`` refuse input that is not one
    whole header of their version."""
    for line in (V1_TCP4[:-2], b"PRONY" + V1_TCP4[5:], V1_LONGEST[:-2] + b"f\r\n"):
        with pytest.raises(ProxyProtocolError):
            parse_v1_line(line)
    for header in (V2_TCP4_CAPTURE[:-1], V2_TCP4_CAPTURE + b"x", b"\r\n" + V2_TCP4_CAPTURE):
        with pytest.raises(ProxyProtocolError):
            parse_v2_header(header)
    assert parse_v2_header(V2_TCP4_CAPTURE).source == ("172.19.0.1", 42578)


# -- encoders ----------------------------------------------------------------


def test_encode_v1_exact_bytes() -> None:
    """The v1 encoder writes the spec's example line byte for byte."""
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V1_TCP4
    assert encode_v1(("2001:DB8::1", 1), ("::1", 2)) == b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n"
    assert encode_v1_unknown() == b"PROXY UNKNOWN\r\n"


def test_encode_v2_exact_bytes() -> None:
    """The v2 encoder writes what HAProxy wrote in the capture, byte for byte."""
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == V2_TCP4_CAPTURE
    assert encode_v2_local() == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert encode_v2(("2001:db8::1", 40000), ("::1", 8443)) == v2(0x21, 0x21, V6_BLOCK)


def test_encoded_local_and_unknown_parse_back() -> None:
    """The no-address forms parse into LOCAL and UNKNOWN."""
    assert parse(encode_v2_local()).header == ProxyHeader(2, Family.LOCAL, length=16)
    assert parse(encode_v1_unknown()).header == ProxyHeader(1, Family.UNKNOWN, length=15)


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        (("1.2.3.4", 1), ("::1", 2), "not of one address family"),
        (("::1", 1), ("1.2.3.4", 2), "not of one address family"),
        (("1.2.3.4", 65536), ("1.2.3.4", 2), "port 65536"),
        (("1.2.3.4", 1), ("1.2.3.4", -1), "port -1"),
        (("example.com", 1), ("1.2.3.4", 2), "does not appear to be an IPv4 or IPv6"),
    ],
)
def test_encoders_refuse_what_the_format_cannot_carry(
    encode: Callable[[tuple[str, int], tuple[str, int]], bytes],
    source: tuple[str, int],
    destination: tuple[str, int],
    message: str,
) -> None:
    """Mixed families, ports out of range and host names are ValueErrors."""
    with pytest.raises(ValueError, match=message):
        encode(source, destination)


ports = st.integers(min_value=0, max_value=0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
address_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)


@given(pair=address_pairs, version=st.sampled_from([1, 2]))
def test_round_trip(pair: tuple[tuple[str, int], tuple[str, int]], version: int) -> None:
    """Any TCP address pair encoded in either version parses back to itself."""
    source, destination = pair
    data = (encode_v1 if version == 1 else encode_v2)(source, destination)
    if version == 1:
        assert len(data) <= V1_MAX_LINE
    header = parse(data).header
    assert (header.version, header.length) == (version, len(data))
    ip_version = ipaddress.ip_address(source[0]).version
    assert header.family is (Family.TCP4 if ip_version == 4 else Family.TCP6)
    assert header.source == source
    assert header.destination == destination


@given(
    data=st.sampled_from(ALL_VALID),
    rest=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_chunking_gives_the_same_header_and_rest(
    data: bytes, rest: bytes, cuts: list[int]
) -> None:
    """However the stream is cut into chunks, the header and the bytes after
    it come out the same."""
    stream = data + rest
    points = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    header, after = feed_chunks(chunks)
    assert header == parse(data).header
    assert after == rest


@given(
    prefix=st.sampled_from([b"", b"P", b"PROXY ", b"PROXY TCP4 ", b"\r\n", V2_SIGNATURE]),
    noise=st.binary(max_size=5000),
    chunk=st.integers(min_value=1, max_value=300),
)
def test_arbitrary_bytes_are_a_header_an_error_or_need_data(
    prefix: bytes, noise: bytes, chunk: int
) -> None:
    """Whatever arrives, the parser answers with NEED_DATA, a header or a
    ProxyProtocolError (nothing else escapes), and never holds more than the
    header's bound: 107 bytes for v1, 16 + MAX_V2_LENGTH for v2."""
    data = prefix + noise
    parser = ProxyHeaderParser()
    try:
        for start in range(0, len(data), chunk):
            result = parser.feed(data[start : start + chunk])
            bound = V1_MAX_LINE if data[:1] == b"P" else V2_FIXED_LENGTH + MAX_V2_LENGTH
            assert parser.buffered <= bound
            if isinstance(result, Complete):
                assert result.header.length == parser.buffered
                break
    except ProxyProtocolError:
        pass


# -- read_proxy_header -------------------------------------------------------


class ScriptedStream(trio.abc.ReceiveStream):
    """Gives out the bytes it was given, recording each read's ``max_bytes``."""

    def __init__(self, data: bytes, *, eof: bool = True) -> None:
        self.inner = trio.testing.MemoryReceiveStream()
        self.inner.put_data(data)
        if eof:
            self.inner.put_eof()
        self.requests: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.requests.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_read_v2_reads_exactly_the_header() -> None:
    """A v2 header is read to its last byte and not one byte further: the
    request behind it stays in the stream."""
    data = v2(0x21, 0x11, V4_BLOCK + tlv(0x02, b"example.com"))
    stream = ScriptedStream(data + HTTP)
    header, leftover = await read_proxy_header(stream, max_bytes=65536)
    assert header.source == ("10.0.0.1", 1234)
    assert leftover == b""
    assert stream.requests == [16, len(data) - 16]
    assert await stream.receive_some(65536) == HTTP


async def test_read_v1_returns_what_it_read_past_the_line() -> None:
    """A v1 line ends where CRLF is, so reads may take bytes of the request:
    they come back as leftover, and the rest stays in the stream."""
    stream = ScriptedStream(V1_TCP4 + HTTP + HTTP)
    header, leftover = await read_proxy_header(stream, max_bytes=65536)
    assert header.source == ("192.168.0.1", 56324)
    assert stream.requests == [16, V1_MAX_LINE - 16]
    assert leftover + await stream.receive_some(65536) == HTTP + HTTP
    assert len(V1_TCP4) + len(leftover) == V1_MAX_LINE


@pytest.mark.parametrize("max_bytes", [1, 3, 16, 50])
async def test_reads_are_bounded_by_max_bytes(max_bytes: int) -> None:
    """No read asks for more than ``max_bytes``; the result does not depend on it."""
    for data in (V1_TCP4, V2_TCP4_CAPTURE):
        stream = ScriptedStream(data + HTTP)
        header, leftover = await read_proxy_header(stream, max_bytes=max_bytes)
        requests = list(stream.requests)
        assert header == parse(data).header
        assert leftover + await stream.receive_some(65536) == HTTP
        assert all(request is not None and request <= max_bytes for request in requests)


@pytest.mark.parametrize("data", [b"", V1_TCP4[:-1], V2_TCP4_CAPTURE[:20]])
async def test_read_stream_closed_mid_header_is_an_error(data: bytes) -> None:
    """A connection that ends before its header is complete is refused."""
    with pytest.raises(ProxyProtocolError, match=f"closed after {len(data)} bytes"):
        await read_proxy_header(ScriptedStream(data), max_bytes=4096)


async def test_read_invalid_header_is_an_error() -> None:
    """An HTTP request where a header should be is refused after its first read."""
    stream = ScriptedStream(HTTP)
    with pytest.raises(ProxyProtocolError, match="not a PROXY protocol header"):
        await read_proxy_header(stream, max_bytes=4096)
    assert len(stream.requests) == 1


async def test_read_slow_header_is_cut_by_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The reader has no timeout of its own; the caller's ``fail_after`` ends a
    header that stops half way, at exactly its deadline."""
    stream = ScriptedStream(V1_TCP4[:10], eof=False)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(3):
            await read_proxy_header(stream, max_bytes=4096)
    assert trio.current_time() == 3


async def test_read_refuses_a_zero_read_size() -> None:
    """``max_bytes`` must allow at least one byte per read."""
    with pytest.raises(ValueError, match="max_bytes"):
        await read_proxy_header(ScriptedStream(V1_TCP4), max_bytes=0)
