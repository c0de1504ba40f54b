# The soak's process faults (issue 15, point 3): what happens to the proxy
# process itself while the load runs.
#
# * EMFILE: the proxy runs with a low RLIMIT_NOFILE (soft and hard, set in the
#   child before exec, because trioproxy raises its soft limit to the hard one);
#   a burst of idle connections then takes every descriptor, accept fails with
#   EMFILE, and the proxy must keep serving what it has and recover once the
#   burst closes.
# * kill -9 of one worker under --workers 2 or more: the supervisor restarts
#   it; only that worker's exchanges in flight fail (counted apart).
# * SIGTERM with downloads mid-body: they finish, and the proxy exits 0,
#   within --shutdown-timeout.

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

import psutil
import trio
from _soakbook import EXCHANGE_GRACE, EmfileRecord, KillRecord, Soak
from _soakhttp import SLOW_RCVBUF, Exchange, HttpClient, expect_body, open_client, read_reply
from _soakscenarios import Plan
from _soakwatch import scrape, tree
from _stresskit import Pacer

EMFILE_AT, KILL_AT = 0.3, 0.6
"""When, as fractions of the load phase, the descriptor burst and the kill come:
apart from each other and from the start and the end."""
EMFILE_HOLD = 1.0
"""Seconds the burst keeps the proxy out of descriptors once it logged EMFILE."""
EMFILE_WAIT = 10.0
"""Longest wait for the proxy to log EMFILE after the burst connected."""
RESTART_WAIT = 30.0
"""Longest wait for the supervisor to replace a killed worker."""
DRAIN_CLIENTS, DRAIN_SIZE, DRAIN_RATE = 4, 2 * 1024 * 1024, 1e6
"""SIGTERM comes while these downloads are mid-body: 2 MiB at 1 MB/s takes ~2 s,
well inside the soak's 10 s --shutdown-timeout."""


async def emfile_burst(soak: Soak) -> None:
    """Open more idle connections than the proxy has descriptors; hold them
    until it logs EMFILE from accept (and a moment more); close them."""
    count = soak.config.workers * soak.args.nofile + 64
    record = soak.emfile = EmfileRecord(start=trio.current_time())
    before = soak.proxy_log.emfile_lines
    soak.event(f"EMFILE burst: {count} idle connections", "EMFILE burst")
    sockets: list[trio.socket.SocketType] = []
    try:
        for _ in range(count):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            await sock.connect(soak.setup.proxy)
        record.connections = len(sockets)
        # The workers cannot be scraped while out of descriptors; what they
        # accepted is at most what their descriptor limit allows.
        soak.watcher.saw_connections(min(len(sockets), soak.config.workers * soak.args.nofile))
        with trio.move_on_after(EMFILE_WAIT):
            while soak.proxy_log.emfile_lines == before:  # noqa: ASYNC110 - a log, no event
                await trio.sleep(0.1)
        record.reached = soak.proxy_log.emfile_lines > before
        await trio.sleep(EMFILE_HOLD)
    except OSError as exc:
        soak.fail("emfile", "burst", f"the burst could not connect: {exc!r}")
    finally:
        for sock in sockets:
            sock.close()
        record.end = trio.current_time()
    soak.event(f"EMFILE burst closed ({'EMFILE logged' if record.reached else 'no EMFILE'})")
    if not record.reached:
        soak.fail("emfile", "burst", f"the proxy did not log EMFILE with {count} connections")


def _client_ports(pid: int, proxy_port: int) -> set[int]:
    """Client ports of the connections ``pid`` accepted on the proxy port."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return set()
    return {c.raddr.port for c in connections if c.raddr and c.laddr.port == proxy_port}


def worker_pids(soak: Soak) -> list[int]:
    return sorted(p.pid for p in tree(soak.proxy.process.pid)[1:])


async def kill_worker(soak: Soak) -> None:
    """SIGKILL one worker mid-load; wait for the supervisor to replace it."""
    workers = worker_pids(soak)
    if len(workers) < 2:
        soak.fail("kill", "setup", f"expected {soak.config.workers} workers, saw {workers}")
        return
    victim, survivors = workers[0], workers[1:]
    port = soak.setup.proxy[1]
    victim_ports = _client_ports(victim, port)
    survivor_ports = set().union(*(_client_ports(pid, port) for pid in survivors))
    soak.kill = KillRecord(trio.current_time(), victim, victim_ports, survivor_ports)
    os.kill(victim, signal.SIGKILL)
    soak.event(f"SIGKILL worker {victim} ({len(victim_ports)} client connections)", "kill -9")
    with trio.move_on_after(RESTART_WAIT):
        while True:
            now = worker_pids(soak)
            if len(now) == soak.config.workers and victim not in now:
                ready = [await scrape(port) for port in soak.watcher.metrics_ports]
                if all(ready):
                    soak.kill.restarted = True
                    break
            await trio.sleep(0.2)
    soak.event(f"worker replaced: {'yes' if soak.kill.restarted else 'NO'}")
    if not soak.kill.restarted:
        soak.fail("kill", "restart", f"no new worker serving {RESTART_WAIT:g} s after the kill")


def drain_plan(soak: Soak, started: Callable[[], None]) -> Plan:
    """One slow download that reports once its body has begun."""
    setup = soak.setup

    async def run(exchange: Exchange) -> None:
        stream = await open_client(setup.proxy, exchange, rcvbuf=SLOW_RCVBUF)
        async with stream:
            client = HttpClient(stream)
            path = setup.target(f"/bytes/{DRAIN_SIZE}")
            await client.request(exchange, "GET", path, setup.headers())
            pacer = Pacer(DRAIN_RATE, burst=SLOW_RCVBUF)
            reply = await read_reply(client, pacer=pacer, stop_after=SLOW_RCVBUF)
            started()
            reply = await read_reply(client, pacer=pacer, reply=reply)
        expect_body(reply, DRAIN_SIZE)

    return Plan(
        "drain", f"{DRAIN_SIZE} B at {DRAIN_RATE / 1e6:g} MB/s", DRAIN_SIZE / DRAIN_RATE, run
    )


async def sigterm_drain(soak: Soak) -> None:
    """SIGTERM while DRAIN_CLIENTS downloads are mid-body: they must finish, and
    the proxy exit 0, within --shutdown-timeout (and the supervisor's grace)."""
    soak.phase = "drain"
    begun = 0
    all_begun = trio.Event()

    def started() -> None:
        nonlocal begun
        begun += 1
        if begun == DRAIN_CLIENTS:
            all_begun.set()

    process = soak.proxy.process
    timeout = soak.config.shutdown_timeout + 5.0
    async with trio.open_nursery() as nursery:
        for _ in range(DRAIN_CLIENTS):
            nursery.start_soon(soak.run_plan, drain_plan(soak, started))
        with trio.move_on_after(EXCHANGE_GRACE):
            await all_begun.wait()
        process.send_signal(signal.SIGTERM)
        soak.event(f"SIGTERM with {begun} downloads mid-body", "SIGTERM")
        with trio.move_on_after(timeout):
            await process.wait()
    soak.event(f"proxy exited with {process.returncode}")
    if begun < DRAIN_CLIENTS:
        soak.fail("sigterm", "drain", f"only {begun} of {DRAIN_CLIENTS} downloads began")
    if process.returncode != 0:
        soak.fail("sigterm", "exit", f"exit status {process.returncode} within {timeout:g} s")
