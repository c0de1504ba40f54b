"""Tests for scripts/profile_request.py, the per-request CPU and phase profile.

Its phase table names trioproxy's functions; when one is renamed or moved the
table must fail here, not print a phase that silently dropped to zero. A tiny
run checks the shape of the printout (never a timing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# scripts/ is not a package: its modules import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import profile_request as pr


def _table_names() -> list[str]:
    names = [*pr.TRANSPARENT, pr.ROOT]
    names += [name for group in pr.PHASES.values() for name in group]
    names += [name for pair in pr.BY_CALLER for name in pair]
    return names


@pytest.mark.parametrize("name", _table_names())
def test_every_function_in_the_phase_table_exists(name: str) -> None:
    """Each function the phase table names resolves to code cProfile can report."""
    assert pr.resolve(name)


def test_a_function_that_is_gone_is_an_error() -> None:
    """resolve raises for a name that no longer exists, so the test above can fail."""
    with pytest.raises(LookupError):
        pr.resolve("trioproxy._exchange:Exchange._no_such_step")


def test_every_phase_is_reported() -> None:
    """The phases the tables use are exactly the ones the report prints."""
    used = set(pr.PHASES) | set(pr.TRANSPARENT.values()) | set(pr.BY_CALLER.values())
    assert used | {pr.OUTSIDE} == set(pr.PHASE_ORDER)


def _key(name: str) -> pr.FunctionKey:
    return pr.resolve(name)[0]


def test_callees_are_charged_by_the_table_and_the_rest_to_the_caller() -> None:
    """A callee goes to its phase (by caller first); the caller's own time, its
    builtins and unlisted callees go to the caller's phase; the remainder of the
    profile is outside the connection tasks."""
    root = _key(pr.ROOT)
    send_on = _key("trioproxy._exchange:Exchange._send_on")
    send_head = _key("trioproxy._endpoint:H11Endpoint.send_head")
    checkout = _key("trioproxy._upstream:UpstreamConnector.checkout")
    unlisted = _key("trioproxy._http:error_response")
    builtin: pr.FunctionKey = ("~", 0, "<built-in method builtins.len>")
    run_loop = _key("trio:run")

    def entry(own: float, callers: dict[pr.FunctionKey, float]) -> tuple[Any, ...]:
        return (1, 1, own, own, {caller: (1, 1, 0.0, t) for caller, t in callers.items()})

    stats = {
        root: (1, 1, 1.0, 19.0, {}),
        send_on: entry(2.0, {root: 18.0}),
        send_head: entry(4.0, {send_on: 4.0}),
        checkout: entry(8.0, {send_on: 8.0}),
        unlisted: entry(3.0, {send_on: 3.0}),
        builtin: entry(1.0, {send_on: 1.0}),
        run_loop: (1, 1, 5.0, 25.0, {}),
    }
    split = pr.attribute(stats)
    assert split.total == 24.0
    assert split.seconds["write request"] == 4.0
    assert split.seconds["upstream checkout"] == 8.0
    assert split.seconds["exchange"] == 2.0 + 3.0 + 1.0
    assert split.seconds["connection loop"] == 1.0
    assert split.seconds[pr.OUTSIDE] == 5.0
    assert list(split.unlisted) == [pr._label(unlisted)]


def test_a_tiny_run_prints_rounds_phases_and_top_functions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real run (proxy in this process, load in a child) prints one row per
    round, every phase with shares that add up to 100 %, and the top table."""
    pr.main(["--requests", "30", "--rounds", "2", "--warmup", "5", "--connections", "2"])
    out = capsys.readouterr().out
    assert "| 1 |" in out
    assert "| 2 |" in out
    assert "CPU µs/req: best" in out
    assert "p50 / p99 / max ms" in out
    assert "calls/req" in out
    shares = []
    for phase in pr.PHASE_ORDER:
        [row] = [line for line in out.splitlines() if line.startswith(f"| {phase} |")]
        shares.append(float(row.split("|")[2].strip().removesuffix(" %")))
    assert sum(shares) == pytest.approx(100, abs=1)
    assert "top 20 functions by own time" in out


def test_the_floor_relay_prints_no_phases(capsys: pytest.CaptureFixture[str]) -> None:
    """``--relay floor`` profiles scripts/h11_floor.py: rounds and top functions,
    but no trioproxy phase table (its functions are not the floor's)."""
    pytest.importorskip("h11_floor")
    pr.main(["--relay", "floor", "--requests", "20", "--rounds", "1", "--connections", "2"])
    out = capsys.readouterr().out
    assert "h11_floor" in out
    assert "CPU µs/req: best" in out
    assert "| read head |" not in out
    assert "top 20 functions by own time" in out
