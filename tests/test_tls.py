"""TLS groundwork: contexts, SNI, the upstream handshake, failure labels, the bound.

Everything runs on in-memory streams (``memory_stream_pair`` where buffering
does not matter, ``lockstep_stream_pair`` where a stalled peer must stall the
sender) except one loopback test over real TCP. Certificates come from
trustme; ``cryptography`` (trustme's own dependency) only builds the odd
certificates trustme cannot (CN only, an encrypted key).
"""

from __future__ import annotations

import array
import datetime
import re
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy._errors import BadGateway
from trioproxy._tls import (
    TLS_RECORD_OVERHEAD,
    TLS_RECORD_SIZE,
    BoundedTLSStream,
    _SniTable,
    certificate_names,
    ciphertext_size,
    client_context,
    describe_tls_failure,
    handshake_failure_reason,
    open_tls_upstream,
    server_context,
)
from trioproxy._tunnel import tunnel

from .tlskit import StdlibTLSPeer, read_exactly

KiB = 1024
MiB = 1024 * KiB
UTC = datetime.UTC

# --- certificates -------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: a CA, two server pairs for SNI, an expired pair, a stranger CA."""
    directory = tmp_path_factory.mktemp("pki")
    files = {"ca": directory / "ca.pem", "other_ca": directory / "other_ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    now = datetime.datetime.now(UTC)
    leaves = {
        "a": ca.issue_cert("a.example"),
        "b": ca.issue_cert("b.example", "*.wild.example"),
        "expired": ca.issue_cert(
            "a.example",
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        ),
    }
    for name, leaf in leaves.items():
        files[name] = _write_pair(leaf, directory, name)[0]
        files[name + "_key"] = directory / f"{name}.key"
    return files


def _write_pair(leaf: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def _pair(pki: dict[str, Path], name: str) -> tuple[Path, Path]:
    return pki[name], pki[name + "_key"]


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# --- helpers ------------------------------------------------------------------


class Recorder(trio.abc.Stream):
    """A transport that counts: bytes pulled by reads, and the bytes of the
    ``send_all`` currently waiting for the peer (what the sender holds)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.pulled = 0
        self.largest_read = 0
        self.pending = 0
        self.peak_pending = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.pulled += len(data)
        self.largest_read = max(self.largest_read, len(data))
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.pending = len(data)
        self.peak_pending = max(self.peak_pending, self.pending)
        try:
            await self.stream.send_all(data)
        finally:
            self.pending = 0

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


TLSStream = BoundedTLSStream | trio.SSLStream[Any]


async def _handshakes(*streams: TLSStream) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.do_handshake)


async def _quiet_handshake(stream: TLSStream, errors: list[BaseException]) -> None:
    """Handshake; on failure record why and close, as a listener would."""
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        errors.append(exc)
        await trio.aclose_forcefully(stream)


def _client_ctx(pki: dict[str, Path]) -> ssl.SSLContext:
    return client_context(ca_file=pki["ca"])


async def _upstream(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    host: str = "a.example",
    server_hostname: str | None = None,
) -> BoundedTLSStream:
    """``open_tls_upstream`` against an in-memory origin using ``server_ctx``."""
    proxy_side, origin_side = trio.testing.memory_stream_pair()
    origin = BoundedTLSStream(origin_side, server_ctx, server_side=True)
    error: BadGateway | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quiet_handshake, origin, [])
        try:
            stream = await open_tls_upstream(
                proxy_side, client_ctx, host=host, port=443, server_hostname=server_hostname
            )
        except BadGateway as exc:
            error = exc
    if error is not None:
        raise error
    assert isinstance(stream, BoundedTLSStream)  # an in-memory transport
    return stream


MemoryStream = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]


async def _server_failure(
    server_ctx: ssl.SSLContext, client: Callable[[MemoryStream], Awaitable[None]]
) -> str:
    """The label for the listener's failed handshake against ``client(transport)``."""
    server_side, client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(server_side, server_ctx, server_side=True)
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quiet_handshake, server, errors)
        nursery.start_soon(client, client_side)
    (error,) = errors
    return handshake_failure_reason(error)


# --- contexts and the upstream handshake ----------------------------------------


async def test_verified_handshake_negotiates_http11(pki: dict[str, Path]) -> None:
    """Verification against the CA file succeeds, ALPN is http/1.1, bytes flow."""
    stream = await _upstream(server_context([_pair(pki, "a")]), _client_ctx(pki))
    assert stream.ssl_object.selected_alpn_protocol() == "http/1.1"
    assert stream.ssl_object.version() in {"TLSv1.2", "TLSv1.3"}
    await stream.aclose()


def test_client_context_verifies_by_default() -> None:
    """The default client context checks certificate and host name, TLS 1.2+."""
    context = client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("server", "trust", "host", "reason"),
    [
        ("a", "other_ca", "a.example", "unable to get local issuer certificate"),
        ("a", "ca", "b.example", "Hostname mismatch, certificate is not valid for 'b.example'."),
        ("expired", "ca", "a.example", "certificate has expired"),
    ],
    ids=["wrong-ca", "wrong-host", "expired"],
)
async def test_verify_failure_is_bad_gateway_with_the_reason(
    pki: dict[str, Path], server: str, trust: str, host: str, reason: str
) -> None:
    """A certificate that does not verify is a 502 whose message is one line
    with OpenSSL's verify message, and the label is verify_failed."""
    with pytest.raises(BadGateway) as info:
        await _upstream(
            server_context([_pair(pki, server)]), client_context(ca_file=pki[trust]), host=host
        )
    assert info.value.message == f"TLS to {host}:443 failed: certificate verify failed: {reason}"
    assert handshake_failure_reason(info.value) == "verify_failed"


