"""Tests for the stress command itself (scripts/stress.py) and the scripts' CLIs.

The stress suite is run by hand and its figures are read by people, so these
only check what must not silently break: the scripts' sizes and durations, the
'listening on' line contract, and one tiny end-to-end run whose JSON says every
byte was verified.
No timing assertions; sizes are kilobytes to a megabyte.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench  # noqa: E402
import loadgen  # noqa: E402
import measure_overhead  # noqa: E402
import stress  # noqa: E402

RUN_LIMIT = 60  # seconds: a bound on each subprocess, not a performance claim


def test_script_defaults_keep_their_bytes_and_seconds() -> None:
    """The scripts read sizes with the proxy's rule (trioproxy._units) and
    their defaults are the same bytes and seconds as before the rule was
    shared: stress's were written 50MB/20MB, decimal under both rules."""
    args = stress.build_parser().parse_args([])
    assert (args.bytes, args.rate, args.rcvbuf) == (50_000_000, 20_000_000, 65_536)
    assert (args.idle_seconds, args.settle_seconds, args.max_seconds) == (2.0, 5.0, 300.0)
    overhead = measure_overhead.build_parser().parse_args([])
    assert (overhead.fast_bytes, overhead.max_seconds) == (50 << 20, 120.0)
    benched = bench.parse_args([])
    assert (benched.size, benched.duration, benched.download_timeout) == (1 << 30, 10.0, 120.0)


def test_scripts_read_sizes_and_durations_with_one_rule() -> None:
    """k is 1024 and kB 1000 in every script, as in the proxy; durations take units."""
    args = stress.build_parser().parse_args(
        ["--bytes", "64k", "--rate", "64kB", "--max-seconds", "2m", "--settle-seconds", "500ms"]
    )
    assert (args.bytes, args.rate, args.max_seconds, args.settle_seconds) == (
        65_536,
        64_000,
        120.0,
        0.5,
    )
    assert bench.parse_args(["--size", "100MB"]).size == 100_000_000
    assert bench.parse_args(["--size", "100M"]).size == 100 << 20


def test_a_bad_script_size_says_how_to_write_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A script's bad size exits 2 with the shared parser's message."""
    with pytest.raises(SystemExit) as exited:
        stress.build_parser().parse_args(["--bytes", "12 apples"])
    assert exited.value.code == 2
    assert "has the unknown unit 'apples'" in capsys.readouterr().err


def test_loadgen_duration_takes_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """loadgen's --duration (which bench passes on) reads 500ms and plain seconds."""
    seen: list[float] = []

    async def record(target: object, connections: int, duration: float) -> dict[str, float]:
        seen.append(duration)
        return {}

    monkeypatch.setattr(loadgen, "run_load", record)
    for text in ("500ms", "10.0"):
        loadgen.main(["load", "http://127.0.0.1:1/", "--duration", text])
    assert seen == [0.5, 10.0]


async def test_origin_cli_announces_its_address() -> None:
    """`origin.py --listen 127.0.0.1:0` prints one 'origin listening on URL' line
    to stderr, and the URL serves."""
    argv = [sys.executable, str(SCRIPTS / "origin.py"), "--listen", "127.0.0.1:0"]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        line = b""
        with trio.fail_after(RUN_LIMIT):
            while not line.endswith(b"\n"):
                line += await process.stderr.receive_some(1)
        text = line.decode()
        assert text.startswith("origin listening on http://127.0.0.1:")
        port = int(text.rsplit(":", 1)[1])
        with trio.fail_after(RUN_LIMIT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                reply = b""
                while chunk := await stream.receive_some():
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        process.terminate()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def test_stress_run_through_naive_relay(tmp_path: Path) -> None:
    """One tiny stress run (2 clients x 1 MB, unpaced) ends with every byte
    verified, and writes its JSON, CSV and exit status 0."""
    json_path, csv_path = tmp_path / "summary.json", tmp_path / "samples.csv"
    argv = [
        sys.executable,
        str(SCRIPTS / "stress.py"),
        *("--proxy", "naive", "--clients", "2", "--bytes", "1MB", "--rate", "0"),
        *("--idle-seconds", "0.2", "--settle-seconds", "0.2", "--max-seconds", "30"),
        *("--json", str(json_path), "--csv", str(csv_path), "--png", str(tmp_path / "p.png")),
    ]
    with trio.fail_after(RUN_LIMIT):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (result,) = json.loads(json_path.read_text())["results"]
    assert result["proxy"] == "naive"
    assert result["clients_ok"] == 2
    assert result["bytes_verified"] == result["bytes_expected"] == 2_000_000
    assert result["idle_rss"] > 0
    assert csv_path.read_text().startswith("proxy,t_seconds,phase,rss_bytes")
    assert b"peak MiB" in done.stdout
