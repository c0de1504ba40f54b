"""Message bodies by splice(2), with h11's framing kept exact on both sides.

A large Content-Length response from a plain-socket upstream to a plain-socket
client moves by ``_splice`` instead of the channel relay. Three things keep
HTTP correct while the bytes bypass h11:

1. What h11 already read. When the response head arrived, h11 may have read
   some body bytes with it (at most one ``read_size``). They are taken out as
   ordinary ``Data`` events, without reading the socket again, and sent to
   the client through h11, so the splice starts exactly where h11 stopped,
   and splices exactly the rest of the declared length. Splicing stops at
   the body's end: bytes after it stay in the socket, unread.

2. The client's framing. h11 frames the response to the client (Content-Length
   as a rule, but chunked or close-delimited if the head it sent says so).
   The spliced part goes through h11 as one ``Data`` whose ``data`` is a
   placeholder of the spliced length: ``send_with_data_passthrough`` returns
   its framing bytes (none for Content-Length) around the placeholder itself,
   which is h11's documented way to send bodies by sendfile and the like
   (h11 docs, "Support for sendfile()"). We write the framing bytes and, at
   the placeholder, splice. h11 counts the bytes, so ``EndOfMessage`` is
   checked against the Content-Length as always, and the client connection
   stays keep-alive when both messages are complete.

3. The upstream's state. h11's reader on the upstream side never sees the
   spliced bytes, so the upstream connection stays in ``SEND_BODY`` for h11:
   it can never be mistaken for a reusable one (a pool must require both
   states ``DONE``). This is the issue's rule: an upstream connection whose
   body was spliced is not reused. It is closed when the exchange ends.

Failures translate as the channel relay's do: a broken upstream is a
``BadGateway``, a broken client is ``ClientGone``; an upstream that closes
before the declared length is a ``BadGateway`` with the client's message left
unfinished (``send_failed``), so the client sees a short body, not a complete
one.

Request bodies (uploads) go the same way in the other direction
(``relay_request_body``): h11's buffered body bytes first, then exactly the
rest of the Content-Length spliced client -> upstream, framed on the upstream
side by ``send_with_data_passthrough``, then ``EndOfMessage``. Two things
differ:

* The client side's h11 is the reader that never sees the bytes, so it stays
  in ``SEND_BODY`` and the client connection cannot be reused. The server
  decides to splice from the request head alone (``request_splice_pipe_size``)
  and sends the response with ``Connection: close``; h11 lets a server
  respond while the request body is still coming, and ends the connection
  after that response.
* The upstream side's h11 counted the spliced bytes, so after the response
  it is ``DONE`` on both sides and would look reusable; ``body_spliced``
  marks it and the pool refuses it.

A client that closes before the declared length is a ``BadRequest`` (400),
as h11 reports a short body on the channel relay; the upstream's message is
left unfinished, so the origin sees its request cut short, never complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import attrs
import h11
import trio

from ._budget import MemoryBudget
from ._config import ProxyConfig
from ._errors import BadGateway, BadRequest, ClientGone
from ._h11_io import ClientEndpoint, H11Endpoint, UpstreamEndpoint
from ._http import upgrade_fields
from ._relay import BufferGauge, PendingBody, Progress, relay_body
from ._splice import SinkBroken, SourceBroken, splice_pipe_size, splice_relay

# Statuses whose responses never have a body (RFC 9110 6.4.1), whatever
# Content-Length says.
_NO_BODY_STATUSES = frozenset({204, 304})


def content_length_body(method: bytes, response: h11.Response) -> int | None:
    """The body length of ``response`` if it is framed by Content-Length, else None.

    None for responses that have no body (to HEAD, 204, 304), for chunked or
    close-delimited ones, and for anything h11 would not frame by one
    Content-Length value.
    """
    if method == b"HEAD" or response.status_code in _NO_BODY_STATUSES:
        return None
    return _content_length(response.headers)


def content_length_request_body(request: h11.Request) -> int | None:
    """The body length of ``request`` if it is framed by Content-Length, else None.

    None for chunked requests, requests without a body, and for an Upgrade
    request: a 101 answer needs h11 to have seen the whole request
    (``their_state`` DONE), which a spliced body never lets it see.
    """
    if upgrade_fields(request.headers.raw_items()):
        return None
    return _content_length(request.headers)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    lengths = [value for name, value in headers if name == b"content-length"]
    if any(name == b"transfer-encoding" for name, _ in headers):
        return None
    if len(lengths) != 1 or not lengths[0].isdigit():
        return None
    return int(lengths[0])


@attrs.frozen
class SplicedBytes:
    """A stand-in for body bytes that go by splice: h11 only asks its ``len``."""

    size: int

    def __len__(self) -> int:
        return self.size


async def relay_response_body(
    upstream: UpstreamEndpoint,
    client: ClientEndpoint,
    request: h11.Request,
    response: h11.Response,
    *,
    config: ProxyConfig,
    gauge: BufferGauge,
    progress: Progress,
    budget: MemoryBudget | None = None,
    first_chunk: PendingBody | None = None,
) -> None:
    """Relay the response body upstream -> client, by splice where it can, then end it.

    Call after the response head has been sent to the client, with
    ``first_chunk`` the body bytes already pulled from h11 and still counted
    on ``gauge`` (``_relay.send_buffered``); they go out first.

    Memory: by splice, zero payload bytes in user space besides what h11
    had already read with the head (at most ``read_size``), and at most the
    pipe's size (``_splice.pipe_size_for``) in the kernel; otherwise the
    channel relay's bound, ``(buffer_chunks + 2) * read_size``.

    Raises:
        BadGateway: the upstream broke or closed before the body's end.
        ClientGone: the client connection broke.
    """
    length = content_length_body(request.method, response)
    pipe_size = splice_pipe_size(config, upstream.stream, client.stream, length)
    if length is None or pipe_size is None:
        await relay_body(
            upstream,
            client,
            buffer_chunks=config.buffer_chunks,
            gauge=gauge,
            progress=progress,
            budget=budget,
            first_chunk=first_chunk,
        )
        return
    sent_first = await _send_first_chunk(client, first_chunk, gauge)
    remaining = length - sent_first - await _forward_buffered_body(upstream, client)
    if remaining:
        await _splice_body(upstream, client, remaining, pipe_size, progress)
    await client.send(h11.EndOfMessage())


async def _send_first_chunk(
    client: ClientEndpoint, first_chunk: PendingBody | None, gauge: BufferGauge
) -> int:
    """Send the bytes ``send_buffered`` pulled; they die with this frame, not
    the splice's. Returns how many."""
    chunk = first_chunk.take() if first_chunk is not None else b""
    if chunk:
        await client.send(h11.Data(data=chunk))
        gauge.remove(len(chunk))
    return len(chunk)


