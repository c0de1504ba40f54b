"""Errors that end an exchange, each carrying the HTTP status it maps to.

Like h11's ``error_status_hint``, the status travels with the exception, so the
code that finally answers the client needs no table of its own. Errors are
translated at the boundary where they happen (``raise BadGateway(...) from exc``)
and never carry a traceback into the log: they are the peers' misbehaviour, not
ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import trio

# What a broken, reset or already-closed stream raises in trio: every place
# that reads or writes a peer's stream catches exactly these, and translates
# them at that boundary (``_endpoint`` for HTTP, ``_tunnel`` for raw bytes).
STREAM_ERRORS: tuple[type[Exception], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


class ProxyError(Exception):
    """Base class: an exchange cannot go on; the client gets ``status_code``.

    Args:
        message: a short, human-readable reason; it becomes the body of the
            error response, so it must not contain secrets.
    """

    status_code: ClassVar[int] = 500
    reason: ClassVar[bytes] = b"Internal Server Error"
    # Fields the error response must carry besides the usual ones
    # (405: Allow; 407: Proxy-Authenticate).
    response_fields: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProxyError):
    """The client sent something we cannot or will not forward."""

    status_code = 400
    reason = b"Bad Request"


class Forbidden(ProxyError):
    """The request is well-formed but policy refuses it."""

    status_code = 403
    reason = b"Forbidden"


class MethodNotAllowed(ProxyError):
    """The method has no meaning here (CONNECT to a reverse proxy)."""

    status_code = 405
    reason = b"Method Not Allowed"
    # A reverse proxy forwards every method except CONNECT; this lists the
    # standard ones (RFC 9110 9.3, RFC 5789) for the required Allow field.
    response_fields = ((b"Allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH"),)


class ProxyAuthenticationRequired(ProxyError):
    """Proxy credentials are missing or wrong."""

    status_code = 407
    reason = b"Proxy Authentication Required"
    # RFC 9110 11.7.1: a 407 must say which scheme to use.
    response_fields = ((b"Proxy-Authenticate", b'Basic realm="trioproxy"'),)


class NotFound(ProxyError):
    """No route of a reverse proxy matches the request's host and path."""

    status_code = 404
    reason = b"Not Found"


class RequestTimeout(ProxyError):
    """The client did not send its request head in time."""

    status_code = 408
    reason = b"Request Timeout"


class URITooLong(ProxyError):
    """The request line is longer than we accept."""

    status_code = 414
    reason = b"URI Too Long"


class HeadersTooLarge(ProxyError):
    """The request head is larger, or has more fields, than we accept."""

    status_code = 431
    reason = b"Request Header Fields Too Large"


class BadGateway(ProxyError):
    """The upstream could not be reached or broke the protocol."""

    status_code = 502
    reason = b"Bad Gateway"


class GatewayTimeout(ProxyError):
    """The upstream did not connect or answer in time."""

    status_code = 504
    reason = b"Gateway Timeout"


class LoopDetected(ProxyError):
    """The request would come back to this proxy (its own address, or Via)."""

    status_code = 508
    reason = b"Loop Detected"


class ClientGone(Exception):
    """The client closed or reset its connection; nobody is left to answer.

    Not a ProxyError: there is no one to send a status to.
    """


_BY_STATUS: dict[int, type[ProxyError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        Forbidden,
        ProxyAuthenticationRequired,
        RequestTimeout,
        URITooLong,
        HeadersTooLarge,
        BadGateway,
        GatewayTimeout,
        LoopDetected,
    )
}


def error_for_status(status_code: int, message: str) -> ProxyError:
    """Build the ProxyError subclass for ``status_code`` (400 when unknown).

    Used to translate h11's ``error_status_hint`` into our hierarchy.
    """
    return _BY_STATUS.get(status_code, BadRequest)(message)


@contextmanager
def collapse_single_error() -> Iterator[None]:
    """Raise a nursery's lone exception as itself rather than in a group.

    Our nurseries are an implementation detail: callers catch ``ProxyError``,
    not ``ExceptionGroup[ProxyError]``. A group of several errors is raised
    unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
