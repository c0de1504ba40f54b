"""Tests for scripts/h11_ceiling.py, the pure-h11 CPU ceiling benchmark.

Its figures mean something only if each timed cycle really does a whole
exchange on a kept-alive connection; these check that, not any timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h11
import pytest

# scripts/ is not a package: its modules import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import h11_ceiling


def test_server_cycle_parses_the_request_and_frames_the_whole_response() -> None:
    """Each server cycle ends with both sides DONE, ready for the next request."""
    conn = h11.Connection(h11.SERVER)
    for _ in range(3):
        h11_ceiling.server_cycle(conn)
        assert conn.our_state is h11.IDLE
        assert conn.their_state is h11.IDLE


def test_client_cycle_parses_the_whole_response() -> None:
    """Each client cycle reads the nginx-like response to its end and keeps the connection."""
    conn = h11.Connection(h11.CLIENT)
    for _ in range(3):
        h11_ceiling.client_cycle(conn)
        assert conn.our_state is h11.IDLE
        assert conn.their_state is h11.IDLE


def test_main_prints_both_cycles_and_the_ceiling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny run prints the two costs and the req/s ceiling."""
    monkeypatch.setattr(sys, "argv", ["h11_ceiling.py", "--iterations", "3", "--rounds", "1"])
    h11_ceiling.main()
    out = capsys.readouterr().out
    assert "server cycle" in out
    assert "client cycle" in out
    assert "req/s" in out


def test_unexpected_event_is_an_error() -> None:
    """A cycle that did not parse what it times fails instead of timing nonsense."""
    with pytest.raises(RuntimeError, match="expected Response"):
        h11_ceiling._expect(h11.EndOfMessage(), h11.Response)