def request_splice_pipe_size(
    client: ClientEndpoint, upstream: UpstreamEndpoint, request: h11.Request, config: ProxyConfig
) -> int | None:
    """The pipe size to splice ``request``'s body client -> upstream with, or
    None for the channel relay (see ``splice_pipe_size``).

    Decided from the request head alone, before the body moves, so the server
    can put ``Connection: close`` on the response of a spliced upload.
    """
    length = content_length_request_body(request)
    if length is None:  # not "no end known" (a tunnel, for splice_pipe_size): no splice
        return None
    return splice_pipe_size(config, client.stream, upstream.stream, length)


async def relay_request_body(
    client: ClientEndpoint,
    upstream: UpstreamEndpoint,
    request: h11.Request,
    *,
    pipe_size: int | None,
    config: ProxyConfig,
    gauge: BufferGauge,
    progress: Progress,
    budget: MemoryBudget | None = None,
) -> None:
    """Relay the request body client -> upstream, by splice if ``pipe_size`` is
    given (from ``request_splice_pipe_size``), then end it.

    By splice, the client connection's h11 never sees the body, so it cannot
    reach ``DONE``: the caller must close the client connection after this
    exchange (and tell the client so with ``Connection: close``). The
    upstream connection is marked ``body_spliced`` and never pooled.

    Memory: by splice, zero payload bytes in user space besides what h11
    had already read with the request head (at most ``read_size``), and at
    most ``pipe_size`` in the kernel; otherwise the channel relay's bound,
    ``(buffer_chunks + 2) * read_size``.

    Raises:
        BadGateway: the upstream broke (it stopped reading the body).
        ClientGone: the client connection broke.
        BadRequest: the client closed before the declared length, as h11
            reports a short body on the channel relay (400, if still answerable).
    """
    length = content_length_request_body(request)
    if length is None or pipe_size is None:
        await relay_body(
            client,
            upstream,
            buffer_chunks=config.buffer_chunks,
            gauge=gauge,
            progress=progress,
            budget=budget,
        )
        return
    remaining = length - await _forward_buffered_body(client, upstream)
    if remaining:
        await _splice_body(client, upstream, remaining, pipe_size, progress)
    await upstream.send(h11.EndOfMessage())


