"""The soak (scripts/soak.py, issue 15): a short real run, and its verdicts.

``test_short_soak`` runs the real program, as a user would, for 10 seconds of
load in each mode with ``--workers 2`` and every process fault, with small
sizes; its lanes are seeded, so the same scenarios run every time, and every
kind runs at least once. It asserts no failure, RSS never above its ceiling,
descriptors and tasks back at idle, and that each fault really happened. Its
only real-time bound is a generous limit on the whole run; the soak's own
per-exchange limits are generous multiples of what each exchange needs.

The other tests check, without processes, that the verdicts can fail: a body
that is not the pattern, a cut that looks complete, a failure wrongly blamed on
a fault.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import trio

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from _soakbook import EmfileRecord, KillRecord, ProxyLog, casualty  # noqa: E402
from _soakhttp import Exchange, Reply, Unexpected, expect_body, expect_cut  # noqa: E402
from _soakscenarios import KINDS, Setup, fuzz_input, kinds_for  # noqa: E402
from _stresskit import PatternVerifier, payload  # noqa: E402
from soak import format_last_line  # noqa: E402

RUN_LIMIT = 300  # seconds for one whole soak run: a bound, not a performance claim
LAST_LINE = re.compile(
    r"soak: \d+ exchanges, \d+ failed, RSS peak [\d.]+ MiB (<=|>) ceiling [\d.]+ MiB,"
    r" after [\d.]+ MiB \(idle [\d.]+\), fds back: (yes|no), tasks back: (yes|no)"
)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
async def test_short_soak(mode: str, tmp_path: Path) -> None:
    """10 s of the mixed load with --workers 2, EMFILE, kill -9 and SIGTERM:
    exit 0, no failure, every kind run, RSS within its ceiling, descriptors
    and tasks back at idle, each fault seen to happen."""
    report = tmp_path / "soak.json"
    argv = [
        sys.executable,
        str(SCRIPTS / "soak.py"),
        *("--seconds", "10", "--mode", mode, "--max-size", "1MiB"),
        *("--proxy-args", "--workers 2", "--json", str(report)),
    ]
    with trio.fail_after(RUN_LIMIT):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    stdout = done.stdout.decode()
    assert done.returncode == 0, (stdout + done.stderr.decode())[-6000:]
    result = json.loads(report.read_text())
    last = stdout.strip().splitlines()[-1]
    assert last == result["last_line"]
    assert LAST_LINE.fullmatch(last)
    assert result["failed"] == 0, result["failures"]
    assert set(result["apart"]) <= {"kill", "emfile"}
    assert result["over_ceiling"] == 0
    assert result["fds_back"]
    assert result["tasks_back"]
    assert set(result["kinds"]) >= {*kinds_for(mode), "drain"}
    assert result["emfile"]["reached"]
    assert result["kill"]["restarted"]
    assert [label for _, label in result["events"]] == [
        "load",
        "EMFILE burst",
        "kill -9",
        "load ends",
        "SIGTERM",
    ]


def _reply(body: bytes, *, status: int = 200, complete: bool = True) -> Reply:
    reply = Reply(status=status, verifier=PatternVerifier(), complete=complete)
    reply.length = len(body)
    assert reply.verifier is not None
    reply.verifier.feed(body)
    if not complete:
        reply.ended = "EOF before the end of the message"
    return reply


def test_expect_body_fails_on_a_wrong_byte_a_short_body_or_a_cut() -> None:
    """Only a complete 200 of exactly the pattern passes."""
    good = payload(0, 100_000)
    expect_body(_reply(good), 100_000)
    wrong = good[:5000] + b"X" + good[5001:]
    for reply, size in [
        (_reply(wrong), 100_000),
        (_reply(good[:99_999]), 100_000),
        (_reply(good, complete=False), 100_000),
        (_reply(good, status=206), 100_000),
    ]:
        with pytest.raises(Unexpected):
            expect_body(reply, size)


def test_expect_cut_fails_when_the_cut_body_looks_complete() -> None:
    """A cut must be visible: a 200 that ended as framed is not one, nor a cut
    body with a wrong byte; the allowed status passes only when listed."""
    prefix = payload(0, 5000)
    expect_cut(_reply(prefix, complete=False))
    expect_cut(_reply(b"502 Bad Gateway\n", status=502), 502)
    with pytest.raises(Unexpected):
        expect_cut(_reply(prefix))
    with pytest.raises(Unexpected):
        expect_cut(_reply(b"Y" + prefix[1:], complete=False))
    with pytest.raises(Unexpected):
        expect_cut(_reply(b"502 Bad Gateway\n", status=502))


def test_casualties_are_only_the_faults_own() -> None:
    """A kill is blamed for failures on its worker's connections, or lost ones
    that were waiting to be accepted (connected before it, or within
    FAULT_GRACE after it, while the dying worker's socket still took SYNs);
    not for a survivor's, not for one that got an answer, not for one that
    connected later, not for failures before it. EMFILE only for a 502 or
    a lost connection during the burst."""
    kill = KillRecord(time=10.0, victim=1, victim_ports={5000}, survivor_ports={6000})

    def exchange(port: int, connected: float) -> Exchange:
        record = Exchange("download")
        record.ports.append(port)
        record.first_connect = connected
        return record

    lost = Unexpected("connection broke", lost=True)
    answered = Unexpected("expected 200; got 404", status=404)
    assert casualty(kill, None, exchange(5000, 9.0), answered, 11.0) == "kill"
    assert casualty(kill, None, exchange(7000, 9.9), lost, 11.0) == "kill"
    assert casualty(kill, None, exchange(6000, 9.0), lost, 11.0) is None
    assert casualty(kill, None, exchange(7000, 9.9), answered, 11.0) is None
    assert casualty(kill, None, exchange(7000, 10.5), lost, 11.0) == "kill"
    assert casualty(kill, None, exchange(7000, 11.5), lost, 12.0) is None
    assert casualty(kill, None, exchange(5000, 9.0), lost, 9.5) is None
    burst = EmfileRecord(start=20.0, end=25.0)
    bad_gateway = Unexpected("expected 200; got 502", status=502)
    assert casualty(None, burst, exchange(7000, 21.0), bad_gateway, 22.0) == "emfile"
    assert casualty(None, burst, exchange(7000, 29.0), bad_gateway, 30.0) is None
    assert casualty(None, burst, exchange(7000, 21.0), lost, 22.0) == "emfile"
    assert casualty(None, burst, exchange(7000, 29.0), lost, 30.0) is None


def test_proxy_log_tells_emfile_from_bugs() -> None:
    """trioproxy's EMFILE lines are counted; trio's EMFILE report and its
    traceback are not bugs; a "bug:" line and any other traceback are."""
    log = ProxyLog()
    lines = [
        "2026 ERROR trioproxy: accept failed with EMFILE (Too many open files); retrying in 0.1 s",
        "2026 ERROR trio.serve_listeners: accept returned EMFILE (Too many open files); retrying",
        "Traceback (most recent call last):",
        '  File "trio/_highlevel_serve_listeners.py", line 47, in _serve_one_listener',
        "OSError: [Errno 24] Too many open files",
        "2026 WARNING trioproxy: worker 1 (pid 5) was killed by SIGKILL; restarting it in 0.1 s",
        "2026 ERROR trioproxy: bug: unexpected error serving client 127.0.0.1",
        "Traceback (most recent call last):",
    ]
    for line in lines:
        log.on_line(line)
    assert log.emfile_lines == 1
    assert log.bug_lines == [lines[6], lines[7]]


def test_last_line_format() -> None:
    """The last line is exactly issue 15's, and says ">" when RSS went over."""
    figures = {
        "exchanges": 1234,
        "failed": 0,
        "peak_rss": 50 * 2**20,
        "ceiling": 80 * 2**20,
        "rss_after": int(30.5 * 2**20),
        "idle_rss": 30 * 2**20,
        "fds_back": True,
        "tasks_back": False,
    }
    assert format_last_line(within=True, **figures) == (  # type: ignore[arg-type]
        "soak: 1234 exchanges, 0 failed, RSS peak 50.0 MiB <= ceiling 80.0 MiB,"
        " after 30.5 MiB (idle 30.0), fds back: yes, tasks back: no"
    )
    over = format_last_line(within=False, **figures)  # type: ignore[arg-type]
    assert LAST_LINE.fullmatch(over)
    assert "50.0 MiB > ceiling" in over


def test_fuzz_input_keeps_request_lines_local_and_is_seeded() -> None:
    """Forward-mode fuzz input never names a host but the origin's or the
    refusing port's (no DNS look-ups), and one seed gives one input."""
    setup = Setup("forward", ("127.0.0.1", 1), ("127.0.0.1", 2), 3, 2.0, 3.0, 2.0, 1 << 20)
    for seed in range(300):
        data = b"".join(fuzz_input(setup, random.Random(seed)))
        assert b"example.com" not in data
        assert b"127.0.0.1:8080" not in data
        assert b"".join(fuzz_input(setup, random.Random(seed))) == data


def test_every_kind_runs_in_some_mode() -> None:
    """No kind is left out of both modes' mixes."""
    assert set(kinds_for("forward")) | set(kinds_for("reverse")) == set(KINDS)