async def test_insecure_accepts_any_certificate(pki: dict[str, Path]) -> None:
    """insecure: a stranger's certificate for another name is accepted."""
    stream = await _upstream(
        server_context([_pair(pki, "expired")]), client_context(insecure=True), host="other.host"
    )
    assert stream.ssl_object.selected_alpn_protocol() == "http/1.1"


async def test_server_hostname_overrides_the_name_checked(pki: dict[str, Path]) -> None:
    """server_hostname (``--upstream-sni``) is the name sent and checked, not host."""
    await _upstream(
        server_context([_pair(pki, "a")]),
        _client_ctx(pki),
        host="10.0.0.1",
        server_hostname="a.example",
    )


async def test_plain_http_upstream_is_bad_gateway(pki: dict[str, Path]) -> None:
    """An upstream that answers in plain HTTP: 502 "wrong version number"."""
    proxy_side, origin_side = trio.testing.memory_stream_pair()

    async def plain_origin() -> None:
        await origin_side.receive_some()
        await origin_side.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(plain_origin)
        with pytest.raises(BadGateway) as info:
            await open_tls_upstream(proxy_side, _client_ctx(pki), host="a.example", port=8443)
    assert info.value.message == "TLS to a.example:8443 failed: wrong version number"
    assert handshake_failure_reason(info.value) == "not_tls"


async def test_upstream_timeout_is_the_callers_and_closes_the_transport(
    pki: dict[str, Path], autojump_clock: trio.abc.Clock
) -> None:
    """A silent upstream: the caller's fail_after fires (TooSlowError, the
    caller's 504) at exactly its deadline, and the transport is closed."""
    proxy_side, _origin_side = trio.testing.memory_stream_pair()
    with pytest.raises(trio.TooSlowError) as info, trio.fail_after(10):
        await open_tls_upstream(proxy_side, _client_ctx(pki), host="a.example", port=443)
    assert trio.current_time() == 10
    assert handshake_failure_reason(info.value) == "timeout"
    with pytest.raises(trio.ClosedResourceError):
        await proxy_side.send_all(b"x")


