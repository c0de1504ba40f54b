"""Request head validation against smuggling and oversized heads, sans-I/O.

Why a second look at bytes that h11 parses anyway: request smuggling lives in
the gap between two parsers that read the same bytes differently. h11 0.16 is
strict about much (request-line grammar, field-name tokens, NUL and whitespace
in values, ``Transfer-Encoding`` other than exactly ``chunked``, several
Transfer-Encoding fields, a Content-Length that is not digits or whose copies
disagree, a missing or repeated Host, malformed chunk headers and chunk data
without its CRLF) but tolerant where a proxy must not be:

* it accepts Content-Length together with Transfer-Encoding (chunked wins);
* it accepts Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1 says to
  treat that framing as faulty);
* it merges repeated identical Content-Length fields, and a list value such as
  ``5, 5``, into one; after that ``Request.headers.raw_items()`` shows a single
  clean field, so the evidence is gone from the parsed view;
* it unfolds obs-fold continuation lines into the previous value, again
  leaving no trace in the parsed view;
* it accepts a bare LF as a line end (and ends the head at ``\\n\\r?\\n``);
* it accepts control characters other than NUL, TAB, CR, LF, VT and FF in
  field values (``[^\\x00\\s]``), and DEL;
* it has no limit on the number of fields, and counts the request line inside
  its one size limit, so an over-long target gets 431 rather than 414.

So ``RequestHeadGuard`` reads the raw bytes of each request head *before* h11
does and refuses, with the status to answer, anything ambiguous: every line
must end in CRLF with no other CR or LF, no line may start with whitespace
(obs-fold), names must be tokens, values must be free of control characters,
Content-Length must be one field of digits, Transfer-Encoding one field whose
value is exactly ``chunked`` (and only in HTTP/1.1, and never next to a
Content-Length), and there must be exactly one Host in HTTP/1.1 and at most
one in HTTP/1.0. Lines are checked as they complete, so limits fire while the
head is still arriving: the request line against ``max_target_length`` (414),
the number of fields (431), the head size (431).

Because the guard rejects every LF not preceded by CR, the end of an accepted
head (the first empty line) is exactly where h11 ends it, so the two parsers
agree on what the head is; the guard only ever adds refusals.

The usual head, short and plain, comes whole in one read. For it the guard
first tries ``_plain_head``: one regular expression over the whole head that
accepts only what the line-by-line checks accept (the same token, target,
version and value byte classes, CRLF line ends, no empty line before the
end), then the limits and the framing fields as above. Anything it does not
accept, or a head that arrives in pieces, goes through the lines one by one,
which say what is wrong; so the shortcut changes no verdict and no message,
only the cost of a clean head (issue #14: a curl head took 6.7 µs through
the lines, 2.2 µs through the shortcut). ``tests/test_framing.py`` checks
that both ways give the same verdict on thousands of flawed heads.

The body is left to h11, which re-frames it for the upstream: chunk sizes must
be 1 to 20 hex digits, and chunk data must be followed by CRLF. h11 tolerates
whitespace after the chunk size and any bytes but LF in a chunk extension; it
discards extensions, so neither reaches the upstream.
"""

from __future__ import annotations

import re

import attrs

from ._errors import BadRequest, HeadersTooLarge, URITooLong

# Bytes of a request line besides the target: the longest method we know of
# (UPDATEREDIRECTREF, 17) rounded up, two spaces, "HTTP/1.1" and CRLF. An
# unfinished request line longer than max_target_length plus this can only
# hold an over-long target (or an absurd method), so it gets 414 early.
REQUEST_LINE_SLACK = 64

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]"
_TOKEN = re.compile(_TCHAR + rb"+")
# Control characters other than HTAB, and DEL (RFC 9110 5.5: field values are
# VCHAR, obs-text, SP and HTAB). CR and LF are handled as line structure.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+")
_OWS = b" \t"
_HTTP_VERSION = re.compile(rb"HTTP/([0-9]\.[0-9])")
# A whole head in the byte classes the line checks allow: request line
# (method token, a target of visible bytes and obs-text, the version), field
# lines (token, colon, value bytes other than controls), the empty line.
# No class admits CR or LF, so every line ends in CRLF and the head ends at
# its first empty line, as the line checks read it.
_PLAIN_HEAD = re.compile(
    rb"(?:" + _TCHAR + rb"+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9]\.[0-9])\r\n"
    rb"(?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n"
)
# The fields the framing checks count, in a head _PLAIN_HEAD accepted (where
# every CRLF ends a line, so the name after one starts a field line).
_FRAMING_FIELD = re.compile(rb"\r\n(host|content-length|transfer-encoding):([^\r]*)", re.I)


