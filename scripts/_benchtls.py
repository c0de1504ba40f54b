# The TLS rows of scripts/bench.py (--tls): trioproxy and HAProxy doing the same
# TLS jobs, side by side, in one run (issue #11).
#
# Three jobs, each through every peer in turn, --rounds times:
#
#   1. TLS termination: curl --cacert https://localhost:PORT/big -> the proxy's TLS
#      listener -> the plain origin. MiB/s and the proxy's CPU seconds per GiB.
#   2. TLS upstream: curl http://PORT/big -> the proxy -> the origin over verified
#      TLS (trioproxy --upstream https:// --upstream-ca; HAProxy "server ... ssl
#      verify required ca-file"). MiB/s and CPU s/GiB.
#   3. New TLS connections per second: wrk -H "Connection: close" on the TLS
#      listener, the 1 KiB file: every request is a full handshake (wrk keeps no
#      session) and one small request. Its CPU per connection.
#
# Peers: "direct" (the origin's own TLS, nginx's if present: what TLS alone costs
# on this machine; its upstream row is the same TLS download), "trioproxy" (two
# processes, one per direction, each with the defaults), "haproxy" (one process,
# nbthread 1, a TLS frontend to the plain origin and a plain frontend to the TLS
# origin). The certificate is a throwaway self-signed EC P-256 one
# (scripts/_certs.py); every peer and client trusts it.
#
# The target lines are issue #11's: TLS download throughput trioproxy / HAProxy,
# round by round, >= 0.5. Like the rest of bench.py this prints figures and never
# asserts a timing.

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from _certs import Certs, self_signed
from _procs import ProcessFailed, RssSampler, Server, free_port
from bench import (
    HAPROXY_COMMON,
    LOAD_GRACE,
    MIB,
    SCRIPTS,
    cell,
    child_env,
    cpu_used,
    nginx_common,
    nginx_http_common,
    run_json,
    start_nginx_process,
    start_on_port,
    start_python_proxy,
    tree_cpu_seconds,
    which,
    write_file,
)

TLS_PEERS = ("direct", "trioproxy", "haproxy")
JOBS = ("termination", "upstream", "handshakes")

WRK_CLOSE_SCRIPT = """-- written by scripts/_benchtls.py: one request per connection, as JSON
wrk.path = "/small"
wrk.headers["Connection"] = "close"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@attrs.frozen
class TlsOrigin:
    """The origin on two ports: ``plain`` (http) and ``tls`` (https, our cert)."""

    kind: str
    plain: int
    tls: int


@attrs.frozen
class TlsPeer:
    """Where each job connects (``None``: this peer does not do it) and the
    processes whose CPU and RSS count."""

    name: str
    termination: str | None  # https://localhost:PORT
    upstream: str | None  # http://127.0.0.1:PORT or https:// (direct)
    servers: tuple[Server, ...]


@attrs.define
class TlsResult:
    name: str
    rounds: list[dict[str, Any]] = attrs.field(factory=list)
    rss_start_mib: float | None = None
    peak_rss_mib: float | None = None
    errors: list[str] = attrs.field(factory=list)


# --- origins and peers --------------------------------------------------------


def start_tls_origin(work: Path, certs: Certs, size: int, stack: contextlib.ExitStack) -> TlsOrigin:
    """nginx serving the files on a plain and a TLS port; without nginx,
    scripts/origin.py twice."""
    nginx = which("nginx")
    if nginx is None:
        plain = stack.enter_context(start_origin_py([]))
        tls = stack.enter_context(
            start_origin_py(["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)])
        )
        return TlsOrigin("scripts/origin.py", port_of(plain), port_of(tls))
    docroot = work / "docroot"  # the plain rows' files, when they ran
    if not (docroot / "big").exists():
        docroot.mkdir(mode=0o755, exist_ok=True)
        write_file(docroot / "big", size)
        write_file(docroot / "small", 1024)
    plain_port, tls_port = free_port(), free_port()
    conf = (
        nginx_common(work, "nginx-tls-origin")
        + f"""
