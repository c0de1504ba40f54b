"""The global memory budget: one byte count shared by every pump.

Each pump's channel bounds what one direction of one exchange holds; the
budget bounds what all of them hold together, so RSS has a ceiling however
many slow clients there are. A pump's reader reserves ``read_size`` bytes
*before* it reads (so the bytes a read returns are always already counted),
gives back the unused part right after the read, and the writer gives back
the rest after writing the chunk. When the budget is spent, readers wait:
backpressure across connections, and no connection is ever reset for it.

Why not ``trio.Semaphore`` or ``trio.CapacityLimiter``: they count tokens,
and a reservation is a number of bytes. ``MemoryBudget`` is a byte-count
semaphore with a FIFO queue of waiters, plus one fairness rule.

Fairness. Stalled clients (lockstep, never reading) would, under plain FIFO,
each fill their channel from the budget until it is gone, and then a fresh
connection would wait for ever behind them. So reservations come in two
classes, decided when they are granted:

* a *first* reservation is one by a pump that holds nothing right now. It is
  granted whenever it fits, in FIFO order among first reservations (a large
  one is never overtaken by smaller ones, so none starves).
* a *further* reservation is one by a pump that already holds bytes (it wants
  to read ahead of its writer). It is granted only while no first
  reservation waits and if, after it, at least ``reserve`` bytes stay free.

Read-ahead therefore never eats into the last ``reserve`` bytes (half the
budget by default); those serve single chunks. A pump that is stalled holds
at most one first chunk plus what it read ahead while there was room; a
fresh connection still moves as long as fewer than ``reserve // read_size``
pumps sit stalled on a first chunk. Past that, it waits its turn in FIFO
order, and gets it as soon as any stalled client reads or leaves.

Deadlock: a writer never takes anything from the budget, it only gives back,
so a pump with chunks in its channel can always drain; the only thing a
waiting reader waits for is some writer somewhere finishing a write (or a
pump ending, which returns everything it held: ``BudgetAccount.close``).
"""

from __future__ import annotations

from collections import deque

import attrs
import trio

# The share kept for first reservations. Half: read-ahead (which only buys
# smoothness) may use one half, the other half guarantees that stalled
# connections cannot take the last bytes a new connection needs to start.
DEFAULT_RESERVE_FRACTION = 0.5


@attrs.frozen
class BudgetStatistics:
    """The budget at one moment.

    Attributes:
        capacity: the budget, in bytes.
        held: bytes reserved right now (never above ``capacity``).
        peak: the most ever reserved at once.
        waiting: readers queued for a reservation.
        waits: reservations that had to queue, in total.
        wait_seconds: time spent queued, in total (trio's clock).
    """

    capacity: int
    held: int
    peak: int
    waiting: int
    waits: int
    wait_seconds: float


@attrs.define(eq=False)
class _Waiter:
    account: BudgetAccount
    size: int
    granted: trio.Event = attrs.Factory(trio.Event)


