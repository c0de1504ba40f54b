"""Soak: the real trioproxy under mixed traffic while things break; nothing lost,
memory inside its formula, and everything back to idle afterwards (issue 15).

    python scripts/soak.py --minutes 5 --mode reverse
    python scripts/soak.py --minutes 5 --mode forward --proxy-args "--workers 2"
    python scripts/soak.py --seconds 20 --mode reverse --max-size 1MiB --json soak.json

It starts, on 127.0.0.1, the chaos origin (scripts/chaos_origin.py) and
``python -m trioproxy`` with --metrics and short timeouts (SOAK_PROXY_ARGS;
--proxy-args come after them and win), then:

1. idle: samples the proxy tree's RSS, descriptors and live tasks;
2. load, for the given time: --clients lanes, each running scenarios one after
   another (_soakscenarios: every kind once, then a weighted random mix, seeded
   by --seed), each with one expected outcome; anything else is a failure,
   printed at once. Process faults (--faults) meanwhile: at 30% a burst of
   idle connections past the proxy's RLIMIT_NOFILE (--nofile, set for the
   proxy at its start) so accept hits EMFILE; at 60%, under --workers 2 or
   more, SIGKILL to one worker (its exchanges in flight fail: counted apart);
3. settle: waits until descriptors and tasks are back at their idle counts;
4. drain: a few slow downloads, SIGTERM mid-body; each must finish and the
   proxy exit 0 within --shutdown-timeout.

Every second it records RSS against the ceiling of docs/memory.md, descriptors,
tasks, connections, bytes buffered, exchanges/s and failures (_soakwatch); it
writes them with the verdicts to --json and plots them to --png (matplotlib,
``pip install -e '.[plot]'``). The last line is for scripts:

    soak: N exchanges, F failed, RSS peak P MiB <= ceiling C MiB, after A MiB
    (idle I), fds back: yes|no, tasks back: yes|no

(one line). The exit status is 1 on any failure, an RSS above its ceiling, or
descriptors or tasks not back; 0 otherwise. Everything is bounded in time;
processes it started are stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
sys.path.insert(0, str(REPO_ROOT))  # tests.test_fuzz's pools, as scripts/fuzz.py does

from _soakbook import (  # noqa: E402
    EXCHANGE_GRACE,
    PRINT_FAILURES,
    OriginLog,
    ProxyLog,
    Soak,
    log,
)
from _soakfaults import EMFILE_AT, KILL_AT, emfile_burst, kill_worker, sigterm_drain  # noqa: E402
from _soakhttp import Exchange, HttpClient, open_client, read_reply  # noqa: E402
from _soakscenarios import (  # noqa: E402
    KINDS,
    SIZE_CAP,
    Setup,
    kinds_for,
    plan_largest,
    plan_largest_upload,
)
from _soakwatch import Sample, Watcher, draw_png, write_json  # noqa: E402
from _stresskit import parse_http_url  # noqa: E402
from measure_overhead import debug_memory, free_port, raise_fd_limit  # noqa: E402
from stress import Child, start_child, stop_child  # noqa: E402

from trioproxy._cli import build_parser as proxy_parser  # noqa: E402
from trioproxy._cli import config_from_args  # noqa: E402
from trioproxy._units import for_argparse, parse_size  # noqa: E402

SOAK_PROXY_ARGS = [
    *("--access-log", "off"),
    *("--stall-timeout", "2", "--upstream-timeout", "2"),
    *("--header-timeout", "3", "--idle-timeout", "5", "--connect-timeout", "5"),
    *("--shutdown-timeout", "10"),
    *("--max-buffer-memory", "4MiB"),
]
"""Short timeouts, so that every fault (a stalled origin, a slowloris head, a
stalled reader) resolves in seconds and a soak of minutes sees hundreds; a
4 MiB budget per worker, which the default 16 lanes fill (readers queue for
it), so that the ceiling is a few MiB above idle and means something (with
16 MiB, at most 4 MiB of it was ever used, and the ceiling was 12 MiB loose)."""

FAULTS = ("emfile", "kill", "sigterm")
IDLE_SAMPLES = 3
SETTLE_EXTRA = 3
"""Samples after descriptors and tasks are back, so the heap trimmer (which acts
a second or two after the last connection) shows in the RSS after."""
PROGRESS_EVERY = 10
"""Seconds between progress lines."""


# ---------------------------------------------------------------- load


async def lane(soak: Soak, index: int, lanes: int) -> None:
    """Run scenarios until the load phase ends: first this lane's share of the
    kinds (so that every kind runs at least once), then a weighted mix."""
    names = [name for name in kinds_for(soak.setup.mode) if name in soak.args.kinds]
    weights = [KINDS[name].weight for name in names]
    rng = random.Random(f"{soak.args.seed}-{index}")
    first = names[index::lanes]
    while trio.current_time() < soak.load_end:
        name = first.pop(0) if first else rng.choices(names, weights)[0]
        await soak.run_plan(KINDS[name].planner(soak.setup, rng))


async def largest(soak: Soak) -> None:
    """The one download of --max-size, and the one largest upload, if --max-size
    goes beyond the random sizes."""
    if soak.setup.max_size > SIZE_CAP:
        rng = random.Random(f"{soak.args.seed}-largest")
        await soak.run_plan(plan_largest(soak.setup, rng))
        await soak.run_plan(plan_largest_upload(soak.setup, rng))


async def run_load(soak: Soak, seconds: float) -> None:
    soak.phase = "load"
    begin = trio.current_time()
    soak.load_end = begin + seconds
    soak.event("load starts", "load")
    async with trio.open_nursery() as nursery:
        for index in range(soak.args.clients):
            nursery.start_soon(lane, soak, index, soak.args.clients)
        nursery.start_soon(largest, soak)
        if "emfile" in soak.args.faults:
            nursery.start_soon(at, begin + EMFILE_AT * seconds, emfile_burst, soak)
        if "kill" in soak.args.faults and soak.config.workers > 1:
            nursery.start_soon(at, begin + KILL_AT * seconds, kill_worker, soak)
        elif "kill" in soak.args.faults:
            soak.event("no kill -9: it needs --workers 2 or more")
        await trio.sleep_until(soak.load_end)
        soak.phase = "finishing"
        soak.event("load ends; waiting for the exchanges in flight", "load ends")
    soak.event("all exchanges done")


async def at(when: float, fault: Callable[[Soak], Any], soak: Soak) -> None:
    await trio.sleep_until(when)
    await fault(soak)


# ---------------------------------------------------------------- phases


async def sampler(soak: Soak) -> None:
    """Sample once a second until cancelled; a progress line every 10 s."""
    begin, count = trio.current_time(), 0
    while True:
        sample = await soak.watcher.sample(soak.phase, soak.exchanges, soak.failed)
        count += 1
        if count % PROGRESS_EVERY == 0:
            log(progress(soak, sample))
        await trio.sleep_until(begin + count)


def progress(soak: Soak, sample: Sample) -> str:
    return (
        f"{sample.t:6.1f} s  {sample.phase:<9} {sample.exchanges} exchanges"
        f" ({sample.exchanges_per_second:.0f}/s), {soak.failed} failed,"
        f" {sum(soak.apart.values())} apart; RSS {_mib(sample.rss)} of {_mib(sample.ceiling)}"
        f" MiB, fds {sample.fds}, tasks {sample.tasks}, connections {sample.client_connections}"
    )


@attrs.frozen
class Baseline:
    rss: int
    fds: int
    tasks: int


async def measure_idle(soak: Soak) -> Baseline:
    """Idle figures, after one scrape of each worker (its first scrape imports
    psutil, ~1 MiB, once: not memory a load left behind)."""
    for port in soak.watcher.metrics_ports:
        with trio.fail_after(EXCHANGE_GRACE):
            await debug_memory(("127.0.0.1", port))
    await trio.sleep(2)
    samples = []
    for _ in range(IDLE_SAMPLES):
        samples.append(await soak.watcher.sample("idle", 0, 0))
        await trio.sleep(1)
    last = samples[-1]
    if last.rss is None or last.fds is None or last.tasks is None:
        raise RuntimeError(f"no idle figures: {last}")
    soak.watcher.idle_rss = last.rss
    return Baseline(last.rss, last.fds, last.tasks)


async def settle(soak: Soak, idle: Baseline) -> tuple[bool, bool, int | None]:
    """Wait (at most --settle-seconds) for descriptors and tasks to be back at
    their idle counts; then a few more samples for the RSS after."""
    soak.phase = "settle"
    fds_back = tasks_back = False
    last: Sample | None = None
    with trio.move_on_after(soak.args.settle_seconds):
        while not (fds_back and tasks_back):
            await trio.sleep(1)
            last = soak.watcher.samples[-1]
            fds_back = last.fds is not None and last.fds <= idle.fds
            tasks_back = last.tasks is not None and last.tasks <= idle.tasks
    await trio.sleep(SETTLE_EXTRA)
    last = soak.watcher.samples[-1]
    soak.event(f"settled: fds {last.fds} (idle {idle.fds}), tasks {last.tasks} (idle {idle.tasks})")
    return fds_back, tasks_back, last.rss


def final_checks(soak: Soak, origin_smuggled: int | None, origin_log: OriginLog) -> None:
    for line in soak.proxy_log.bug_lines:
        soak.fail("proxy-log", "stderr", line)
    if origin_log.tracebacks:
        soak.fail("origin-log", "stderr", f"{origin_log.tracebacks} tracebacks from the origin")
    if origin_smuggled is None:
        soak.fail("smuggle", "origin", "could not read the origin's /stats")
    elif origin_smuggled:
        soak.fail("smuggle", "origin", f"{origin_smuggled} smuggled requests reached the origin")
    if soak.emfile is not None and soak.emfile.reached and not soak.ok_after_emfile:
        soak.fail("emfile", "recovery", "no exchange begun after the burst succeeded")


async def origin_stats(origin: tuple[str, int]) -> int | None:
    with trio.move_on_after(EXCHANGE_GRACE):
        exchange = Exchange("stats")
        stream = await open_client(origin, exchange)
        async with stream:
            client = HttpClient(stream)
            await client.request(exchange, "GET", "/stats", [("Host", "origin")])
            reply = await read_reply(client, verify=False)
        smuggled: int = json.loads(bytes(reply.body))["smuggled"]
        return smuggled
    return None


# ---------------------------------------------------------------- processes


def free_ports(count: int) -> int:
    """A port P such that P .. P + count - 1 were free a moment ago."""
    for _ in range(100):
        base = free_port()
        if base + count > 65536:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} adjacent free ports")


def proxy_argv(args: argparse.Namespace, origin: str, metrics_port: int) -> list[str]:
    """The soak's defaults, then --proxy-args, then the addresses (ours win)."""
    argv = [*SOAK_PROXY_ARGS]
    if args.mode == "forward":
        argv += ["--connect-ports", str(parse_http_url(origin)[1])]
    argv += shlex.split(args.proxy_args)
    argv += ["--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{metrics_port}"]
    if args.mode == "reverse":
        argv += ["--upstream", origin]
    return argv


