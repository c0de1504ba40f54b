"""TLS on 127.0.0.1 with real clients: curl (skipped without it), Python's
``ssl``, ``urllib`` and ``http.client``; the real server in this process.

The origins are ``streaming_origin``'s, plain or over TLS; certificates come
from trustme (``tlskit``). Large transfers are hashed on both ends: the
issue's 1 GiB download and 200 MiB upload through an https:// origin with
verification on; through the TLS listener 64 MiB and 32 MiB, to keep the
suite's time (``TRIOPROXY_TLS_FULL=1``: 1 GiB and 200 MiB there too).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import random
import shutil
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trioproxy
from trioproxy._cli import main
from trioproxy._metrics import ProxyMeters

from .helpers import (
    LOOPBACK_TEST_PORTS,
    PROMPTLY,
    ROOT,
    LineReader,
    args_for_a_quiet_start,
    start_proxy,
    stdout_sha256,
)
from .streaming_origin import OriginLog, expected_sha256, payload_chunks, serve_streaming_origin
from .tlskit import Pki, make_pki

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

MiB = 1024 * 1024
# The sizes through an https:// origin: 1 GiB down, 200 MiB up.
HUGE_DOWNLOAD = 1024 * MiB
HUGE_UPLOAD = 200 * MiB
# Through the TLS listener, smaller unless TRIOPROXY_TLS_FULL=1: the listener's
# encryption and curl's decryption share the suite's two cores.
FULL = os.environ.get("TRIOPROXY_TLS_FULL") == "1"
DOWNLOAD_SIZE = HUGE_DOWNLOAD if FULL else 64 * MiB
UPLOAD_SIZE = HUGE_UPLOAD if FULL else 32 * MiB
SMALL_DOWNLOAD = 4 * MiB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Upload bodies by size, written once per module."""
    directory = tmp_path_factory.mktemp("upload")
    files = {}
    for size in {UPLOAD_SIZE, HUGE_UPLOAD}:
        files[size] = directory / f"upload-{size}.bin"
        with files[size].open("wb") as file:
            for chunk in payload_chunks(size):
                file.write(chunk)
    return files


@attrs.frozen
class Setup:
    origin_port: int
    proxy_port: int
    log: OriginLog
    meters: ProxyMeters


@asynccontextmanager
async def running(
    pki: Pki,
    *,
    origin: str | None = None,
    listener: Sequence[str] = (),
    upstream: str | None = "{origin}",
    **settings: object,
) -> AsyncIterator[Setup]:
    """An origin (TLS with ``origin``'s pair, else plain) and the proxy in
    front of it: reverse mode to ``upstream`` (``{origin}`` is the origin's
    URL, ``{port}`` its port), or forward mode with ``upstream=None``; TLS
    on the listener with the ``listener`` pairs."""
    log, meters = OriginLog(), ProxyMeters()
    context = None
    if origin is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*pki.pair(origin))
    pairs = [pki.pair(name) for name in listener]
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(
            lambda task_status: serve_streaming_origin(
                log, ssl_context=context, task_status=task_status
            )
        )
        url = f"{'https' if origin else 'http'}://localhost:{origin_port}"
        config = trioproxy.ProxyConfig(
            upstream=None if upstream is None else upstream.format(origin=url, port=origin_port),
            tls_cert=[cert for cert, _ in pairs],
            tls_key=[key for _, key in pairs],
            connect_ports=LOOPBACK_TEST_PORTS,
            **settings,  # type: ignore[arg-type]
        )
        proxy_port = await start_proxy(nursery, config, meters=meters)
        yield Setup(origin_port, proxy_port, log, meters)
        nursery.cancel_scope.cancel()


def curl_command(*args: str) -> list[str]:
    assert CURL is not None
    return [CURL, "--silent", "--show-error", "--noproxy", "", *args]