class MemoryBudget:
    """A byte-count semaphore with FIFO waiters and a reserve for first chunks.

    Memory: the bytes it accounts for never exceed ``capacity``; the queue
    holds at most one waiter per open account (one reader per pump).

    Args:
        capacity: the budget in bytes; every single reservation must fit in it.
        reserve: bytes that read-ahead reservations leave free (default: half
            the capacity); 0 makes it a plain FIFO byte semaphore.

    Raises:
        ValueError: if ``capacity`` < 1 or ``reserve`` is not within it.
    """

    def __init__(self, capacity: int, *, reserve: int | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 byte, got {capacity}")
        if reserve is None:
            reserve = int(capacity * DEFAULT_RESERVE_FRACTION)
        if not 0 <= reserve < capacity:
            raise ValueError(f"reserve must be in [0, {capacity}), got {reserve}")
        self.capacity = capacity
        self.reserve = reserve
        self._held = 0
        self._peak = 0
        self._first: deque[_Waiter] = deque()
        self._further: deque[_Waiter] = deque()
        self._waits = 0
        self._wait_seconds = 0.0

    def open_account(self) -> BudgetAccount:
        """A new account for one pump; ``close`` it to return what it holds."""
        return BudgetAccount(self)

    def statistics(self) -> BudgetStatistics:
        """The budget's counters at this moment."""
        return BudgetStatistics(
            capacity=self.capacity,
            held=self._held,
            peak=self._peak,
            waiting=len(self._first) + len(self._further),
            waits=self._waits,
            wait_seconds=self._wait_seconds,
        )

    @property
    def free(self) -> int:
        return self.capacity - self._held

    async def _acquire(self, account: BudgetAccount, size: int) -> None:
        if size > self.capacity:
            raise ValueError(f"cannot reserve {size} bytes from a budget of {self.capacity}")
        await trio.lowlevel.checkpoint_if_cancelled()
        waiter = _Waiter(account, size)
        (self._further if account.held else self._first).append(waiter)
        account.waiter = waiter
        self._grant_waiters()
        if waiter.granted.is_set():
            account.waiter = None
            # Still a schedule point, but one that cannot undo the grant.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._waits += 1
        started = trio.current_time()
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self._release(account, size)  # granted, but nobody will use it
            else:
                self._forget(waiter)
            raise
        finally:
            self._wait_seconds += trio.current_time() - started
            account.waiter = None

    def _grant_now(self, account: BudgetAccount, size: int) -> bool:
        """Grant ``size`` at once if a queued request would be granted at once
        too: nobody waits ahead of it and it fits its class's rule. Else False."""
        if account.waiter is not None or size > self.capacity:
            return False
        if account.held:  # a further reservation: behind every waiter, above the reserve
            if self._first or self._further or size + self.reserve > self.free:
                return False
        elif self._first or size > self.free:  # a first one: behind first waiters only
            return False
        account.held += size
        self._held += size
        self._peak = max(self._peak, self._held)
        return True

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._further if waiter in self._further else self._first
        queue.remove(waiter)
        waiter.account.waiter = None
        self._grant_waiters()  # it may have been the head that blocked the rest

    def _release(self, account: BudgetAccount, size: int) -> None:
        if not 0 <= size <= account.held:
            raise ValueError(f"cannot release {size} bytes, the account holds {account.held}")
        account.held -= size
        self._held -= size
        waiter = account.waiter
        if account.held == 0 and waiter is not None and waiter in self._further:
            # Its pump holds nothing now: the reservation became a first one.
            self._further.remove(waiter)
            self._first.append(waiter)
        self._grant_waiters()

    def _grant_waiters(self) -> None:
        while True:
            if self._first:
                waiter = self._first[0]
                if waiter.size > self.free:
                    return  # FIFO: nobody overtakes the head
                self._first.popleft()
            elif self._further:
                waiter = self._further[0]
                if waiter.size + self.reserve > self.free:
                    return
                self._further.popleft()
            else:
                return
            self._grant(waiter)

    def _grant(self, waiter: _Waiter) -> None:
        waiter.account.held += waiter.size
        self._held += waiter.size
        self._peak = max(self._peak, self._held)
        waiter.granted.set()


@attrs.define(eq=False)
class BudgetAccount:
    """What one pump holds from a ``MemoryBudget``.

    Resource handling: ``close()`` (or ``with account:``) returns everything
    still held, whatever happened to the chunks: cancelled, failed, or left in
    a channel. This is what makes the budget leak-proof.
    """

    budget: MemoryBudget
    held: int = 0
    waiter: _Waiter | None = None

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes are granted to this account.

        Raises:
            ValueError: if ``size`` exceeds the budget's capacity (it could
                never be granted).
        """
        await self.budget._acquire(self, size)

    def acquire_nowait(self, size: int) -> None:
        """Take ``size`` bytes now, if ``acquire`` would be granted them
        without queueing (no waiter ahead, and they fit).

        No checkpoint, no ``trio.Event``: the pump's reader calls it before
        every read, and the read that follows is its schedule point.

        Raises:
            trio.WouldBlock: they are not free now, or others wait first;
                ``acquire`` queues for them.
        """
        if not self.budget._grant_now(self, size):
            raise trio.WouldBlock

    def release(self, size: int) -> None:
        """Give back ``size`` of the bytes this account holds."""
        self.budget._release(self, size)

    def close(self) -> None:
        """Give back everything this account holds."""
        self.budget._release(self, self.held)

    def __enter__(self) -> BudgetAccount:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