async def _forward_buffered_body(source: H11Endpoint, sink: H11Endpoint) -> int:
    """Send ``sink`` the body bytes ``source``'s h11 already holds; return how many.

    Never reads the source socket: only what h11 has buffered (at most one
    ``read_size``) is turned into events (a closed, empty buffer makes h11
    report the short body: a BadGateway from an upstream, a 400 from a client).
    """
    forwarded = 0
    while source.has_unparsed_data:
        event = await source.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data), event
        await sink.send(h11.Data(data=event.data))
        forwarded += len(event.data)
    return forwarded


async def _splice_body(
    source: H11Endpoint,
    sink: H11Endpoint,
    size: int,
    pipe_size: int,
    progress: Progress,
) -> None:
    """Splice exactly ``size`` body bytes, framed for the sink by its h11.

    Marks both endpoints ``body_spliced``: each carried bytes one of its h11
    sides never saw, so neither connection is reused.
    """
    source.body_spliced = sink.body_spliced = True
    spliced = SplicedBytes(size)
    # h11 types Data.data as bytes but documents any object with a len() for
    # send_with_data_passthrough; it returns that very object in the list.
    parts: list[object] = list(
        sink.conn.send_with_data_passthrough(h11.Data(data=cast(bytes, spliced))) or []
    )
    try:
        for part in parts:
            if part is spliced:
                await _splice_exactly(source, sink, size, pipe_size, progress)
            else:
                await sink.send_framed(cast(bytes, part))  # chunked framing only
    except BaseException:
        sink.conn.send_failed()  # the sink's framing on the wire is unknown
        raise


async def _splice_exactly(
    source: H11Endpoint,
    sink: H11Endpoint,
    size: int,
    pipe_size: int,
    progress: Progress,
) -> None:
    assert isinstance(source.stream, trio.SocketStream), source.stream
    assert isinstance(sink.stream, trio.SocketStream), sink.stream
    try:
        moved = await splice_relay(
            source.stream, sink.stream, max_bytes=size, pipe_size=pipe_size, progress=progress
        )
    except SourceBroken as exc:
        raise _broken(source, exc) from exc
    except SinkBroken as exc:
        raise _broken(sink, exc) from exc
    if moved < size:
        message = f"closed the body after {moved} of {size} spliced bytes"
        if isinstance(source, ClientEndpoint):
            raise BadRequest(f"client {message}")
        raise BadGateway(f"upstream {message}")


def _broken(endpoint: H11Endpoint, exc: trio.BrokenResourceError) -> Exception:
    """A broken side, translated as its endpoint translates stream errors."""
    if isinstance(endpoint, ClientEndpoint):
        return ClientGone(f"client connection lost: {exc.__cause__!r}")
    return BadGateway(f"upstream connection lost: {exc.__cause__!r}")