async def test_invalid_server_name_is_bad_gateway(pki: dict[str, Path]) -> None:
    """A name IDNA cannot encode is a 502, and the transport is closed."""
    proxy_side, _ = trio.testing.memory_stream_pair()
    with pytest.raises(BadGateway, match="invalid server name"):
        await open_tls_upstream(proxy_side, _client_ctx(pki), host="x" * 64 + ".example", port=443)
    with pytest.raises(trio.ClosedResourceError):
        await proxy_side.send_all(b"x")


async def test_client_certificate_is_presented(
    pki: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    """cert_file/key_file: the upstream that requires a client certificate gets it."""
    cert, key = _write_pair(ca.issue_cert("proxy.client"), tmp_path, "client")
    server_ctx = server_context([_pair(pki, "a")])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(pki["ca"])
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    for context in (
        client_context(ca_file=pki["ca"], cert_file=cert, key_file=key),
        client_context(ca_file=pki["ca"], cert_file=combined),
    ):
        proxy_side, origin_side = trio.testing.memory_stream_pair()
        origin = BoundedTLSStream(origin_side, server_ctx, server_side=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin.do_handshake)
            await open_tls_upstream(proxy_side, context, host="a.example", port=443)
        certificate = origin.ssl_object.getpeercert()
        assert certificate is not None
        assert certificate["subjectAltName"] == (("DNS", "proxy.client"),)


# --- the listener: SNI, versions, failure labels ------------------------------------


async def _served_certificate(server_ctx: ssl.SSLContext, sni: str | None) -> bytes:
    """The DER certificate a client sending ``sni`` gets, and ALPN checked."""
    client_ctx = client_context(insecure=True)
    server_side, client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(server_side, server_ctx, server_side=True)
    client = BoundedTLSStream(client_side, client_ctx, server_hostname=sni)
    await _handshakes(server, client)
    assert server.ssl_object.selected_alpn_protocol() == "http/1.1"
    der = client.ssl_object.getpeercert(binary_form=True)
    assert isinstance(der, bytes)
    return der


@pytest.mark.parametrize(
    ("sni", "served"),
    [
        ("b.example", "b"),
        ("B.EXAMPLE", "b"),
        ("x.wild.example", "b"),
        ("a.example", "a"),
        ("unknown.example", "a"),
        ("deep.x.wild.example", "a"),
        (None, "a"),
    ],
)
async def test_sni_chooses_the_certificate(
    pki: dict[str, Path], sni: str | None, served: str
) -> None:
    """The second pair serves its names (exact and one-label wildcard, any
    case); every other name, and no SNI at all, gets the first pair."""
    context = server_context([_pair(pki, "a"), _pair(pki, "b")])
    assert await _served_certificate(context, sni) == _der(pki[served])


def test_sni_table_prefers_exact_names_then_earlier_pairs() -> None:
    """An exact name beats a wildcard; among equals the earlier pair wins; a
    wildcard covers one label only; a trailing dot is ignored."""
    table = _SniTable([["a.example"], ["*.example.org", "a.example"], ["api.example.org"]])
    assert table.lookup("api.example.org") == 2
    assert table.lookup("www.example.org") == 1
    assert table.lookup("a.example.") == 0
    assert table.lookup("example.org") is None
    assert table.lookup("x.www.example.org") is None
    assert table.lookup("localhost") is None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls11_client_is_refused(pki: dict[str, Path]) -> None:
    """TLS 1.2 is the minimum: a TLS 1.1 client fails, labelled protocol_version."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")

    async def tls11_client(transport: MemoryStream) -> None:
        await _quiet_handshake(trio.SSLStream(transport, old, server_hostname="a.example"), [])

    label = await _server_failure(server_context([_pair(pki, "a")]), tls11_client)
    assert label == "protocol_version"


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", "not_tls"),
        (bytes(range(256)) * 4, "not_tls"),
        (b"", "eof"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "eof"),  # a ClientHello cut short
    ],
    ids=["plain-http", "garbage", "eof", "eof-mid-hello"],
)
async def test_listener_failure_labels(pki: dict[str, Path], data: bytes, label: str) -> None:
    """What a client sends instead of a handshake decides the label."""

    async def client(transport: MemoryStream) -> None:
        await transport.send_all(data)
        await transport.send_eof()

    assert await _server_failure(server_context([_pair(pki, "a")]), client) == label


async def test_client_rejecting_our_certificate_is_cert_rejected(pki: dict[str, Path]) -> None:
    """A client (stdlib ssl, which sends its alert) that does not trust the
    listener's certificate: the listener counts cert_rejected."""
    stranger = client_context(ca_file=pki["other_ca"])

    async def stdlib_client(transport: MemoryStream) -> None:
        with pytest.raises(ssl.SSLCertVerificationError):
            await StdlibTLSPeer(transport, stranger).handshake()
        await transport.aclose()

    label = await _server_failure(server_context([_pair(pki, "a")]), stdlib_client)
    assert label == "cert_rejected"


async def test_stalled_handshake_times_out_at_the_callers_deadline(
    pki: dict[str, Path], autojump_clock: trio.abc.Clock
) -> None:
    """A client that connects and says nothing: TooSlowError at exactly the
    deadline, labelled timeout."""
    server_side, _client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(server_side, server_context([_pair(pki, "a")]), server_side=True)
    with pytest.raises(trio.TooSlowError) as info, trio.fail_after(10):
        await server.do_handshake()
    assert trio.current_time() == 10
    assert handshake_failure_reason(info.value) == "timeout"


def test_failure_descriptions_and_other() -> None:
    """Descriptions are one line; anything unrecognised is labelled other."""
    eof = trio.BrokenResourceError()
    eof.__cause__ = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert describe_tls_failure(eof) == "connection closed during the handshake"
    assert handshake_failure_reason(eof) == "eof"
    reset = trio.BrokenResourceError()
    reset.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert describe_tls_failure(reset) == "connection closed during the handshake"
    assert handshake_failure_reason(ValueError("odd")) == "other"
    assert describe_tls_failure(ValueError("odd")) == "odd"
    assert handshake_failure_reason(ssl.SSLError(1, "no shared cipher")) == "other"


# --- bad files ------------------------------------------------------------------


def _encrypted_key(key: Path, target: Path) -> Path:
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    target.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return target


def test_bad_files_name_the_file_and_the_fault(pki: dict[str, Path], tmp_path: Path) -> None:
    """Every bad input is a ValueError naming the file and what is wrong,
    never OpenSSL's bare "PEM lib" and never a password prompt."""
    cert, key = _pair(pki, "a")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello\n")
    truncated = tmp_path / "truncated.pem"
    truncated.write_text(ssl.DER_cert_to_PEM_cert(_der(cert)[:200]))
    missing = tmp_path / "missing.pem"
    encrypted = _encrypted_key(key, tmp_path / "encrypted.key")
    cases = [
        ([(missing, key)], f"certificate {missing}: No such file or directory"),
        ([(garbage, key)], f"certificate {garbage}: no PEM certificate"),
        ([(truncated, key)], f"certificate {truncated}: truncated certificate"),
        ([(cert, garbage)], f"private key {garbage}: no PEM private key"),
        ([(cert, missing)], f"private key {missing}: No such file or directory"),
        (
            [(cert, pki["b_key"])],
            f"certificate {cert} with key {pki['b_key']}: key values mismatch",
        ),
        ([(cert, encrypted)], f"private key {encrypted}: encrypted keys are not supported"),
        ([(cert, key), (garbage, key)], f"certificate {garbage}: no PEM certificate"),
        ([], "TLS needs at least one certificate and key pair"),
    ]
    for pairs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            server_context(pairs)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=f"CA bundle {garbage}: no certificate or crl found"):
        client_context(ca_file=garbage)
    with pytest.raises(ValueError, match=f"certificate {garbage}: no PEM certificate"):
        client_context(cert_file=garbage, key_file=key)
    with pytest.raises(ValueError, match="contradict"):
        client_context(ca_file=cert, insecure=True)
    with pytest.raises(ValueError, match="needs its certificate"):
        client_context(key_file=key)


