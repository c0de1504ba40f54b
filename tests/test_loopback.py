"""Loopback tests: a real origin, the real server, real clients (curl, http.client).

These keep the in-memory tests honest. They bind and connect only on 127.0.0.1.
Large transfers are hashed on both ends.
"""

from __future__ import annotations

import http.client
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

import trioproxy

from .helpers import start_proxy, stdout_sha256
from .streaming_origin import OriginLog, expected_sha256, payload_chunks, serve_streaming_origin

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

# The issue's sizes: 1 GiB down, 200 MiB up, through both modes, in every CI run.
HUGE_DOWNLOAD = 1024 * 1024 * 1024
HUGE_UPLOAD = 200 * 1024 * 1024
# Every other framing and mode combination runs at a size that still spans
# hundreds of chunks but keeps the suite fast.
DOWNLOAD_SIZE = 16 * 1024 * 1024
UPLOAD_SIZE = 8 * 1024 * 1024
# Real seconds within which the origin must see a client's leaving: far more
# than it takes on a loaded machine, far less than the stall timeout.
CLIENT_GONE_BOUND = 30


@attrs.frozen
class Setup:
    origin_port: int
    proxy_port: int
    log: OriginLog
    mode: str

    def url(self, path: str) -> str:
        """The URL a client asks for, and the proxy option curl needs."""
        if self.mode == "forward":
            return f"http://127.0.0.1:{self.origin_port}{path}"
        return f"http://127.0.0.1:{self.proxy_port}{path}"

    def curl_args(self) -> list[str]:
        assert CURL is not None
        args = [CURL, "--silent", "--show-error", "--noproxy", ""]
        if self.mode == "forward":
            args += ["--proxy", f"http://127.0.0.1:{self.proxy_port}"]
        return args


@asynccontextmanager
async def running(mode: str, **config: object) -> AsyncIterator[Setup]:
    log = OriginLog()
    async with trio.open_nursery() as nursery:
        origin_port = await nursery.start(serve_streaming_origin, log)
        upstream = f"http://127.0.0.1:{origin_port}" if mode == "reverse" else None
        proxy_port = await start_proxy(
            nursery,
            trioproxy.ProxyConfig(upstream=upstream, **config),  # type: ignore[arg-type]
        )
        yield Setup(origin_port, proxy_port, log, mode)
        nursery.cancel_scope.cancel()