@attrs.frozen(kw_only=True)
class HeadLimits:
    """Limits on one request head.

    Attributes:
        max_head_size: bytes of the whole head, request line included (431).
        max_header_fields: number of field lines (431).
        max_target_length: bytes of the request target (414).
    """

    max_head_size: int
    max_header_fields: int
    max_target_length: int


@attrs.define
class _HeadSummary:
    """What the guard remembers of the fields seen so far (bounded counts)."""

    http_version: bytes = b""
    fields: int = 0
    hosts: int = 0
    content_lengths: list[bytes] = attrs.Factory(list)
    transfer_encodings: list[bytes] = attrs.Factory(list)


class RequestHeadGuard:
    """Check one raw request head as its bytes arrive; raise on anything ambiguous.

    Feed it every byte the client sends from the start of a request head; it
    consumes up to the empty line that ends the head and then reports
    ``done``; the rest of each chunk (body, next request) is ignored.

    Memory: holds only the current unfinished line, at most
    ``max(max_head_size, max_target_length + REQUEST_LINE_SLACK)`` bytes plus
    one fed chunk; the field summary keeps at most a few values per field
    name, each bounded by the head size, and the field count is capped.

    Args:
        limits: the size, count and target limits.
    """

    def __init__(self, limits: HeadLimits) -> None:
        self._limits = limits
        self._partial = bytearray()
        self._seen = 0  # head bytes consumed, complete lines only
        self._lines = 0
        self._summary = _HeadSummary()
        self.done = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: the unfinished line (see the memory bound above)."""
        return len(self._partial)

    def feed(self, data: bytes) -> None:
        """Check ``data``, the next bytes of the stream, as far as the head goes.

        Raises:
            BadRequest: malformed or ambiguous head (400).
            URITooLong: the request target is over ``max_target_length`` (414).
            HeadersTooLarge: too many fields or too many bytes (431).
        """
        if self._lines == 0 and not self._partial and self._plain_head(data):
            return
        start = 0
        while not self.done and start < len(data):
            end = data.find(b"\n", start)
            if end == -1:
                self._partial += data[start:]
                self._check_unfinished_line()
                return
            if self._partial:
                self._partial += data[start : end + 1]
                line = bytes(self._partial)
                self._partial.clear()
            else:  # the usual case, a whole line in one chunk: no copy through _partial
                line = data[start : end + 1]
            start = end + 1
            self._seen += len(line)
            self._check_line(line)
            self._check_size(0)

    def _plain_head(self, data: bytes) -> bool:
        """Check a whole head at the start of ``data`` at once, if it is plain
        and within the limits; False (nothing consumed) sends it through the
        line checks, which name what is wrong (see the module comment).

        Raises:
            BadRequest: the framing fields are ambiguous (as ``_check_framing``).
        """
        end = data.find(b"\r\n\r\n")
        if end == -1:
            return False
        head = data[: end + 4]
        match = _PLAIN_HEAD.fullmatch(head)
        if match is None:
            return False
        limits = self._limits
        lines = head.count(b"\r\n")
        if (
            len(head) > limits.max_head_size
            or lines - 2 > limits.max_header_fields
            or len(match.group(1)) > limits.max_target_length
        ):
            return False
        summary = self._summary
        summary.http_version = match.group(2)
        summary.fields = lines - 2
        for name, value in _FRAMING_FIELD.findall(head):
            _remember(summary, name.lower(), value.strip(_OWS))
        self._seen, self._lines, self.done = len(head), lines, True
        _check_framing(summary)
        return True

    def _check_unfinished_line(self) -> None:
        if self._lines == 0:
            limit = self._limits.max_target_length + REQUEST_LINE_SLACK
            if len(self._partial) > limit:
                raise URITooLong(
                    f"the request line is over {limit} bytes without ending "
                    f"(request targets are limited to {self._limits.max_target_length})"
                )
        self._check_size(len(self._partial))

    def _check_size(self, unfinished: int) -> None:
        size = self._seen + unfinished
        if size > self._limits.max_head_size:
            raise HeadersTooLarge(f"the request head is over {self._limits.max_head_size} bytes")

    def _check_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise BadRequest("a line of the request head ends in a bare LF")
        content = line[:-2]
        if b"\r" in content:
            raise BadRequest("a bare CR in the request head")
        if self._lines == 0:
            self._summary.http_version = check_request_line(content, self._limits)
        elif not content:
            self.done = True
            _check_framing(self._summary)
        else:
            self._summary.fields += 1
            if self._summary.fields > self._limits.max_header_fields:
                raise HeadersTooLarge(
                    f"the request has more than {self._limits.max_header_fields} header fields"
                )
            name, value = split_field_line(content)
            _remember(self._summary, name.lower(), value)
        self._lines += 1


def check_request_line(line: bytes, limits: HeadLimits) -> bytes:
    """Check ``METHOD SP target SP HTTP/x.y`` (without CRLF); return the version.

    Raises:
        BadRequest: empty line, wrong number of spaces, bad method or version.
        URITooLong: the target is longer than ``limits.max_target_length``.
    """
    if not line:
        raise BadRequest("the request line is empty")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("the request line must be METHOD SP target SP HTTP-version")
    method, target, version = parts
    if len(target) > limits.max_target_length:
        raise URITooLong(
            f"the request target is {len(target)} bytes; the limit is {limits.max_target_length}"
        )
    if not _TOKEN.fullmatch(method):
        raise BadRequest("the request method is not a token")
    if not target or _CONTROL.search(target) or b"\t" in target:
        raise BadRequest("the request target is empty or has control characters")
    match = _HTTP_VERSION.fullmatch(version)
    if match is None:
        raise BadRequest("the request line does not end with HTTP/x.y")
    return match.group(1)


def split_field_line(line: bytes) -> tuple[bytes, bytes]:
    """Split ``name: value`` (without CRLF) and check both; OWS is stripped.

    Raises:
        BadRequest: obs-fold (leading whitespace), a name that is not a token
            (including whitespace before the colon), or control characters.
    """
    if line[:1] in (b" ", b"\t"):
        raise BadRequest("obs-fold (a header line starting with whitespace) is not accepted")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise BadRequest("a header field name is not a token")
    if _CONTROL.search(value):
        raise BadRequest(f"control characters in the {_show(name)} field")
    return name, value.strip(_OWS)


def _remember(summary: _HeadSummary, name: bytes, value: bytes) -> None:
    # Each list is checked to hold one value, so more than two never matter.
    if name == b"host":
        summary.hosts += 1
    elif name == b"content-length" and len(summary.content_lengths) < 2:
        summary.content_lengths.append(value)
    elif name == b"transfer-encoding" and len(summary.transfer_encodings) < 2:
        summary.transfer_encodings.append(value)


def _check_framing(summary: _HeadSummary) -> None:
    """Refuse every head whose body length two parsers could read differently.

    Raises:
        BadRequest: see the module comment for the cases.
    """
    lengths, codings = summary.content_lengths, summary.transfer_encodings
    if lengths and codings:
        raise BadRequest("Content-Length together with Transfer-Encoding")
    if len(lengths) > 1:
        raise BadRequest("more than one Content-Length field")
    if lengths and not _DIGITS.fullmatch(lengths[0]):
        raise BadRequest("Content-Length is not a decimal number")
    if len(codings) > 1:
        raise BadRequest("more than one Transfer-Encoding field")
    if codings and codings[0].lower() != b"chunked":
        raise BadRequest("Transfer-Encoding must be exactly 'chunked'")
    if codings and summary.http_version != b"1.1":
        raise BadRequest(f"Transfer-Encoding in an HTTP/{summary.http_version.decode()} request")
    if summary.hosts > 1:
        raise BadRequest("more than one Host field")
    if summary.hosts == 0 and summary.http_version == b"1.1":
        raise BadRequest("an HTTP/1.1 request without a Host field")


def check_request_head(head: bytes, limits: HeadLimits) -> None:
    """Check a whole raw head at once (for tests and embedders).

    Raises:
        ProxyError: as ``RequestHeadGuard.feed``; BadRequest if ``head`` does
            not end with the empty line.
    """
    guard = RequestHeadGuard(limits)
    guard.feed(head)
    if not guard.done:
        raise BadRequest("the request head is unfinished")


def _show(name: bytes) -> str:
    return name.decode("ascii", "replace")
