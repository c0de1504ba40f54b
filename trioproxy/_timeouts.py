"""The clocks of a client connection between exchanges: idle and request head.

Two clocks guard a connection while no exchange runs, each against a
different way of holding it:

* Idle (``idle_timeout``): a keep-alive connection waits for the first byte
  of its next request. Past the deadline it is closed silently, like nginx:
  nobody asked anything, so there is nobody to answer.
* Head (``header_timeout``): from the first byte of a request head (on a new
  connection: from the accept, so a connection that sends nothing is cut as
  soon as one that trickles) to its end. The deadline is fixed when it
  starts; bytes that trickle in never extend it, so a slowloris client holds
  a connection for ``header_timeout`` at most. Past it: 408 with
  ``Connection: close``, or a silent close if not a byte came.

The third clock, for bodies and tunnels once an exchange runs, is the stall
watchdog of ``_watchdog``; the upstream's clocks (connect, response head) are
the exchange's.
"""

from __future__ import annotations

import h11
import trio

from ._config import ProxyConfig
from ._endpoint import ClientEndpoint
from ._errors import RequestTimeout
from ._shutdown import Shutdown


async def wait_for_request(
    client: ClientEndpoint, config: ProxyConfig, shutdown: Shutdown, *, first: bool
) -> float | None:
    """Wait for the first byte (or EOF) of the client's next request head.

    Args:
        client: the client endpoint.
        config: gives ``idle_timeout`` and ``header_timeout``.
        shutdown: a draining server cuts the wait at once.
        first: True for the first request of a new connection.

    Returns:
        The deadline (``trio.current_time()`` scale) for the whole head, or
        None when the connection should close silently (idle, or draining).

    Raises:
        ClientGone: if the connection breaks while waiting.
    """
    now = trio.current_time()
    if client.has_unparsed_data:  # a pipelined request, or EOF, is already here
        return now + config.header_timeout
    if first:
        deadline = now + config.header_timeout
        wait = config.header_timeout
    else:
        deadline = None
        wait = config.idle_timeout
    with shutdown.idle_wait(now + wait):  # one scope: shutdown and the wait's timeout
        await client.receive_once()
        return deadline if deadline is not None else trio.current_time() + config.header_timeout
    return None


async def read_request_head(
    client: ClientEndpoint, config: ProxyConfig, deadline: float
) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
    """Read events until the request head is complete, by ``deadline``.

    Returns:
        h11's next event: a ``Request``, or ``ConnectionClosed``.

    Raises:
        RequestTimeout: when ``deadline`` passes first.
        ProxyError or ClientGone: as the client endpoint translates them.
    """
    # The usual head came whole with the read that ended the idle wait: parse
    # it without entering a cancel scope, which costs more than the parse of
    # a short head (issue 5, CPU per request). Only a head still arriving
    # waits, under the deadline.
    event = client.next_event_nowait()
    if event is not h11.NEED_DATA:
        return event
    with trio.move_on_at(deadline):
        return await client.next_event()
    raise RequestTimeout(f"the request head took over {config.header_timeout:g} s")
