"""Tests for the stress command itself (scripts/stress.py) and the scripts' CLIs.

The stress suite is run by hand and its figures are read by people, so these
only check what must not silently break: size parsing, the 'listening on' line
contract, and one tiny end-to-end run whose JSON says every byte was verified.
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

from _stresskit import parse_size  # noqa: E402

RUN_LIMIT = 60  # seconds: a bound on each subprocess, not a performance claim


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("64k", 64_000),
        ("64KiB", 65_536),
        ("100MB", 100_000_000),
        ("20M", 20_000_000),
        ("1GiB", 1 << 30),
        ("1.5GB", 1_500_000_000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    """Decimal prefixes are powers of 1000, binary (…iB) of 1024."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12 apples", "5i", "-1"])
def test_parse_size_rejects(text: str) -> None:
    """Anything that is not a size is a ValueError, not a silent zero."""
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


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