async def curl(*args: str) -> tuple[int, bytes]:
    result = await trio.run_process(
        curl_command(*args), capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout


def http_get(port: int, target: str) -> tuple[int, bytes]:
    """One GET to the proxy with http.client (in a thread): status and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]


# --- reverse mode to an https:// origin ---------------------------------------------------


@needs_curl
async def test_download_from_an_https_origin_is_byte_exact(pki: Pki) -> None:
    """A large Content-Length download from a TLS origin, verified against
    our CA, arrives byte-exact; the log line says the upstream leg was TLS."""
    async with running(pki, origin="localhost", upstream_ca=str(pki.ca)) as setup:
        url = f"http://127.0.0.1:{setup.proxy_port}/bytes/{HUGE_DOWNLOAD}"
        status, digest, size = await stdout_sha256(curl_command(url))
        assert (status, size, digest) == (0, HUGE_DOWNLOAD, expected_sha256(HUGE_DOWNLOAD))
        assert setup.meters.tls_handshakes == {"upstream": 1}


@needs_curl
async def test_upload_to_an_https_origin_is_byte_exact(
    pki: Pki, upload_files: dict[int, Path]
) -> None:
    """A large upload reaches the TLS origin byte-exact (it answers the
    length and sha256 of what it read)."""
    async with running(pki, origin="localhost", upstream_ca=str(pki.ca)) as setup:
        url = f"http://127.0.0.1:{setup.proxy_port}/upload"
        status, body = await curl("--data-binary", f"@{upload_files[HUGE_UPLOAD]}", url)
        assert (status, body.decode()) == (0, f"{HUGE_UPLOAD} {expected_sha256(HUGE_UPLOAD)}")


CHECKS = [
    # origin's pair, upstream URL, settings, status, reason in the log line
    (
        "localhost",
        "{origin}",
        {"upstream_ca": "other_ca"},
        502,
        "certificate verify failed: unable to get local issuer certificate",
    ),
    (
        "expired",
        "{origin}",
        {"upstream_ca": "ca"},
        502,
        "certificate verify failed: certificate has expired",
    ),
    (
        "b",
        "{origin}",
        {"upstream_ca": "ca"},
        502,
        "certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'.",
    ),
    ("b", "{origin}", {"upstream_insecure": True}, 200, None),
    ("expired", "{origin}", {"upstream_insecure": True}, 200, None),
    (
        "b",
        "https://127.0.0.1:{port}",
        {"upstream_ca": "ca", "upstream_sni": "b.example"},
        200,
        None,
    ),
]


@pytest.mark.parametrize(
    ("origin", "upstream", "settings", "status", "reason"),
    CHECKS,
    ids=["wrong-ca", "expired", "wrong-host", "insecure-wrong-host", "insecure-expired", "sni"],
)
async def test_upstream_certificate_checks(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    origin: str,
    upstream: str,
    settings: dict[str, object],
    status: int,
    reason: str | None,
) -> None:
    """Verification is on by default: a stranger CA, an expired certificate
    and the wrong name are 502s whose one log line says why, never a
    traceback; --upstream-insecure accepts them; --upstream-sni names the
    certificate to check when the URL has an address."""
    files = {"ca": str(pki.ca), "other_ca": str(pki.other_ca)}
    resolved: dict[str, Any] = {
        k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()
    }
    with caplog.at_level(logging.INFO, logger="trioproxy.access"):
        async with running(pki, origin=origin, upstream=upstream, **resolved) as setup:
            got, body = await trio.to_thread.run_sync(http_get, setup.proxy_port, "/small")
    assert got == status
    (line,) = access_lines(caplog)
    assert " tls=upstream" in line
    if reason is not None:
        assert body.decode().endswith(f"{reason}\n")
        assert line.endswith(f'failed: {reason}"')
    assert "Traceback" not in caplog.text


# --- TLS on the listener ---------------------------------------------------------------------


@needs_curl
async def test_curl_through_the_tls_listener_is_byte_exact(
    pki: Pki, upload_files: dict[int, Path]
) -> None:
    """curl --cacert to the TLS listener: a download and an upload arrive
    byte-exact, and the origin hears X-Forwarded-Proto: https."""
    async with running(pki, listener=["localhost"]) as setup:
        base = f"https://localhost:{setup.proxy_port}"
        ca = ["--cacert", str(pki.ca)]
        status, digest, size = await stdout_sha256(
            curl_command(*ca, f"{base}/bytes/{DOWNLOAD_SIZE}")
        )
        assert (status, size, digest) == (0, DOWNLOAD_SIZE, expected_sha256(DOWNLOAD_SIZE))
        upload = upload_files[UPLOAD_SIZE]
        status, body = await curl(*ca, "--data-binary", f"@{upload}", f"{base}/upload")
        assert (status, body.decode()) == (0, f"{UPLOAD_SIZE} {expected_sha256(UPLOAD_SIZE)}")
        status, body = await curl(*ca, f"{base}/echo")
        assert b"\nX-Forwarded-Proto: https\n" in body


async def open_tls_client(
    port: int, pki: Pki, server_hostname: str
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client of 127.0.0.1:``port`` asking for ``server_hostname``."""
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    return trio.SSLStream(transport, pki.context(), server_hostname=server_hostname)


async def served_names(port: int, pki: Pki, server_hostname: str) -> list[str]:
    """The DNS names of the certificate the listener shows for ``server_hostname``."""
    stream = await open_tls_client(port, pki, server_hostname)
    async with stream:
        await stream.do_handshake()
        certificate = stream.getpeercert()
    assert certificate is not None
    return [value for kind, value in certificate["subjectAltName"] if kind == "DNS"]


async def test_sni_picks_the_matching_certificate(pki: Pki) -> None:
    """Two pairs: a client asking for b.example (or a name under its
    wildcard) gets the second certificate, localhost gets the first, the
    default."""
    async with running(pki, listener=["localhost", "b"]) as setup:
        assert await served_names(setup.proxy_port, pki, "b.example") == [
            "b.example",
            "*.wild.example",
        ]
        wild = await served_names(setup.proxy_port, pki, "x.wild.example")
        assert wild[:1] == ["b.example"]
        assert await served_names(setup.proxy_port, pki, "localhost") == ["localhost"]


async def test_bad_clients_cost_only_their_own_connection(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Plain HTTP to the TLS port, random bytes, and a stalled handshake each
    end only their own connection, with one access line each and a count by
    reason; a real client is served while the stalled one still waits."""
    with caplog.at_level(logging.INFO, logger="trioproxy.access"):
        async with running(pki, listener=["localhost"], tls_handshake_timeout=1.0) as setup:
            stalled = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
            for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", random.Random(7).randbytes(600)):
                async with await trio.open_tcp_stream("127.0.0.1", setup.proxy_port) as bad:
                    await bad.send_all(junk)
                    # An alert at most, then EOF, or a reset: OpenSSL stops
                    # at the first bad record header and the rest of the
                    # client's bytes are closed unread (SocketTLSStream).
                    with trio.fail_after(PROMPTLY), contextlib.suppress(trio.BrokenResourceError):
                        while await bad.receive_some():
                            pass
            good = await open_tls_client(setup.proxy_port, pki, "localhost")
            async with good:
                await good.send_all(b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert (await good.receive_some()).startswith(b"HTTP/1.1 200 ")
            with trio.fail_after(PROMPTLY):  # the handshake timeout, 1 s, closes it
                assert await stalled.receive_some() == b""
            await stalled.aclose()
            failures = dict(setup.meters.tls_handshake_failures)
    assert failures == {("client", "not_tls"): 2, ("client", "timeout"): 1}
    lines = access_lines(caplog)
    assert len(lines) == 4
    reasons = sorted(line.split(' reason="')[1] for line in lines if "reason=" in line)
    assert reasons == [
        'TLS handshake failed: http request"',
        'TLS handshake failed: no handshake within 1 s"',
        'TLS handshake failed: wrong version number"',
    ]


# --- the HTTPS proxy (forward mode over TLS) and https:// targets ------------------------------


@needs_curl
@pytest.mark.parametrize("target_tls", [False, True], ids=["http-target", "https-target"])
async def test_curl_through_the_https_proxy(pki: Pki, target_tls: bool) -> None:
    """``curl --proxy https://127.0.0.1:PORT --proxy-cacert ca.pem`` for an
    http:// target (absolute form inside TLS) and an https:// one (CONNECT
    inside TLS, TLS inside that), byte-exact."""
    origin = "localhost" if target_tls else None
    async with running(pki, origin=origin, listener=["localhost"], upstream=None) as setup:
        scheme = "https" if target_tls else "http"
        url = f"{scheme}://localhost:{setup.origin_port}/bytes/{SMALL_DOWNLOAD}"
        proxy = ["--proxy", f"https://127.0.0.1:{setup.proxy_port}", "--proxy-cacert", str(pki.ca)]
        command = curl_command(*proxy, "--cacert", str(pki.ca), url)
        status, digest, size = await stdout_sha256(command)
        assert (status, size, digest) == (0, SMALL_DOWNLOAD, expected_sha256(SMALL_DOWNLOAD))
        assert setup.meters.tls_handshakes == {"client": 1}
        # The http:// target went as a proxied request (we add Via); the
        # https:// one through a tunnel, curl's own TLS end to end (no Via).
        fields = dict(setup.log.requests[-1].headers)
        assert (b"via" in fields) != target_tls


async def test_urllib_with_an_https_proxy_url(pki: Pki) -> None:
    """Python's urllib reaches an http:// URL through ``https://`` proxy
    (it has no CONNECT over a TLS proxy, so https:// targets are not tried)."""
    async with running(pki, listener=["localhost"], upstream=None) as setup:
        proxy = f"https://localhost:{setup.proxy_port}"
        url = f"http://127.0.0.1:{setup.origin_port}/hello?x=1"

        def fetch() -> bytes:
            opener = urllib.request.build_opener(
                urllib.request.ProxyHandler({"http": proxy}),
                urllib.request.HTTPSHandler(context=pki.context()),
            )
            with opener.open(url, timeout=10) as response:
                data: bytes = response.read()
                return data

        assert (await trio.to_thread.run_sync(fetch)).startswith(b"GET /hello?x=1")
        assert setup.meters.tls_handshakes == {"client": 1}


@pytest.mark.parametrize(("trust", "status"), [("ca", 200), ("other_ca", 502)])
async def test_an_absolute_https_target_is_fetched_over_verified_tls(
    pki: Pki, trust: str, status: int
) -> None:
    """``GET https://localhost:PORT/...`` sent to the proxy in plain is
    fetched over TLS, verified with --upstream-ca (a stranger CA: 502)."""
    ca = pki.ca if trust == "ca" else pki.other_ca
    async with running(pki, origin="localhost", upstream=None, upstream_ca=str(ca)) as setup:
        target = f"https://localhost:{setup.origin_port}/hello"
        got, body = await trio.to_thread.run_sync(http_get, setup.proxy_port, target)
    assert got == status
    if status == 200:
        assert body.startswith(b"GET /hello\nHost: localhost:")
    else:
        assert b"certificate verify failed" in body


# --- the command line -------------------------------------------------------------------------


def test_a_bad_certificate_file_stops_the_start_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing certificate is exit status 2 and one line naming the file,
    before anything listens."""
    missing = tmp_path / "missing.pem"
    with pytest.raises(SystemExit) as exited:
        main(["--tls-cert", str(missing)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == f"trioproxy: error: certificate {missing}: No such file or directory\n"


async def test_upstream_insecure_is_said_loudly_once_at_start() -> None:
    """--upstream-insecure: one warning before the listening line, naming the
    flag and what it costs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "trioproxy", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", "https://origin.test", "--upstream-insecure", "--access-log", "off"]
    process = await trio.lowlevel.open_process(
        [*argv, *args_for_a_quiet_start()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stderr is not None
        with trio.fail_after(PROMPTLY):
            lines = await LineReader(process.stderr).until("trioproxy listening on ")
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    warnings = [line for line in lines if "--upstream-insecure" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]
    assert "NOT checked" in warnings[0]
