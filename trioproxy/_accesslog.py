"""The access log: one line per request, on the ``trioproxy.access`` logger.

Each exchange fills an ``AccessRecord`` as it goes (request line, upstream,
status, body byte counters) and ``logged_exchange`` emits it once when the
exchange ends, however it ends: answered, refused with an error status,
aborted, left by the client, or cancelled by shutdown. Expected peer
misbehaviour becomes a ``reason`` on that one line, never a traceback.

The message is a logfmt-style line (``key=value``, strings JSON-quoted),
readable by people and by ``grep``; the fields also travel on the log record
as ``record.access`` (a dict), which ``JsonFormatter`` turns into one JSON
object per line for log collectors.

Durations use trio's clock, counted from the first byte of the request head,
as nginx's ``$request_time``.

**The buffered access log** (``--access-log-buffer``, the command line's
default), like nginx's ``access_log ... buffer= flush=``: a line handed to
``logging`` costs a LogRecord, a handler lock, a format and a write(2), about
a tenth of a small request's CPU (scripts/BENCH.md). With an
``AccessLogBuffer`` installed (``use_access_log_buffer``), ``log_access``
formats the line itself, exactly as the handler's formatter would, and
appends it to the buffer:

* Bound: at most ``max_bytes`` of lines wait; the line that reaches it sends
  them all. ``flush_access_log_forever`` (run by the command line beside the
  server) writes them at least every ``FLUSH_SECONDS``, and once more when it
  is cancelled, which is how the server's shutdown ends.
* Loss window: a crash that skips Python's unwinding (SIGKILL, the OOM
  killer, a segfault) loses the lines of the last ``FLUSH_SECONDS`` at most,
  and at most ``max_bytes`` of them. Per-line logging loses none.
* Writes are whole lines, at most ``PIPE_BUF`` bytes each, so the lines of
  several ``--workers`` sharing one pipe (stderr) never interleave mid-line.
"""

from __future__ import annotations

import functools
import json
import logging
import select
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, TextIO

import attrs
import h11
import trio

from ._errors import ClientGone, ProxyError
from ._relay import Progress

access_logger = logging.getLogger("trioproxy.access")
logger = logging.getLogger("trioproxy")

# The longest request target written to the log, in characters; longer ones
# are cut and marked. A target may be as long as a request head (64 KiB by
# default): one request must not be able to write that much per log line.
MAX_LOGGED_TARGET = 1000

# The longest a buffered line waits: nginx's flush= for its access_log buffer
# is commonly 1 to 5 s; 1 s keeps `tail -f` live enough to watch.
FLUSH_SECONDS = 1.0
# The most bytes one write(2) of the buffer carries: POSIX makes a pipe write
# of at most PIPE_BUF bytes atomic, so workers' lines on one pipe never
# interleave. (512 is POSIX's minimum, where select does not say.)
WRITE_LIMIT: int = getattr(select, "PIPE_BUF", 512)