http {{
{nginx_http_common(work, "nginx-tls-origin")}
    sendfile on;
    default_type application/octet-stream;
    server {{ listen 127.0.0.1:{plain_port}; root {docroot}; }}
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {certs.cert};
        ssl_certificate_key {certs.key};
        root {docroot};
    }}
}}
"""
    )
    server = start_nginx_process(nginx, work, "nginx-tls-origin", conf, tls_port)
    stack.enter_context(server)
    return TlsOrigin("nginx (files on tmpfs)", plain_port, tls_port)


def start_origin_py(extra: list[str]) -> Server:
    argv = [sys.executable, str(SCRIPTS / "origin.py"), "--listen", "127.0.0.1:0", *extra]
    server = Server("origin", argv, env=child_env())
    try:
        server.wait_for_url()
    except ProcessFailed:
        server.stop()
        raise
    return server


def port_of(server: Server) -> int:
    assert server.url is not None
    return int(server.url.rsplit(":", 1)[1])


def start_direct(work: Path, origin: TlsOrigin, certs: Certs) -> TlsPeer:
    tls = f"https://localhost:{origin.tls}"
    return TlsPeer("direct", tls, tls, ())


def start_trioproxy(work: Path, origin: TlsOrigin, certs: Certs, extra: list[str]) -> TlsPeer:
    base = [sys.executable, "-m", "trioproxy", "--listen", "127.0.0.1:0", *extra]
    pair = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    front = start_python_proxy(
        "trioproxy-tls", [*base, "--upstream", f"http://127.0.0.1:{origin.plain}", *pair]
    ).server
    try:
        up = f"https://localhost:{origin.tls}"
        back = start_python_proxy(
            "trioproxy-tls-up", [*base, "--upstream", up, "--upstream-ca", str(certs.cert)]
        ).server
    except ProcessFailed:
        assert front is not None
        front.stop()
        raise
    assert front is not None
    assert back is not None
    assert front.url is not None
    assert back.url is not None
    termination = front.url.replace("https://127.0.0.1", "https://localhost")
    return TlsPeer("trioproxy", termination, back.url, (front, back))


def start_haproxy(work: Path, origin: TlsOrigin, certs: Certs) -> TlsPeer:
    haproxy = which("haproxy")
    assert haproxy is not None
    tls_port, plain_port = free_port(), free_port()
    conf = work / "haproxy-tls.cfg"
    conf.write_text(f"""{HAPROXY_COMMON}
frontend termination
    bind 127.0.0.1:{tls_port} ssl crt {certs.combined}
    default_backend plain_origin

frontend upstream
    bind 127.0.0.1:{plain_port}
    default_backend tls_origin

backend plain_origin
    server origin 127.0.0.1:{origin.plain}

backend tls_origin
    server origin 127.0.0.1:{origin.tls} ssl verify required ca-file {certs.cert} sni str(localhost)