# --- certificate names ------------------------------------------------------------


def test_certificate_names_are_the_dns_alt_names(ca: trustme.CA) -> None:
    """dNSNames in order, lower-cased, IDNA A-labels; IPs and emails skipped;
    the CN ignored when there are alt names."""
    leaf = ca.issue_cert(
        "A.Example", "*.wild.example", "127.0.0.1", "me@example.com", "münchen.example",
        common_name="cn.example",
    )  # fmt: skip
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    assert certificate_names(der) == ["a.example", "*.wild.example", "xn--mnchen-3ya.example"]


def _cn_only_certificate() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trioproxy tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, "CN-Only.example"),
    ])  # fmt: skip
    now = datetime.datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_certificate_names_fall_back_to_the_common_name() -> None:
    """A certificate without subjectAltName is for its subject CN."""
    assert certificate_names(_cn_only_certificate()) == ["cn-only.example"]


def test_certificate_names_refuse_malformed_der(pki: dict[str, Path]) -> None:
    """Every truncation, and trailing bytes, are ValueErrors, never IndexError."""
    der = _der(pki["b"])
    for cut in range(len(der)):
        with pytest.raises(ValueError, match="certificate"):
            certificate_names(der[:cut])
    with pytest.raises(ValueError, match="malformed certificate"):
        certificate_names(der + b"\x00\x00")


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_certificate_names_survive_any_byte_change(position: int, value: int) -> None:
    """A certificate with any one byte changed parses or raises ValueError."""
    der = bytearray(_CN_ONLY)
    der[position % len(der)] = value
    try:
        names = certificate_names(bytes(der))
    except ValueError:
        return
    assert all(isinstance(name, str) for name in names)