@attrs.define
class AccessRecord:
    """What is known about one exchange, filled in as it goes.

    Attributes:
        client: the client's address, or None for non-IP streams.
        started: ``trio.current_time()`` at the first byte of the request.
        method: the request method, once the head is read.
        target: the request target as sent, once the head is read.
        upstream: ``host:port`` of the upstream (in reverse mode, the server
            of the group), once chosen.
        group: the upstream group the route chose; None in forward mode.
        status: the status sent to the client (or that was being sent when
            the response was aborted); None if no response began.
        reason: why the exchange failed; None for a success.
        request_body: the request body pump's progress (bytes read = in).
        response_body: the response body pump's progress (bytes written = out).
        enabled: False for a connection that ended before a request.
        ended: how a tunnel (CONNECT, 101) ended; None for other exchanges.
        client_tls: the client's connection is TLS.
        upstream_tls: the connection to the upstream is TLS.
    """

    client: str | None
    started: float
    method: str | None = None
    target: str | None = None
    upstream: str | None = None
    group: str | None = None
    status: int | None = None
    reason: str | None = None
    request_body: Progress = attrs.Factory(Progress)
    response_body: Progress = attrs.Factory(Progress)
    enabled: bool = True
    ended: str | None = None
    client_tls: bool = False
    upstream_tls: bool = False

    def set_request(self, request: h11.Request) -> None:
        self.method = request.method.decode("ascii", "backslashreplace")
        self.target = _shorten(request.target.decode("ascii", "backslashreplace"))

    def set_upstream(self, host: str, port: int, *, tls: bool = False) -> None:
        self.upstream = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.upstream_tls = tls

    def set_error(self, error: ProxyError, *, answered: bool) -> None:
        """Record ``error``; ``answered`` is True when it gets its own response."""
        if answered:
            self.status = error.status_code
            self.reason = error.message
        else:
            self.reason = f"response aborted: {error.message}"

    def set_tunnel(
        self, *, bytes_up: int, bytes_down: int, ended: str, error: str | None = None
    ) -> None:
        """Record what a tunnel carried (client to upstream is ``bytes_in``),
        how it ended, and the stream error that broke it off, if one did."""
        self.request_body.bytes_read += bytes_up
        self.response_body.bytes_written += bytes_down
        self.ended = ended
        if error is not None:
            self.reason = f"tunnel broken: {error}"

    def fields(self, now: float) -> dict[str, Any]:
        """The log fields, in order, with the duration up to ``now``.

        ``tls`` (``client``, ``upstream`` or ``client,upstream``) is there
        only when a leg is TLS, so plain exchanges log as they always did.
        """
        fields = {
            "client": self.client,
            "method": self.method,
            "target": self.target,
            "status": self.status,
            "bytes_in": self.request_body.bytes_read,
            "bytes_out": self.response_body.bytes_written,
            "duration": round(now - self.started, 6),
            "upstream": self.upstream,
            "group": self.group,
        }
        if self.client_tls or self.upstream_tls:
            legs = ("client",) * self.client_tls + ("upstream",) * self.upstream_tls
            fields["tls"] = ",".join(legs)
        fields["ended"] = self.ended
        fields["reason"] = self.reason
        return fields


def _shorten(text: str) -> str:
    if len(text) <= MAX_LOGGED_TARGET:
        return text
    return text[:MAX_LOGGED_TARGET] + "..."


def format_text(fields: dict[str, Any]) -> str:
    """``client=... method=... target="..." status=200 ...``; None shows as ``-``."""
    parts = []
    for key, value in fields.items():
        if key in ("group", "reason", "ended") and value is None:
            continue
        if value is None:
            shown = "-"
        elif isinstance(value, str) and key in ("target", "reason", "ended"):
            shown = json.dumps(value)
        else:
            shown = str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def logged_exchange(client: str | None) -> LoggedExchange:
    """A block that yields a fresh record and logs it once when it ends, however it ends.

    Error handling: never swallows an exception. ``ClientGone`` and other
    errors only add a reason; cancellation (shutdown) is logged as such.
    """
    return LoggedExchange(AccessRecord(client=client, started=trio.current_time()))


class LoggedExchange:
    """The context manager of ``logged_exchange``.

    A plain class rather than a ``@contextmanager`` generator: it is entered
    once per request, and a generator's setup and teardown showed up in the
    per-request profile.
    """

    __slots__ = ("record",)

    def __init__(self, record: AccessRecord) -> None:
        self.record = record

    def __enter__(self) -> AccessRecord:
        return self.record

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        record = self.record
        if exc is not None:
            if isinstance(exc, ClientGone):
                record.reason = f"client gone: {exc}"
            elif isinstance(exc, Exception):
                record.reason = f"internal error: {type(exc).__name__}"
        if record.enabled:
            if record.reason is None and exc is not None:
                record.reason = "cancelled"
            log_access(record)