""")
    running = start_on_port("haproxy", [haproxy, "-db", "-f", str(conf)], tls_port)
    assert running.server is not None
    return TlsPeer(
        "haproxy",
        f"https://localhost:{tls_port}",
        f"http://127.0.0.1:{plain_port}",
        (running.server,),
    )


# --- the jobs -----------------------------------------------------------------------


def tls_download(url: str, certs: Certs, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """One download of the big file with curl (trusting our certificate)."""
    curl = which("curl")
    if curl is None:
        raise RuntimeError("the TLS rows need curl")
    argv = [curl, "-sS", "-o", "/dev/null", "--max-time", str(args.download_timeout)]
    argv += ["--cacert", str(certs.cert), "-w", "%{json}\\n", f"{url}/big"]
    raw = run_json(argv, args.download_timeout + LOAD_GRACE)
    if raw.get("exitcode") or raw["http_code"] != 200 or raw["size_download"] != size:
        raise RuntimeError(f"download: {raw.get('errormsg')} ({raw['http_code']})")
    return {"seconds": raw["time_total"], "mib_per_s": raw["speed_download"] / MIB}


def handshakes(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """New TLS connections per second (one 1 KiB request each), with wrk."""
    wrk = which("wrk")
    if wrk is None:
        raise RuntimeError("the handshake row needs wrk")
    script = args.workdir / "tls-close.lua"
    script.write_text(WRK_CLOSE_SCRIPT)
    connections = max(args.connections)
    argv = [wrk, "-t1", f"-c{connections}", f"-d{args.duration:g}s", "-s", str(script), url]
    raw = run_json(argv, args.duration + LOAD_GRACE, "BENCH_JSON ")
    return {
        "connections": raw["requests"],
        "per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "errors": raw["errors"] + raw["non_2xx"],
    }


def measure(
    peer: TlsPeer, job: str, certs: Certs, args: argparse.Namespace
) -> dict[str, Any] | None:
    """One job through one peer, with the CPU its processes spent on it."""
    url = peer.termination if job != "upstream" else peer.upstream
    if url is None:
        return None
    before = {s.pid: tree_cpu_seconds(s.pid) for s in peer.servers}
    if job == "handshakes":
        figures = handshakes(url.replace("localhost", "127.0.0.1"), args)
        units = figures["connections"]
    else:
        figures = tls_download(url, certs, args.size, args)
        units = args.size / 2**30
    if peer.servers:
        cpu = sum(cpu_used(before[s.pid], tree_cpu_seconds(s.pid)) for s in peer.servers)
        figures["cpu_seconds"] = cpu
        figures["cpu_per_unit"] = cpu / units if units else None
    return figures


def run_tls_rounds(
    peers: list[TlsPeer], results: dict[str, TlsResult], certs: Certs, args: argparse.Namespace
) -> None:
    samplers = {p.name: [RssSampler(s.pid) for s in p.servers] for p in peers}
    for n in range(1, args.rounds + 1):
        for peer in peers:
            results[peer.name].rounds.append({})
        for job in JOBS:
            for peer in peers:
                print(f"--- TLS round {n}/{args.rounds}, {job}: {peer.name}", file=sys.stderr)
                result = results[peer.name]
                with contextlib.ExitStack() as sampling:
                    for sampler in samplers[peer.name]:
                        sampling.enter_context(sampler.running())
                    if result.rss_start_mib is None and samplers[peer.name]:
                        result.rss_start_mib = rss_mib(samplers[peer.name], "peak")
                    figures = attempt(
                        result, job, functools.partial(measure, peer, job, certs, args)
                    )
                result.rounds[-1][job] = figures
    for peer in peers:
        if samplers[peer.name]:
            results[peer.name].peak_rss_mib = rss_mib(samplers[peer.name], "peak")


def rss_mib(samplers: list[RssSampler], which_one: str) -> float:
    return float(sum(getattr(s, f"{which_one}_bytes") for s in samplers)) / MIB


def attempt(
    result: TlsResult, what: str, func: Callable[[], dict[str, Any] | None]
) -> dict[str, Any] | None:
    try:
        return func()
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        result.errors.append(f"{what}: {exc}")
        return None


# --- the report ------------------------------------------------------------------------


def best(result: TlsResult, job: str, key: str) -> dict[str, Any] | None:
    figures = [r[job] for r in result.rounds if r.get(job)]
    return max(figures, key=lambda f: f[key], default=None)


def tls_table(results: list[TlsResult], args: argparse.Namespace) -> str:
    head = [
        "proxy",
        "TLS termination MiB/s",
        "CPU s/GiB",
        "TLS upstream MiB/s",
        "CPU s/GiB",
        f"new TLS conn/s c={max(args.connections)}",
        "CPU µs/conn",
        "RSS MiB start / peak",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        term, up = best(r, "termination", "mib_per_s"), best(r, "upstream", "mib_per_s")
        shakes = best(r, "handshakes", "per_s")
        per_conn = shakes.get("cpu_per_unit") if shakes else None
        row = [
            r.name,
            cell(term["mib_per_s"] if term else None, ".0f"),
            cell(term.get("cpu_per_unit") if term else None, ".2f"),
            cell(up["mib_per_s"] if up else None, ".0f"),
            cell(up.get("cpu_per_unit") if up else None, ".2f"),
            cell(shakes["per_s"] if shakes else None, ".0f"),
            cell(per_conn * 1e6 if per_conn else None, ".0f"),
            f"{cell(r.rss_start_mib, '.1f')} / {cell(r.peak_rss_mib, '.1f')}"
            if r.rss_start_mib is not None
            else "n/a",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def tls_targets(results: list[TlsResult], args: argparse.Namespace) -> list[str]:
    """Issue #11: TLS download trioproxy / HAProxy >= 0.5, round by round;
    the handshake ratio too, for information."""
    by_name = {r.name: r for r in results}
    if "trioproxy" not in by_name or "haproxy" not in by_name:
        return ["TLS targets: not measured (trioproxy or haproxy not run)"]
    lines = []
    for job, key, bound in (
        ("termination", "mib_per_s", 0.5),
        ("upstream", "mib_per_s", 0.5),
        ("handshakes", "per_s", None),
    ):
        ratios = []
        for ours, theirs in zip(
            by_name["trioproxy"].rounds, by_name["haproxy"].rounds, strict=True
        ):
            a, b = ours.get(job), theirs.get(job)
            ratios.append(a[key] / b[key] if a and b and b[key] else None)
        measured = [r for r in ratios if r is not None]
        each = ", ".join(cell(r, ".2f") for r in ratios)
        head = f"TLS {job}, trioproxy / haproxy"
        if not measured:
            lines.append(f"{head}: not measured")
        elif bound is None:
            lines.append(f"{head}: best {max(measured):.2f} (rounds: {each})")
        else:
            verdict = "met" if max(measured) >= bound else "not met"
            lines.append(
                f"{head}: best {max(measured):.2f} (rounds: {each}); target >= {bound}: {verdict}"
            )
    return lines


def run_tls(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Start the TLS origin and peers (stopped with ``stack``), run the rounds,
    and return the report's TLS part."""
    certs = self_signed(args.workdir)
    origin = start_tls_origin(args.workdir, certs, args.size, stack)
    print(f"TLS origin: {origin.kind}, ports {origin.plain} / {origin.tls}", file=sys.stderr)
    starters: dict[str, Callable[[], TlsPeer]] = {
        "direct": lambda: start_direct(args.workdir, origin, certs),
        "trioproxy": lambda: start_trioproxy(
            args.workdir, origin, certs, shlex.split(args.trioproxy_args)
        ),
        "haproxy": lambda: start_haproxy(args.workdir, origin, certs),
    }
    peers, results, skipped = [], {}, {}
    for name in TLS_PEERS:
        if name == "haproxy" and which("haproxy") is None:
            skipped[name] = "haproxy not installed"
            continue
        results[name] = TlsResult(name)
        try:
            peer = starters[name]()
        except ProcessFailed as exc:
            results[name].errors.append(str(exc))
            continue
        for server in peer.servers:
            stack.callback(server.stop)
        peers.append(peer)
    run_tls_rounds(peers, results, certs, args)
    ordered = list(results.values())
    return {
        "origin": origin.kind,
        "results": [attrs.asdict(r) for r in ordered],
        "table": tls_table(ordered, args),
        "targets": tls_targets(ordered, args),
        "notes": [f"{n}: skipped ({why})" for n, why in skipped.items()]
        + [f"{r.name}: {e}" for r in ordered for e in r.errors],
    }


def print_tls(report: dict[str, Any]) -> None:
    print()
    print(f"TLS rows (origin: {report['origin']}):")
    print()
    print(report["table"])
    print()
    for line in report["targets"]:
        print(line)
    for note in report["notes"]:
        print(f"- {note}")


if __name__ == "__main__":  # a quick look at the table of a saved report
    print_tls(json.loads(Path(sys.argv[1]).read_text())["tls"])
