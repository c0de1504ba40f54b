"""The buffered access log (``--access-log-buffer``): the same lines as per-line
logging, written at the bound, at least every second, at shutdown, and in
writes of whole lines no larger than PIPE_BUF."""

from __future__ import annotations

import io
import json
import logging
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from trioproxy import _cli
from trioproxy._accesslog import (
    FLUSH_SECONDS,
    WRITE_LIMIT,
    AccessLogBuffer,
    AccessRecord,
    JsonFormatter,
    access_line,
    flush_access_log,
    flush_access_log_forever,
    format_text,
    log_access,
    use_access_log_buffer,
)
from trioproxy._config import LogSettings

from .helpers import CHUNK, CHUNKS, PROMPTLY, GatedOrigin, download, proxy_process
from .test_cli_ops import restore_logging

# restore_logging is a fixture: configure_logging and use_access_log_buffer
# change global state, and it puts that back after each test.
__all__ = ["restore_logging"]


class Writes(io.StringIO):
    """A stream that remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def settings(argv: list[str]) -> LogSettings:
    return _cli.log_settings_from_args(_cli.build_parser().parse_args(argv))


def record(status: int = 200) -> AccessRecord:
    finished = AccessRecord(client="192.0.2.7", started=0.0)
    finished.status = status
    return finished


@pytest.mark.parametrize("created", [1764447560.0, 1764447560.0005, 1764447560.9999, 17.25])
def test_a_buffered_line_is_the_line_logging_writes(created: float) -> None:
    """Text and JSON lines are byte for byte what the command line's handlers
    format for the same fields at the same time."""
    fields = record().fields(now=0.5)
    text = format_text(fields)
    logged = logging.LogRecord("trioproxy.access", logging.INFO, "", 0, "%s", (text,), None)
    logged.created, logged.msecs = created, int((created - int(created)) * 1000) + 0.0
    formatted = logging.Formatter(_cli._ACCESS_TEXT_FORMAT).format(logged)
    assert access_line(fields, created, json_format=False) == formatted + "\n"
    logged.access = fields
    assert access_line(fields, created, json_format=True) == JsonFormatter().format(logged) + "\n"


def test_lines_wait_until_they_reach_the_bound() -> None:
    """Below ``max_bytes`` nothing is written; the line that reaches it writes all."""
    stream = Writes()
    line_size = len(access_line(record().fields(now=0.0), 0.0, json_format=False))
    buffer = AccessLogBuffer(stream, max_bytes=3 * line_size, json_format=False)
    buffer.append(record().fields(now=0.0))
    buffer.append(record().fields(now=0.0))
    assert stream.getvalue() == ""
    buffer.append(record().fields(now=0.0))
    assert stream.getvalue().count("\n") == 3
    buffer.flush()
    assert stream.getvalue().count("\n") == 3


def test_writes_are_whole_lines_within_pipe_buf() -> None:
    """A big buffer goes out in writes of whole lines, none over PIPE_BUF, so
    workers sharing a pipe never interleave mid-line."""
    stream = Writes()
    buffer = AccessLogBuffer(stream, max_bytes=1024 * 1024, json_format=True)
    for status in range(100, 600):
        buffer.append(record(status).fields(now=0.0))
    buffer.flush()
    assert len(stream.writes) > 1
    assert all(len(write) <= WRITE_LIMIT and write.endswith("\n") for write in stream.writes)
    statuses = [json.loads(line)["status"] for line in stream.getvalue().splitlines()]
    assert statuses == list(range(100, 600))


def test_a_failed_write_drops_the_lines_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A closed or full log never breaks the proxy: the lines are dropped with a warning."""
    stream = io.StringIO()
    buffer = AccessLogBuffer(stream, max_bytes=1024, json_format=False)
    buffer.append(record().fields(now=0.0))
    stream.close()
    buffer.flush()
    assert "could not write 1 access log lines" in caplog.text
    buffer.flush()  # nothing left to write