async def curl(setup: Setup, *args: str) -> tuple[int, bytes]:
    """Run curl; returns (exit status, stdout)."""
    result = await trio.run_process(
        [*setup.curl_args(), *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout


async def curl_sha256(setup: Setup, *args: str) -> tuple[int, str, int]:
    """Run curl writing the body into sha256sum-like hashing in this process."""
    return await stdout_sha256([*setup.curl_args(), *args])


DOWNLOADS = [
    *[("bytes", HUGE_DOWNLOAD)],
    *[(kind, DOWNLOAD_SIZE) for kind in ("chunked", "close")],
]


@needs_curl
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize(("kind", "size"), DOWNLOADS)
async def test_large_download_is_byte_exact(mode: str, kind: str, size: int) -> None:
    """A large download (1 GiB with Content-Length) arrives byte-exact through
    either mode, whatever the origin's framing."""
    async with running(mode) as setup:
        status, digest, received = await curl_sha256(setup, setup.url(f"/{kind}/{size}"))
        assert (status, received) == (0, size)
        assert digest == expected_sha256(size)


@needs_curl
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize(("chunked", "size"), [(False, HUGE_UPLOAD), (True, UPLOAD_SIZE)])
async def test_large_upload_is_byte_exact(
    mode: str, chunked: bool, size: int, tmp_path: object
) -> None:
    """A large upload (200 MiB with Content-Length; chunked too) reaches the
    origin byte-exact."""
    upload = trio.Path(str(tmp_path)) / "upload.bin"
    async with await upload.open("wb") as file:
        for chunk in payload_chunks(size):
            await file.write(chunk)
    extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
    async with running(mode) as setup:
        status, body = await curl(
            setup, "--data-binary", f"@{upload}", *extra, setup.url("/upload")
        )
        assert status == 0
        assert body.decode() == f"{size} {expected_sha256(size)}"


@needs_curl
@pytest.mark.parametrize("mode", ["forward", "reverse"])
async def test_upstream_dying_mid_body_makes_curl_exit_18(mode: str) -> None:
    """A body cut by the upstream is seen by curl as a partial transfer (18)."""
    async with running(mode) as setup:
        for kind in ("die/10000000/3000000",):
            status, _ = await curl(setup, setup.url(f"/{kind}"))
            assert status == 18


async def test_client_leaving_closes_the_upstream() -> None:
    """When the client drops mid-download, the origin sees its connection
    break (cancellation reaches the upstream; that it takes no time at all is
    test_exchange's, on a virtual clock)."""
    async with running("reverse") as setup:
        client = await trio.open_tcp_stream("127.0.0.1", setup.proxy_port)
        async with client:
            await client.send_all(b"GET /bytes/1000000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await client.receive_some(65536)
        # A bound on a hang, not on speed: nothing but the client's leaving
        # ends the origin's connection before the stall timeout (120 s).
        with trio.fail_after(CLIENT_GONE_BOUND):
            await setup.log.broken_event.wait()


async def test_reverse_mode_adds_forwarding_fields_over_tcp() -> None:
    """Over a real socket, reverse mode tells the origin the client's address,
    the scheme and the Host the client asked for."""
    async with running("reverse") as setup:

        def fetch() -> bytes:
            connection = http.client.HTTPConnection("127.0.0.1", setup.proxy_port, timeout=10)
            connection.request("GET", "/echo?a=%2F", headers={"Host": "public.example"})
            body = connection.getresponse().read()
            connection.close()
            return body

        lines = (await trio.to_thread.run_sync(fetch)).split(b"\n")
        assert lines[0] == b"GET /echo?a=%2F"
        assert b"X-Forwarded-For: 127.0.0.1" in lines
        assert b"X-Forwarded-Proto: http" in lines
        assert b"X-Forwarded-Host: public.example" in lines
        assert b"Via: 1.1 trioproxy" in lines


async def test_keep_alive_with_http_client() -> None:
    """http.client reuses one connection for several requests, HEAD included."""
    async with running("reverse") as setup:

        def three_requests() -> list[tuple[int, bytes]]:
            connection = http.client.HTTPConnection("127.0.0.1", setup.proxy_port, timeout=10)
            results = []
            for method, path in (("GET", "/bytes/5000"), ("HEAD", "/bytes/5000"), ("GET", "/x")):
                connection.request(method, path)
                response = connection.getresponse()
                results.append((response.status, response.read()))
            connection.close()
            return results

        results = await trio.to_thread.run_sync(three_requests)
        assert [status for status, _ in results] == [200, 200, 200]
        assert len(results[0][1]) == 5000
        assert results[1][1] == b""
        assert results[2][1].startswith(b"GET /x")
        # One client connection, three upstream requests.
        assert len(setup.log.requests) == 3


async def test_urllib_proxy_handler_and_http_proxy_env() -> None:
    """Python's urllib works through the forward proxy, both with an explicit
    ProxyHandler and through the http_proxy environment variable."""
    import urllib.request

    async with running("forward") as setup:
        proxy = f"http://127.0.0.1:{setup.proxy_port}"
        url = setup.url("/hello?x=1")

        def with_handler() -> bytes:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
            with opener.open(url, timeout=10) as response:
                data: bytes = response.read()
                return data

        def with_environment() -> bytes:
            handler = urllib.request.ProxyHandler(
                urllib.request.getproxies_environment() | {"http": proxy}
            )
            with urllib.request.build_opener(handler).open(url, timeout=10) as response:
                data: bytes = response.read()
                return data

        assert (await trio.to_thread.run_sync(with_handler)).startswith(b"GET /hello?x=1")
        assert (await trio.to_thread.run_sync(with_environment)).startswith(b"GET /hello?x=1")
