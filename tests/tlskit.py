"""What the TLS tests share: certificates from trustme written to PEM files,
a hand-driven TLS peer that can half-close, and an exact read.

Certificates (``make_pki``): one CA; ``localhost`` for ``localhost`` and
``127.0.0.1`` (the listener's and the origins' default); ``b`` for
``b.example`` and ``*.wild.example`` (the second SNI pair); ``expired``, as
``localhost`` but expired yesterday; and a stranger CA that signed none of
them.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
from pathlib import Path

import attrs
import trio
import trustme

from trioproxy._tls import TLS_RECORD_SIZE


@attrs.frozen
class Pki:
    """PEM files: ``ca``, ``other_ca`` and a ``(certificate chain, key)``
    pair per name (``pair("localhost")``)."""

    directory: Path
    ca: Path
    other_ca: Path

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def context(self, *, ca: Path | None = None) -> ssl.SSLContext:
        """A client context trusting ``ca`` (default: our CA)."""
        return ssl.create_default_context(cafile=str(ca or self.ca))


def make_pki(directory: Path) -> Pki:
    """Write the CAs and the leaf pairs described in the module comment."""
    ca = trustme.CA()
    pki = Pki(directory, directory / "ca.pem", directory / "other_ca.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    trustme.CA().cert_pem.write_to_path(str(pki.other_ca))
    now = datetime.datetime.now(datetime.UTC)
    leaves = {
        "localhost": ca.issue_cert("localhost", "127.0.0.1"),
        "b": ca.issue_cert("b.example", "*.wild.example"),
        "expired": ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        ),
    }
    for name, leaf in leaves.items():
        cert, key = pki.pair(name)
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
    return pki


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await stream.receive_some()
        assert data, f"EOF after {len(received)} of {size} bytes"
        received += data
    return bytes(received)


class StdlibTLSPeer:
    """A TLS client on a hand-driven ``ssl.SSLObject``. Unlike trio's
    SSLStream it sends its alert when it rejects a certificate, and it can
    send close_notify and keep reading (a TLS-level half-close)."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        server_hostname: str = "a.example",
    ) -> None:
        self.transport = transport
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                await self._flush()  # the alert
                raise
            else:
                return await self._flush()

    async def send_all(self, data: bytes) -> None:
        self._tls.write(data)
        await self._flush()

    async def send_close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):  # it would wait for the reply
            self._tls.unwrap()
        await self._flush()

    async def receive_some(self) -> bytes:
        """Plaintext, or b"" once the peer's TLS session ended."""
        while True:
            try:
                return self._tls.read(TLS_RECORD_SIZE)
            except ssl.SSLWantReadError:
                await self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await self.transport.send_all(self._outgoing.read())

    async def _fill(self) -> None:
        data = await self.transport.receive_some()
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
