# The soak's bookkeeping: one run's state, its tallies, and its verdicts.
#
# Every scenario run ends here (Soak.run_plan): as expected, as a failure
# (printed at once, kept for the JSON), or as a casualty of a process fault
# the soak itself caused (a killed worker's exchanges, a 502 while the proxy
# had no descriptors left), counted apart. The proxy's and the origin's stderr
# are watched here too: EMFILE from accept shows the descriptor fault hit, and
# a logged bug or an unexpected traceback is a failure of its own.

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator

import attrs
import h11
import trio
from _soakhttp import Exchange, Unexpected
from _soakscenarios import Plan, Setup
from _soakwatch import Watcher
from stress import Child

from trioproxy._config import ProxyConfig

EXCHANGE_GRACE = 30.0
"""Seconds every exchange gets on top of three times its planned duration before
it counts as hung: generous, for a loaded 2-core machine and faults that must
resolve through the proxy's timeouts."""
FAULT_GRACE = 1.0
"""After a fault ended, seconds in which its casualties still count as its own."""
PRINT_FAILURES = 50
"""Failures printed in full; the rest are counted (and kept in the JSON)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@attrs.define
class KindTally:
    runs: int = 0
    ok: int = 0
    failed: int = 0
    apart: int = 0


@attrs.frozen
class Failure:
    t: float
    kind: str
    detail: str
    message: str


@attrs.define
class KillRecord:
    time: float
    victim: int
    victim_ports: set[int]
    survivor_ports: set[int]
    restarted: bool = False


@attrs.define
class EmfileRecord:
    start: float
    end: float = math.inf
    connections: int = 0
    reached: bool = False


@attrs.define
class ProxyLog:
    """Watches the proxy's stderr: EMFILE from accept, and bugs it logged.

    trioproxy logs its bugs as "bug: ..." with a traceback; any other
    traceback is one too, except those trio.serve_listeners (the metrics
    endpoint's accept loop) logs after "accept returned EMFILE". Repeats of
    the EMFILE reports (every 0.1 s per accept loop) are not copied to stderr.
    """

    emfile_lines: int = 0
    trio_emfile_lines: int = 0
    bug_lines: list[str] = attrs.Factory(list)
    _in_trio_traceback: bool = False

    def on_line(self, line: str) -> bool:
        if self._in_trio_traceback:
            if line.startswith(("Traceback", " ")):
                return False
            self._in_trio_traceback = False
            if line.startswith("OSError"):
                return False
        if "accept returned EMFILE" in line:
            self.trio_emfile_lines += 1
            self._in_trio_traceback = True
            return self.trio_emfile_lines <= 1
        if "accept failed with EMFILE" in line:
            self.emfile_lines += 1
            return self.emfile_lines <= 3
        if "bug:" in line or "Traceback" in line:
            self.bug_lines.append(line)
        return True


@attrs.define
class OriginLog:
    tracebacks: int = 0

    def on_line(self, line: str) -> bool:
        if "Traceback" in line:
            self.tracebacks += 1
        return True


@attrs.define
class Soak:
    """One soak run's state: the plan, the tallies, the faults."""

    args: argparse.Namespace
    setup: Setup
    config: ProxyConfig
    proxy: Child
    watcher: Watcher
    proxy_log: ProxyLog
    load_end: float = math.inf
    phase: str = "idle"
    exchanges: int = 0
    kinds: dict[str, KindTally] = attrs.Factory(dict)
    failures: list[Failure] = attrs.Factory(list)
    apart: dict[str, int] = attrs.Factory(dict)
    kill: KillRecord | None = None
    emfile: EmfileRecord | None = None
    ok_after_emfile: int = 0
    events: list[tuple[float, str]] = attrs.Factory(list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def now(self) -> float:
        return trio.current_time() - self.watcher.started

    def event(self, what: str, label: str = "") -> None:
        """Log ``what``; mark it on the plot as ``label``, if given."""
        if label:
            self.events.append((round(self.now(), 1), label))
        log(f"{self.now():6.1f} s  {what}")

    def count_request(self) -> None:
        self.exchanges += 1

    def fail(self, kind: str, detail: str, message: str) -> None:
        failure = Failure(round(self.now(), 1), kind, detail, message)
        self.failures.append(failure)
        if len(self.failures) <= PRINT_FAILURES:
            log(f"FAILED at {failure.t} s: {kind} ({detail}): {message}")

    async def run_plan(self, plan: Plan) -> None:
        """Run one scenario within its bound; tally its outcome."""
        tally = self.kinds.setdefault(plan.kind, KindTally())
        tally.runs += 1
        exchange = Exchange(plan.kind, on_request=self.count_request)
        limit = EXCHANGE_GRACE + 3 * plan.seconds
        began = trio.current_time()
        try:
            with trio.fail_after(limit):
                await plan.run(exchange)
        except BaseException as exc:  # sorted by as_unexpected; Cancelled re-raised
            error = as_unexpected(exc, limit)
            reason = self.casualty_of(exchange, error)
            if reason is not None:
                tally.apart += 1
                self.apart[reason] = self.apart.get(reason, 0) + 1
            else:
                tally.failed += 1
                self.fail(plan.kind, plan.detail, str(error))
        else:
            tally.ok += 1
            if self.emfile is not None and began > self.emfile.end:
                self.ok_after_emfile += 1

    def casualty_of(self, exchange: Exchange, error: Unexpected) -> str | None:
        return casualty(self.kill, self.emfile, exchange, error, trio.current_time())


def as_unexpected(exc: BaseException, limit: float) -> Unexpected:
    """Whatever ended a scenario run, as an Unexpected (re-raising Cancelled and
    KeyboardInterrupt)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = list(_leaves(exc))
        for leaf in leaves:
            if isinstance(leaf, Unexpected):
                return leaf
        exc = leaves[0] if leaves else exc
    if isinstance(exc, Unexpected):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return Unexpected(f"no outcome within {limit:.0f} s")
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
        return Unexpected(f"connection broke: {exc!r}", lost=True)
    if isinstance(exc, h11.ProtocolError):
        return Unexpected(f"HTTP error: {exc!r}")
    if isinstance(exc, Exception):
        return Unexpected(f"soak bug? {exc!r}")
    raise exc


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        elif not isinstance(exc, trio.Cancelled):
            yield exc


def casualty(
    kill: KillRecord | None,
    emfile: EmfileRecord | None,
    exchange: Exchange,
    error: Unexpected,
    now: float,
) -> str | None:
    """The process fault a failure at ``now`` is expected from, if any.

    The kill's: an exchange on a connection the killed worker held (its
    accepted connections at the kill), or one that connected before the kill
    or within ``FAULT_GRACE`` after it, lost its connection, and was not among
    the survivors' (it sat in the killed worker's accept queue: the kernel
    hands SYNs to a SO_REUSEPORT socket until the dying process's socket is
    gone, and the client only notes its connect when the handshake returns).
    The EMFILE burst's: a 502 while the proxy was out of descriptors (it
    could not open an upstream socket), or a connection lost then: a client
    still writing its body (an Upgrade's early bytes) when that 502 came and
    the proxy closed sees its write break before it can read the answer.
    """
    if kill is not None and now >= kill.time:
        ports = set(exchange.ports)
        if ports & kill.victim_ports:
            return "kill"
        connected = exchange.first_connect
        before = connected is not None and connected <= kill.time + FAULT_GRACE
        if before and error.lost and not ports & kill.survivor_ports:
            return "kill"
    in_burst = emfile is not None and emfile.start <= now <= emfile.end + FAULT_GRACE
    if in_burst and (error.status == 502 or error.lost):
        return "emfile"
    return None