def limit_descriptors(nofile: int) -> Callable[[], None]:
    """For preexec_fn: soft and hard RLIMIT_NOFILE (the proxy raises its soft
    limit to the hard one at start, so both are set)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


@attrs.frozen
class Outcome:
    soak: Soak
    idle: Baseline
    fds_back: bool
    tasks_back: bool
    rss_after: int | None


async def run_soak(args: argparse.Namespace) -> Outcome:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    origin_log, proxy_log = OriginLog(), ProxyLog()
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            origin_argv = [sys.executable, str(SCRIPTS_DIR / "chaos_origin.py")]
            origin = await start_child(
                nursery,
                "origin",
                [*origin_argv, "--listen", "127.0.0.1:0"],
                env,
                on_line=origin_log.on_line,
            )
            try:
                outcome = await _with_origin(
                    args, nursery, origin, refusing, env, proxy_log, origin_log
                )
            finally:
                await stop_child(origin)
            nursery.cancel_scope.cancel()
    return outcome


async def _with_origin(
    args: argparse.Namespace,
    nursery: trio.Nursery,
    origin: Child,
    refusing: socket.socket,
    env: dict[str, str],
    proxy_log: ProxyLog,
    origin_log: OriginLog,
) -> Outcome:
    probe = proxy_argv(args, origin.url, 0)
    config = config_from_args(proxy_parser().parse_args(probe))
    metrics_port = free_ports(config.workers)
    argv = [sys.executable, "-m", "trioproxy", *proxy_argv(args, origin.url, metrics_port)]
    preexec = limit_descriptors(args.nofile) if "emfile" in args.faults else None
    proxy = await start_child(
        nursery, "trioproxy", argv, env, on_line=proxy_log.on_line, preexec_fn=preexec
    )
    try:
        setup = Setup(
            mode=args.mode,
            proxy=parse_http_url(proxy.url),
            origin=parse_http_url(origin.url),
            refused_port=refusing.getsockname()[1],
            stall_timeout=config.stall_timeout,
            header_timeout=config.header_timeout,
            upstream_timeout=config.upstream_timeout,
            max_size=args.max_size,
        )
        ports = [metrics_port + index for index in range(config.workers)]
        watcher = Watcher(proxy.process.pid, ports, config.max_buffer_memory)
        soak = Soak(args, setup, config, proxy, watcher, proxy_log)
        async with trio.open_nursery() as inner:
            idle = await measure_idle(soak)
            soak.event(f"idle: RSS {_mib(idle.rss)} MiB, {idle.fds} fds, {idle.tasks} tasks")
            inner.start_soon(sampler, soak)
            await run_load(soak, args.seconds)
            fds_back, tasks_back, rss_after = await settle(soak, idle)
            if "sigterm" in args.faults:
                await sigterm_drain(soak)
            inner.cancel_scope.cancel()
        final_checks(soak, await origin_stats(setup.origin), origin_log)
        return Outcome(soak, idle, fds_back, tasks_back, rss_after)
    finally:
        await stop_child(proxy)


# ---------------------------------------------------------------- reports


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def format_last_line(
    *,
    exchanges: int,
    failed: int,
    peak_rss: int | None,
    ceiling: int | None,
    within: bool,
    rss_after: int | None,
    idle_rss: int,
    fds_back: bool,
    tasks_back: bool,
) -> str:
    """The line scripts read (issue 15, point 5); ``within``: no sample's RSS
    was above its ceiling (else the line says ">" instead of "<=")."""
    return (
        f"soak: {exchanges} exchanges, {failed} failed,"
        f" RSS peak {_mib(peak_rss)} MiB {'<=' if within else '>'} ceiling {_mib(ceiling)} MiB,"
        f" after {_mib(rss_after)} MiB (idle {_mib(idle_rss)}),"
        f" fds back: {'yes' if fds_back else 'no'}, tasks back: {'yes' if tasks_back else 'no'}"
    )


def last_line(outcome: Outcome) -> str:
    soak = outcome.soak
    peak = soak.watcher.peak()
    return format_last_line(
        exchanges=soak.exchanges,
        failed=soak.failed,
        peak_rss=peak.rss if peak else None,
        ceiling=peak.ceiling if peak else None,
        within=not soak.watcher.over_ceiling(),
        rss_after=outcome.rss_after,
        idle_rss=outcome.idle.rss,
        fds_back=outcome.fds_back,
        tasks_back=outcome.tasks_back,
    )


def summary(outcome: Outcome) -> list[str]:
    soak = outcome.soak
    lines = [f"{'kind':<14}{'runs':>7}{'ok':>7}{'failed':>8}{'apart':>7}"]
    for name, tally in sorted(soak.kinds.items()):
        lines.append(f"{name:<14}{tally.runs:>7}{tally.ok:>7}{tally.failed:>8}{tally.apart:>7}")
    if soak.apart:
        parts = ", ".join(
            f"{count} by the {reason}" for reason, count in sorted(soak.apart.items())
        )
        lines.append(f"failed as expected (counted apart, not in 'failed'): {parts}")
    for sample in soak.watcher.over_ceiling()[:10]:
        lines.append(
            f"RSS over ceiling at {sample.t} s: {_mib(sample.rss)} > {_mib(sample.ceiling)} MiB"
        )
    if soak.failed > PRINT_FAILURES:
        lines.append(f"{soak.failed - PRINT_FAILURES} more failures (all in the JSON)")
    return lines


def document(outcome: Outcome, line: str) -> dict[str, Any]:
    soak = outcome.soak
    return {
        "last_line": line,
        "config": {
            k: v if isinstance(v, int | float | str | list) else str(v)
            for k, v in vars(soak.args).items()
        },
        "proxy_argv": soak.proxy.process.args,
        "exchanges": soak.exchanges,
        "failed": soak.failed,
        "apart": soak.apart,
        "kinds": {name: attrs.asdict(tally) for name, tally in soak.kinds.items()},
        "failures": [attrs.asdict(f) for f in soak.failures],
        "idle": attrs.asdict(outcome.idle),
        "rss_after": outcome.rss_after,
        "fds_back": outcome.fds_back,
        "tasks_back": outcome.tasks_back,
        "over_ceiling": len(soak.watcher.over_ceiling()),
        "events": soak.events,
        "kill": None
        if soak.kill is None
        else {
            "victim": soak.kill.victim,
            "victim_connections": len(soak.kill.victim_ports),
            "restarted": soak.kill.restarted,
        },
        "emfile": None if soak.emfile is None else attrs.asdict(soak.emfile),
        "samples": [attrs.asdict(s) for s in soak.watcher.samples],
    }


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, help="length of the load phase (default 1)")
    duration.add_argument("--seconds", type=float, help="the same, in seconds (short runs)")
    parser.add_argument("--mode", choices=["forward", "reverse"], required=True)
    parser.add_argument("--proxy-args", default="", help="more trioproxy flags, e.g. '--workers 2'")
    parser.add_argument("--json", type=Path, help="write samples and verdicts here")
    parser.add_argument("--png", type=Path, help="plot the samples here (needs matplotlib)")
    parser.add_argument("--clients", type=int, default=16, help="scenarios running at once")
    parser.add_argument(
        "--max-size",
        type=for_argparse(parse_size),
        default=parse_size("1GiB"),
        help="the one largest download; random sizes stay under min(this, 32 MiB)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"process faults to inject, comma-separated, from {', '.join(FAULTS)}; or none"
        " (kill needs --workers 2 or more)",
    )
    parser.add_argument(
        "--nofile", type=int, default=256, help="the proxy's RLIMIT_NOFILE with the emfile fault"
    )
    parser.add_argument(
        "--settle-seconds", type=float, default=30.0, help="longest wait for fds and tasks"
    )
    parser.add_argument("--seed", default="1", help="seed of every lane's random choices")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="scenario kinds in the mix, comma-separated (default: all; see _soakscenarios)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 1.0)
    faults = [] if args.faults == "none" else [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    args.faults = faults
    args.kinds = [kind for kind in args.kinds.split(",") if kind]
    if not args.kinds or set(args.kinds) - set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    if args.clients < 1 or args.seconds <= 0 or args.max_size < 1024:
        parser.error("--clients >= 1, a positive duration, --max-size >= 1KiB")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    raise_fd_limit()  # the burst and the lanes hold many sockets in this process
    try:
        outcome = trio.run(run_soak, args)
    except* KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    line = last_line(outcome)
    for text in summary(outcome):
        print(text)
    if args.json:
        write_json(args.json, document(outcome, line))
    if args.png:
        title = f"soak, {args.mode} mode, {args.proxy_args or 'default flags'}: {line[6:60]}..."
        if not draw_png(args.png, outcome.soak.watcher.samples, outcome.soak.events, title):
            log("matplotlib is not installed: no PNG (pip install -e '.[plot]')")
    print(line, flush=True)
    bad = outcome.soak.failed or outcome.soak.watcher.over_ceiling()
    sys.exit(1 if bad or not (outcome.fds_back and outcome.tasks_back) else 0)


if __name__ == "__main__":
    main()