async def test_lines_are_written_every_second_and_when_cancelled(
    autojump_clock: trio.testing.MockClock, restore_logging: None
) -> None:
    """The flusher writes waiting lines within FLUSH_SECONDS, and once more
    when it is cancelled (the server's shutdown)."""
    stream = io.StringIO()
    use_access_log_buffer(AccessLogBuffer(stream, max_bytes=1 << 20, json_format=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_access_log_forever)
        log_access(record())
        await trio.sleep(FLUSH_SECONDS * 0.9)
        assert stream.getvalue() == ""
        await trio.sleep(FLUSH_SECONDS * 0.2)
        assert stream.getvalue().count("\n") == 1
        log_access(record())
        nursery.cancel_scope.cancel()
    assert stream.getvalue().count("\n") == 2


async def test_the_flusher_holds_no_deadline_while_nothing_waits(
    autojump_clock: trio.testing.MockClock, restore_logging: None
) -> None:
    """With no line waiting, the flusher waits without a clock, so it never
    keeps trio's deadline heap (and the ended timeouts of past exchanges in
    it) alive; a line starts the clock, its write stops it again."""
    stream = io.StringIO()
    use_access_log_buffer(AccessLogBuffer(stream, max_bytes=1 << 20, json_format=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush_access_log_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
        log_access(record())
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline <= FLUSH_SECONDS
        await trio.sleep(FLUSH_SECONDS * 1.1)
        assert stream.getvalue().count("\n") == 1
        await trio.testing.wait_all_tasks_blocked()
        assert trio.lowlevel.current_statistics().seconds_to_next_deadline == float("inf")
        nursery.cancel_scope.cancel()


async def test_the_command_line_buffers_by_default(tmp_path: Path, restore_logging: None) -> None:
    """With the default flags a line reaches the file when flushed, not before."""
    path = tmp_path / "access.log"
    _cli.configure_logging(settings(["--access-log", str(path)]))
    log_access(record(204))
    assert path.read_text() == ""
    flush_access_log()
    [line] = path.read_text().splitlines()
    assert "status=204" in line


async def test_buffer_0_writes_each_line_at_once(tmp_path: Path, restore_logging: None) -> None:
    """``--access-log-buffer 0`` turns it back to one write per line, through logging."""
    path = tmp_path / "access.log"
    args = ["--access-log", str(path), "--access-log-buffer", "0"]
    _cli.configure_logging(settings(args))
    log_access(record(204))
    [line] = path.read_text().splitlines()
    assert "status=204" in line


async def test_a_reload_writes_the_old_buffer_before_closing_its_file(
    tmp_path: Path, restore_logging: None
) -> None:
    """configure_logging again (SIGHUP) writes the lines still waiting to the
    file they were logged for, then buffers for the new one."""
    old, new = tmp_path / "old.log", tmp_path / "new.log"
    _cli.configure_logging(settings(["--access-log", str(old)]))
    log_access(record(201))
    _cli.configure_logging(settings(["--access-log", str(new)]))
    log_access(record(202))
    assert "status=201" in old.read_text()
    assert new.read_text() == ""
    flush_access_log()
    assert "status=202" in new.read_text()


async def test_the_program_writes_buffered_lines_when_it_stops() -> None:
    """A line still in a large buffer reaches stderr when SIGTERM stops the
    program (exit status 0), without waiting for a flush."""
    origin = GatedOrigin()
    origin.release.set()
    async with trio.open_nursery() as nursery:
        await nursery.start(origin.serve)
        async with proxy_process("--access-log-buffer", "1MiB") as proxy:
            assert await download(proxy.port, origin.port, []) == len(CHUNK) * CHUNKS
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(PROMPTLY):
                assert await proxy.process.wait() == 0
                rest = await proxy.stderr.rest()
        nursery.cancel_scope.cancel()
    [line] = [line for line in rest.splitlines() if "status=" in line]
    assert f"status=200 bytes_in=0 bytes_out={len(CHUNK) * CHUNKS}" in line