_CN_ONLY = _cn_only_certificate()


# --- the bound -------------------------------------------------------------------


async def _pending_while_peer_stalls(
    pki: dict[str, Path], make_sender: Callable[[Recorder], TLSStream], size: int
) -> tuple[int, int]:
    """Send ``size`` bytes to a peer that reads nothing until the sender is
    blocked, then everything. Returns (ciphertext the sender held while
    blocked, the most it ever held); asserts the bytes arrived intact."""
    sender_side, peer_side = trio.testing.lockstep_stream_pair()
    recorder = Recorder(sender_side)
    sender = make_sender(recorder)
    peer = BoundedTLSStream(peer_side, server_context([_pair(pki, "a")]), server_side=True)
    await _handshakes(sender, peer)
    recorder.peak_pending = 0
    payload = bytes(range(256)) * (size // 256)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_all, payload)
        await trio.testing.wait_all_tasks_blocked()
        stalled = recorder.pending
        assert await read_exactly(peer, len(payload)) == payload
    return stalled, recorder.peak_pending


@pytest.mark.parametrize("max_write", [TLS_RECORD_SIZE, 5000, 64 * KiB])
async def test_send_to_a_stalled_peer_holds_one_slice(pki: dict[str, Path], max_write: int) -> None:
    """10 MiB into a peer that reads nothing: the sender holds at most one
    slice's ciphertext (the docstring's C), then all 10 MiB arrive intact."""

    def bounded(recorder: Recorder) -> TLSStream:
        return BoundedTLSStream(
            recorder, _client_ctx(pki), server_hostname="a.example", max_write=max_write
        )

    stalled, peak = await _pending_while_peer_stalls(pki, bounded, 10 * MiB)
    assert 0 < stalled <= peak <= ciphertext_size(max_write)


async def test_plain_sslstream_holds_the_whole_send(pki: dict[str, Path]) -> None:
    """The same measurement on a bare trio.SSLStream sees all 10 MiB of
    ciphertext held at once: what BoundedTLSStream exists to prevent."""

    def plain(recorder: Recorder) -> TLSStream:
        return trio.SSLStream(recorder, _client_ctx(pki), server_hostname="a.example")

    stalled, _ = await _pending_while_peer_stalls(pki, plain, 10 * MiB)
    assert stalled > 10 * MiB


async def _one_read_from_a_fast_peer(
    pki: dict[str, Path], make_reader: Callable[[Recorder], TLSStream]
) -> tuple[int, int, int]:
    """A peer has sent 1 MiB (all buffered in the transport); one
    ``receive_some()``. Returns (bytes pulled from the transport for it, the
    largest single transport read, plaintext returned), then checks the rest."""
    reader_side, peer_side = trio.testing.memory_stream_pair()
    recorder = Recorder(reader_side)
    reader = make_reader(recorder)
    peer = BoundedTLSStream(peer_side, server_context([_pair(pki, "a")]), server_side=True)
    await _handshakes(reader, peer)
    payload = bytes(range(256)) * (MiB // 256)
    await peer.send_all(payload)  # in-memory: returns with everything buffered
    recorder.pulled = recorder.largest_read = 0
    first = await reader.receive_some()
    pulled, largest = recorder.pulled, recorder.largest_read
    assert first + await read_exactly(reader, len(payload) - len(first)) == payload
    return pulled, largest, len(first)


@pytest.mark.parametrize("max_read", [TLS_RECORD_SIZE, 4096, 64 * KiB])
async def test_read_from_a_fast_peer_pulls_at_most_the_bound(
    pki: dict[str, Path], max_read: int
) -> None:
    """However much the transport has buffered, one read takes at most the
    ciphertext of ``max_read`` (``ciphertext_size``) per transport call, and
    leaves behind less than one record plus one transport read; it returns
    at most max_read, the plaintext of several records when max_read spans
    several."""

    def bounded(recorder: Recorder) -> TLSStream:
        return BoundedTLSStream(
            recorder, _client_ctx(pki), server_hostname="a.example", max_read=max_read
        )

    pulled, largest, returned = await _one_read_from_a_fast_peer(pki, bounded)
    assert 0 < returned <= max_read
    if max_read > TLS_RECORD_SIZE + TLS_RECORD_OVERHEAD:
        assert returned > TLS_RECORD_SIZE  # more than one record per call
    assert largest <= ciphertext_size(max_read)
    assert pulled - returned < TLS_RECORD_SIZE + TLS_RECORD_OVERHEAD + ciphertext_size(max_read)


class PeakBIO:
    """Stands in for a stream's memory BIO and records the most it held
    (``pending``) before each read and after each write."""

    def __init__(self, bio: ssl.MemoryBIO) -> None:
        self.bio = bio
        self.peak = 0

    @property
    def pending(self) -> int:
        return self.bio.pending

    def write(self, data: bytes | memoryview) -> int:
        written = self.bio.write(data)
        self.peak = max(self.peak, self.bio.pending)
        return written

    def read(self, size: int = -1) -> bytes:
        self.peak = max(self.peak, self.bio.pending)
        return self.bio.read(size)

    def write_eof(self) -> None:
        self.bio.write_eof()


async def test_the_bios_hold_one_record_whatever_the_slice(pki: dict[str, Path]) -> None:
    """With 1 MiB slices each way, 4 MiB cross byte-exact in few calls,
    while neither memory BIO (whose peak stays allocated) ever holds more
    than one record's ciphertext: the slice is the transport's, not the
    BIOs'."""
    server_side, client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(
        server_side, server_context([_pair(pki, "a")]), server_side=True, max_read=MiB
    )
    client = BoundedTLSStream(
        client_side, _client_ctx(pki), server_hostname="a.example", max_write=MiB
    )
    await _handshakes(server, client)
    outgoing, incoming = PeakBIO(client._outgoing), PeakBIO(server._incoming)
    client._outgoing, server._incoming = outgoing, incoming  # type: ignore[assignment]
    payload = bytes(range(256)) * (4 * MiB // 256)
    reads = 0
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        while len(received) < len(payload):
            received += await server.receive_some()
            reads += 1
    assert received == payload
    assert reads < 4 * MiB // TLS_RECORD_SIZE  # several records per call
    record = ciphertext_size(TLS_RECORD_SIZE)
    assert 0 < outgoing.peak <= record
    assert 0 < incoming.peak <= record


async def test_plain_sslstream_pulls_everything_buffered(pki: dict[str, Path]) -> None:
    """The same measurement on a bare trio.SSLStream: one receive_some()
    pulls the whole megabyte from the transport."""

    def plain(recorder: Recorder) -> TLSStream:
        return trio.SSLStream(recorder, _client_ctx(pki), server_hostname="a.example")

    pulled, _, _ = await _one_read_from_a_fast_peer(pki, plain)
    assert pulled > MiB


async def test_stream_contract(pki: dict[str, Path]) -> None:
    """max_bytes below max_read is honoured, 0 is refused, an empty send is
    fine, any buffer format arrives as its bytes, concurrent senders are
    refused, and sizes below 1 are refused."""
    server_side, client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(server_side, server_context([_pair(pki, "a")]), server_side=True)
    client = BoundedTLSStream(client_side, _client_ctx(pki), server_hostname="a.example")
    await _handshakes(server, client)
    words = array.array("I", range(1000))
    await client.send_all(b"")
    await client.send_all(memoryview(words))
    assert len(await server.receive_some(10)) == 10
    with pytest.raises(ValueError, match="max_bytes"):
        await server.receive_some(0)
    assert await read_exactly(server, 3990) == words.tobytes()[10:]
    sender_side, peer_side = trio.testing.lockstep_stream_pair()
    sender = BoundedTLSStream(sender_side, _client_ctx(pki), server_hostname="a.example")
    peer = BoundedTLSStream(peer_side, server_context([_pair(pki, "a")]), server_side=True)
    await _handshakes(sender, peer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_all, bytes(100 * KiB))  # stuck in its first slice
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await sender.send_all(b"y")
        with pytest.raises(trio.BusyResourceError):
            await sender.wait_send_all_might_not_block()
        nursery.cancel_scope.cancel()
    with pytest.raises(ValueError, match="at least 1"):
        BoundedTLSStream(client_side, _client_ctx(pki), max_write=0)


# --- EOF and tunnels --------------------------------------------------------------


async def test_eof_without_close_notify_is_eof(pki: dict[str, Path]) -> None:
    """https_compatible: a peer that just closes TCP gives b"", not an error;
    the stream cannot half-close (it is no HalfCloseableStream)."""
    server_side, client_side = trio.testing.memory_stream_pair()
    server = BoundedTLSStream(server_side, server_context([_pair(pki, "a")]), server_side=True)
    client = BoundedTLSStream(client_side, _client_ctx(pki), server_hostname="a.example")
    await _handshakes(server, client)
    await client.send_all(b"last words")
    await client_side.aclose()  # no close_notify
    assert await read_exactly(server, 10) == b"last words"
    assert await server.receive_some() == b""
    assert not isinstance(server, trio.abc.HalfCloseableStream)


async def _tls_leg_and_plain_leg(
    pki: dict[str, Path],
) -> tuple[BoundedTLSStream, StdlibTLSPeer, MemoryStream, MemoryStream]:
    """(proxy's TLS leg, the TLS peer, proxy's plain leg, the plain peer)."""
    tls_side, tls_peer_side = trio.testing.memory_stream_pair()
    tls_leg = BoundedTLSStream(tls_side, server_context([_pair(pki, "a")]), server_side=True)
    tls_peer = StdlibTLSPeer(tls_peer_side, _client_ctx(pki))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tls_leg.do_handshake)
        nursery.start_soon(tls_peer.handshake)
    plain_leg, plain_peer = trio.testing.memory_stream_pair()
    return tls_leg, tls_peer, plain_leg, plain_peer


async def _run_tunnel(a: trio.abc.Stream, b: trio.abc.Stream, result: list[str | None]) -> None:
    statistics = await tunnel(a, b, read_size=16 * KiB, buffer_chunks=4)
    result.append(statistics.error)


async def test_tunnel_eof_towards_the_tls_leg_is_not_passed_on(
    pki: dict[str, Path], autojump_clock: trio.abc.Clock
) -> None:
    """The plain peer half-closes: the TLS peer sees no EOF and can still
    send; when it closes, the plain peer gets its bytes and EOF, and the
    tunnel ends cleanly."""
    tls_leg, tls_peer, plain_leg, plain_peer = await _tls_leg_and_plain_leg(pki)
    result: list[str | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_tunnel, tls_leg, plain_leg, result)
        await plain_peer.send_all(b"request")
        await plain_peer.send_eof()
        assert await tls_peer.receive_some() == b"request"
        with trio.move_on_after(60) as waited:  # virtual time
            await tls_peer.receive_some()
        assert waited.cancelled_caught  # no EOF reached the TLS peer
        await tls_peer.send_all(b"answer")
        await tls_peer.send_close_notify()
        await tls_peer.transport.aclose()
        assert await read_exactly(plain_peer, 6) == b"answer"
        assert await plain_peer.receive_some() == b""
    assert result == [None]


async def test_tunnel_close_notify_from_the_tls_leg_half_closes_the_plain_leg(
    pki: dict[str, Path],
) -> None:
    """The TLS peer sends close_notify and keeps reading: the plain peer gets
    EOF, the other direction keeps flowing, and the tunnel ends cleanly when
    the plain peer closes too."""
    tls_leg, tls_peer, plain_leg, plain_peer = await _tls_leg_and_plain_leg(pki)
    result: list[str | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_tunnel, tls_leg, plain_leg, result)
        await tls_peer.send_close_notify()
        assert await plain_peer.receive_some() == b""
        await plain_peer.send_all(b"late answer")
        assert await tls_peer.receive_some() == b"late answer"
        await plain_peer.aclose()
    assert result == [None]


async def test_tunnel_bare_close_from_the_tls_leg_ends_the_tunnel(pki: dict[str, Path]) -> None:
    """The TLS peer closes TCP without close_notify: the plain peer still
    gets EOF, but trio's SSLStream is broken from then on, so the next byte
    towards the TLS leg ends the tunnel with a stream error."""
    tls_leg, tls_peer, plain_leg, plain_peer = await _tls_leg_and_plain_leg(pki)
    result: list[str | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_tunnel, tls_leg, plain_leg, result)
        await tls_peer.transport.aclose()
        assert await plain_peer.receive_some() == b""
        await plain_peer.send_all(b"late answer")
    assert result == ["BrokenResourceError"]


# --- loopback ---------------------------------------------------------------------


async def test_loopback_round_trip(pki: dict[str, Path]) -> None:
    """Over real TCP on 127.0.0.1: the listener's stream and the upstream
    connector move 4 MiB each way byte-exact with verification on."""
    payload = bytes(range(256)) * (4 * MiB // 256)
    server_ctx = server_context([_pair(pki, "a"), _pair(pki, "b")])

    async def echo(transport: trio.SocketStream) -> None:
        stream = BoundedTLSStream(transport, server_ctx, server_side=True)
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        transport = await trio.open_tcp_stream("127.0.0.1", port)
        stream = await open_tls_upstream(
            transport, _client_ctx(pki), host="127.0.0.1", port=port, server_hostname="b.example"
        )
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.send_all, payload)
            assert await read_exactly(stream, len(payload)) == payload
        assert stream.ssl_object.selected_alpn_protocol() == "http/1.1"
        await stream.aclose()
        nursery.cancel_scope.cancel()
