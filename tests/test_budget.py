"""MemoryBudget alone: byte counting, FIFO order, the reserve, cancellation."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioproxy._budget import BudgetAccount, MemoryBudget


async def _acquire_and_log(account: BudgetAccount, size: int, log: list[str], name: str) -> None:
    await account.acquire(size)
    log.append(name)


async def test_waiters_are_served_in_fifo_order_whatever_their_size() -> None:
    """A large waiter at the head is not overtaken by smaller ones behind it."""
    budget = MemoryBudget(10, reserve=0)
    holder = budget.open_account()
    await holder.acquire(10)
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        for name, size in [("big", 6), ("small", 1), ("medium", 3)]:
            nursery.start_soon(_acquire_and_log, budget.open_account(), size, log, name)
            await trio.testing.wait_all_tasks_blocked()
        holder.release(5)  # 5 free: "small" and "medium" would fit, "big" not
        await trio.testing.wait_all_tasks_blocked()
        assert log == []
        holder.release(1)  # 6 free: "big" first
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["big"]
        holder.release(1)
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["big", "small"]
        holder.release(3)
    assert log == ["big", "small", "medium"]
    assert budget.statistics().held == 10
    assert budget.statistics().waits == 3


async def test_read_ahead_never_takes_the_reserve() -> None:
    """A pump that already holds bytes is refused what would leave less than
    ``reserve`` free, while a pump holding nothing still gets its first chunk."""
    budget = MemoryBudget(8, reserve=4)
    greedy, fresh = budget.open_account(), budget.open_account()
    await greedy.acquire(2)  # first
    await greedy.acquire(2)  # further: leaves 4 free, allowed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(greedy.acquire, 2)  # further: would leave 2 < 4
        await trio.testing.wait_all_tasks_blocked()
        assert greedy.held == 4
        await fresh.acquire(2)  # first: granted at once despite the queue
        assert fresh.held == 2
        greedy.release(4)  # greedy holds nothing: its waiter becomes a first one
    assert greedy.held == 2
    assert budget.statistics().held == 4


async def test_cancel_in_queue_lets_the_next_waiter_in() -> None:
    """Cancelling the head waiter grants the next one that fits, at once."""
    budget = MemoryBudget(4, reserve=0)
    holder = budget.open_account()
    await holder.acquire(3)
    small = budget.open_account()
    async with trio.open_nursery() as nursery:
        big_scope = trio.CancelScope()

        async def big_waiter() -> None:
            with big_scope:
                await budget.open_account().acquire(4)

        nursery.start_soon(big_waiter)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(small.acquire, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert small.held == 0
        big_scope.cancel()
    assert small.held == 1
    assert budget.statistics().held == 4


async def test_grant_and_cancel_in_one_step_loses_nothing() -> None:
    """If a waiter is granted and cancelled in the same step, the bytes are
    either its own (``acquire`` returned) or back in the budget: never lost."""
    budget = MemoryBudget(4, reserve=0)
    holder, waiter = budget.open_account(), budget.open_account()
    await holder.acquire(4)
    returned = False
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def wait() -> None:
            nonlocal returned
            with scope:
                await waiter.acquire(2)
                returned = True

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        holder.release(4)  # grants the waiter ...
        scope.cancel()  # ... which is cancelled before it resumes
    assert waiter.held == (2 if returned else 0)
    assert budget.statistics().held == waiter.held


async def test_close_returns_everything_and_statistics_add_up() -> None:
    """``close`` returns all an account holds; the peak is remembered."""
    budget = MemoryBudget(100)
    with budget.open_account() as account:
        await account.acquire(30)
        await account.acquire(10)
        assert budget.statistics().held == 40
    assert budget.statistics().held == 0
    assert budget.statistics().peak == 40


async def test_impossible_reservations_are_refused() -> None:
    """A reservation larger than the whole budget raises instead of waiting for ever."""
    budget = MemoryBudget(10)
    with pytest.raises(ValueError, match="cannot reserve 11"):
        await budget.open_account().acquire(11)
    with pytest.raises(ValueError, match="capacity"):
        MemoryBudget(0)
    with pytest.raises(ValueError, match="reserve"):
        MemoryBudget(10, reserve=10)


async def test_acquire_nowait_takes_only_what_acquire_would_grant_at_once() -> None:
    """The pump's fast path: no overtaking a queued waiter, no read-ahead into
    the reserve, no reservation over the free bytes; else it grants like
    ``acquire`` and the counts add up."""
    budget = MemoryBudget(8, reserve=4)
    first, other = budget.open_account(), budget.open_account()
    first.acquire_nowait(2)  # a first reservation that fits
    first.acquire_nowait(2)  # read-ahead leaving 4 free: allowed
    with pytest.raises(trio.WouldBlock):
        first.acquire_nowait(1)  # read-ahead into the reserve
    with pytest.raises(trio.WouldBlock):
        other.acquire_nowait(5)  # more than is free
    assert (first.held, other.held, budget.statistics().held) == (4, 0, 4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other.acquire, 5)  # queued: 4 free
        await trio.testing.wait_all_tasks_blocked()
        late = budget.open_account()
        with pytest.raises(trio.WouldBlock):
            late.acquire_nowait(1)  # fits, but the queued first one comes first
        first.release(1)
    assert (other.held, late.held, budget.statistics().held) == (5, 0, 8)
    assert budget.statistics().peak == 8