def log_access(record: AccessRecord) -> None:
    """Emit ``record`` on ``trioproxy.access`` at info level, or into the
    installed ``AccessLogBuffer``."""
    buffer = _buffer
    if buffer is not None:
        buffer.append(record.fields(trio.current_time()))
        _lines_waiting.set()
        return
    if not access_logger.isEnabledFor(logging.INFO):
        return
    fields = record.fields(trio.current_time())
    access_logger.info("%s", format_text(fields), extra={"access": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, and the message's fields.

    Access records contribute their fields (``record.access``); other records
    contribute ``message`` (and ``exception`` text when there is one).
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _utc_stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            data.update(access)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


# --- The buffered access log -------------------------------------------------


class AccessLogBuffer:
    """Access lines waiting to be written to ``stream`` together.

    Lines are formatted as the command line's per-line handler formats them:
    ``%(asctime)s %(message)s``, or ``JsonFormatter``'s object with
    ``json_format``.

    Memory: at most ``max_bytes`` of lines (ASCII: one byte a character),
    plus one line over it until the write it triggers.

    Args:
        stream: the open access log (a file, or stderr).
        max_bytes: lines that may wait before they are written at once.
        json_format: one JSON object per line instead of the text line.
    """

    def __init__(self, stream: TextIO, *, max_bytes: int, json_format: bool) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._json = json_format
        self._lines: list[str] = []
        self._size = 0

    def append(self, fields: dict[str, Any]) -> None:
        """Format one exchange's line now; write the lines if they reach the bound."""
        line = access_line(fields, time.time(), json_format=self._json)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write every waiting line. A failed write drops them and says so once
        on the diagnostic log, as ``logging`` reports a handler's failure."""
        lines, self._lines, self._size = self._lines, [], 0
        try:
            for batch in _batches(lines, WRITE_LIMIT):
                self._stream.write(batch)
                self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            logger.warning("could not write %d access log lines: %s", len(lines), exc)


def _batches(lines: list[str], limit: int) -> Iterator[str]:
    """Whole lines joined into strings of at most ``limit`` characters (a
    longer line alone)."""
    start = size = 0
    for index, line in enumerate(lines):
        if size and size + len(line) > limit:
            yield "".join(lines[start:index])
            start, size = index, 0
        size += len(line)
    if size:
        yield "".join(lines[start:])


def access_line(fields: dict[str, Any], created: float, *, json_format: bool) -> str:
    """The line the command line's handler writes for ``fields`` logged at
    ``created`` (``time.time()``), newline included."""
    if json_format:
        data = {"time": _utc_stamp(created), "level": "info", "logger": access_logger.name}
        data.update(fields)
        return json.dumps(data) + "\n"
    return f"{_local_stamp(created)} {format_text(fields)}\n"


def _milliseconds(created: float) -> int:
    return int((created - int(created)) * 1000)  # as logging.LogRecord.msecs


@functools.lru_cache(maxsize=2)
def _local_second(second: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))


def _local_stamp(created: float) -> str:
    """``logging.Formatter``'s default asctime: ``2026-11-29 20:19:20,123``."""
    return f"{_local_second(int(created))},{_milliseconds(created):03d}"


@functools.lru_cache(maxsize=2)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _utc_stamp(created: float) -> str:
    """``JsonFormatter``'s time: ``2026-11-29T20:19:20.123Z``."""
    return f"{_utc_second(int(created))}.{_milliseconds(created):03d}Z"


_buffer: AccessLogBuffer | None = None
# Set once a line waits in the buffer; the flusher replaces it when it writes.
_lines_waiting = trio.Event()


def use_access_log_buffer(buffer: AccessLogBuffer | None) -> None:
    """Send access lines to ``buffer`` from now on (None: to ``logging``, per
    line); the lines of the previous buffer are written first."""
    global _buffer, _lines_waiting
    flush_access_log()
    _buffer = buffer
    # The new buffer is empty. A flusher waiting on the old event wakes once
    # and then waits on the new one.
    previous, _lines_waiting = _lines_waiting, trio.Event()
    previous.set()


def flush_access_log() -> None:
    """Write the installed buffer's waiting lines, if a buffer is installed."""
    if _buffer is not None:
        _buffer.flush()


async def flush_access_log_forever() -> None:
    """Write the buffer's lines at most ``FLUSH_SECONDS`` after the first of
    them came, until cancelled, then once more.

    While no line waits, nothing waits on a clock: an idle proxy's only
    periodic wakeup stays the heap trimmer's. That is for memory, not just for
    wakeups. Every exchange's timeouts are cancel scopes that end before their
    deadline, and trio drops such an entry from its deadline heap only when it
    reaches the top, which a sleeper with an earlier deadline prevents: a
    flusher that slept every second kept ~600 of them (and the heap pages
    under them) alive after 200 connections, 3.4 MiB that the trim could not
    return (scripts/stress.py, docs/memory.md).
    """
    global _lines_waiting
    try:
        while True:
            await _lines_waiting.wait()
            await trio.sleep(FLUSH_SECONDS)
            _lines_waiting = trio.Event()  # before the write: later lines set it again
            flush_access_log()
    finally:
        flush_access_log()
