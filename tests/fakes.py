"""Fakes for serving tests: a listener fed by the test, a handler that holds."""

from __future__ import annotations

import attrs
import trio
import trio.testing

Stream = trio.abc.Stream


@attrs.define(eq=False)
class FakeListener(trio.abc.Listener[Stream]):
    """Hands out the streams the test queues; ``accept`` first raises the
    queued errors. Counts accept calls and records whether it was closed."""

    errors: list[OSError] = attrs.Factory(list)
    accepts: int = 0
    closed: bool = False
    _send: trio.MemorySendChannel[Stream] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Stream] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Stream](100)

    def connect(self) -> Stream:
        """Queue a new connection; return the client's end."""
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server)
        return client

    async def accept(self) -> Stream:
        self.accepts += 1
        if self.errors:
            await trio.lowlevel.checkpoint()
            raise self.errors.pop(0)
        return await self._receive.receive()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@attrs.define
class HeldConnections:
    """A handler that keeps each connection until the test releases it."""

    served: list[Stream] = attrs.Factory(list)
    releases: list[trio.Event] = attrs.Factory(list)
    active: int = 0
    most_active: int = 0
    _arrived: trio.Event = attrs.Factory(trio.Event)

    async def wait_for(self, count: int) -> None:
        """Wait until ``count`` connections have been served in total."""
        while len(self.served) < count:
            await self._arrived.wait()

    async def handle(self, stream: Stream) -> None:
        release = trio.Event()
        self.served.append(stream)
        self.releases.append(release)
        self._arrived.set()
        self._arrived = trio.Event()
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await release.wait()
        finally:
            self.active -= 1
