"""The real program: ``python -m trioproxy`` in a subprocess, signals, stderr.

The origin runs in the test on 127.0.0.1 port 0 and is gated by trio Events,
so a transfer is in flight exactly when the test needs it to be; the only
waits on real time are generous upper bounds (``fail_after``) on things that
must happen promptly.
"""

from __future__ import annotations

import re
import signal
import sys

import h11
import pytest
import trio

import trioproxy
from trioproxy import _memory

from .helpers import (
    CHUNK,
    CHUNKS,
    PROMPTLY,
    GatedOrigin,
    args_for_a_quiet_start,
    download,
    proxy_process,
    read_h11_message,
)


async def expect_cut_download(proxy_port: int, origin_port: int) -> None:
    """Download and check that the body was cut short after some bytes came."""
    received: list[int] = []
    with pytest.raises(h11.RemoteProtocolError, match="without sending complete message body"):
        await download(proxy_port, origin_port, received)
    assert 0 < sum(received) < len(CHUNK) * CHUNKS


async def test_startup_is_two_lines_and_access_log_goes_to_stderr() -> None:
    """At the default log level stderr carries exactly the startup line and the
    summary (version, mode, workers, memory ceiling) until a request arrives,
    then one access line per request; SIGTERM exits 0 with one line saying
    how the drain went."""
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process(*args_for_a_quiet_start()) as proxy:
            assert proxy.startup_line == f"trioproxy listening on http://127.0.0.1:{proxy.port}"
            received: list[int] = []
            assert await download(proxy.port, origin.port, received) == len(CHUNK) * CHUNKS
            with trio.fail_after(PROMPTLY):
                summary = await proxy.stderr.line()
                access = await proxy.stderr.line()
                proxy.process.send_signal(signal.SIGTERM)
                assert await proxy.process.wait() == 0
                rest = await proxy.stderr.rest()
        nursery.cancel_scope.cancel()
    assert summary.startswith(f"trioproxy {trioproxy.__version__}: forward proxy, 1 worker, ")
    assert re.search(r"memory ceiling \d+ MiB per process \(idle \d+ MiB \+ budget 64 MiB", summary)
    assert "client=127.0.0.1 method=GET" in access
    assert f"status=200 bytes_in=0 bytes_out={len(CHUNK) * CHUNKS}" in access
    assert rest == "trioproxy stopped: 0 busy connections drained, 0 cut at the deadline\n"


async def test_sigterm_lets_inflight_download_finish_and_refuses_new_connections() -> None:
    """After SIGTERM the listener is closed at once (new connections refused)
    while an in-flight download still completes in full; exit status 0."""
    origin = GatedOrigin()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process("--log-level", "info", "--shutdown-timeout", "60") as proxy:
            received: list[int] = []
            results: list[int] = []

            async def fetch() -> None:
                results.append(await download(proxy.port, origin.port, received))

            nursery.start_soon(fetch)
            with trio.fail_after(PROMPTLY):
                await origin.half_sent.wait()
                proxy.process.send_signal(signal.SIGTERM)
                await proxy.stderr.until("stopped accepting")
                with pytest.raises(OSError, match="all attempts to connect"):
                    await trio.open_tcp_stream("127.0.0.1", proxy.port)
                origin.release.set()
                assert await proxy.process.wait() == 0
                rest = await proxy.stderr.rest()
        nursery.cancel_scope.cancel()
    assert results == [len(CHUNK) * CHUNKS]
    assert "trioproxy stopped: 1 busy connections drained, 0 cut at the deadline" in rest


async def test_shutdown_timeout_cuts_a_stuck_transfer() -> None:
    """A transfer still running when ``--shutdown-timeout`` ends is cut (the
    client sees an incomplete body) and the process exits 0."""
    origin = GatedOrigin()  # never released: the download is stuck at half
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process("--shutdown-timeout", "0.5") as proxy:
            with trio.fail_after(PROMPTLY):
                async with trio.open_nursery() as fetching:
                    fetching.start_soon(expect_cut_download, proxy.port, origin.port)
                    await origin.half_sent.wait()
                    proxy.process.send_signal(signal.SIGTERM)
                    assert await proxy.process.wait() == 0
                    rest = await proxy.stderr.rest()
        nursery.cancel_scope.cancel()
    assert rest.endswith("trioproxy stopped: 0 busy connections drained, 1 cut at the deadline\n")


async def test_version_flag() -> None:
    """--version prints the package's version and exits 0."""
    result = await trio.run_process(
        [sys.executable, "-m", "trioproxy", "--version"], capture_stdout=True
    )
    assert result.stdout.decode() == f"trioproxy {trioproxy.__version__}\n"


async def test_second_signal_exits_at_once() -> None:
    """A second signal during the drain stops the process at once (long before
    a 60 s shutdown timeout), with exit status 0."""
    origin = GatedOrigin()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process("--log-level", "info", "--shutdown-timeout", "60") as proxy:
            with trio.fail_after(PROMPTLY):
                async with trio.open_nursery() as fetching:
                    fetching.start_soon(expect_cut_download, proxy.port, origin.port)
                    await origin.half_sent.wait()
                    proxy.process.send_signal(signal.SIGTERM)
                    await proxy.stderr.until("stopped accepting")
                    proxy.process.send_signal(signal.SIGINT)
                    assert await proxy.process.wait() == 0
        nursery.cancel_scope.cancel()


async def test_idle_keepalive_connection_does_not_delay_shutdown() -> None:
    """An idle keep-alive connection is closed at once on SIGTERM: the process
    exits long before its 60 s shutdown timeout, and the client sees EOF."""
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process("--shutdown-timeout", "60", "--access-log", "off") as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                request = h11.Request(
                    method="GET",
                    target=f"http://127.0.0.1:{origin.port}/file",
                    headers=[("Host", "x")],
                )
                await stream.send_all(conn.send(request) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                response, _ = await read_h11_message(stream, conn)
                assert isinstance(response, h11.Response)
                assert response.status_code == 200
                with trio.fail_after(PROMPTLY):
                    proxy.process.send_signal(signal.SIGTERM)
                    assert await proxy.process.wait() == 0
                    assert await stream.receive_some(100) == b""
        nursery.cancel_scope.cancel()


async def test_the_proxy_runs_with_the_allocator_settings_that_return_memory() -> None:
    """On glibc the command line re-executes itself once with PYTHONMALLOC=malloc
    and glibc's tcache off (docs/memory.md, "After a load"); same PID."""
    if _memory._malloc_trim() is None:
        pytest.skip("not glibc: no re-exec")
    async with proxy_process(
        *args_for_a_quiet_start(), unset=["PYTHONMALLOC", "GLIBC_TUNABLES"]
    ) as proxy:
        environ = (await trio.Path(f"/proc/{proxy.process.pid}/environ").read_bytes()).split(b"\0")
    assert b"PYTHONMALLOC=malloc" in environ
    assert b"GLIBC_TUNABLES=glibc.malloc.tcache_count=0" in environ
