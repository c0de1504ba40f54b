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
"""

from __future__ import annotations

import json
import logging
import time
from types import TracebackType
from typing import Any

import attrs
import h11
import trio

from ._errors import ClientGone, ProxyError
from ._relay import Progress

access_logger = logging.getLogger("trioproxy.access")

# The longest request target written to the log, in characters; longer ones
# are cut and marked. A target may be as long as a request head (64 KiB by
# default): one request must not be able to write that much per log line.
MAX_LOGGED_TARGET = 1000


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
    """Emit ``record`` on ``trioproxy.access`` at info level."""
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
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
