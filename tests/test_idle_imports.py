"""What a proxy without TLS or workers does not load: idle RSS (issue #14, target 4).

A plain proxy never needs ``_tls`` (0.3 MB of RSS) or ``_workers`` (0.1 MB),
nor, in forward mode with the default trust, the system's trust store (1.7
MB), until a TLS leg, ``--workers`` or an ``https://`` target asks for them.
Checked in a fresh interpreter: this test process has imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trioproxy import _cli, _workers

_PROBE = """
import json, sys
from trioproxy import ProxyConfig, Upstream
from trioproxy._cli import build_parser
from trioproxy._server import serve
from trioproxy._tls_legs import _client_context, prepare_tls

prepare_tls(ProxyConfig())  # forward mode, the system store
prepare_tls(ProxyConfig(upstream=Upstream(host="127.0.0.1", port=8080)))
print(json.dumps({
    "modules": sorted(name for name in sys.modules if name.startswith("trioproxy.")),
    "contexts": _client_context.cache_info().currsize,
}))
"""


def test_a_plain_proxy_loads_no_tls_no_workers_and_no_trust_store() -> None:
    output = subprocess.run(
        [sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    result = json.loads(output)
    assert "trioproxy._server" in result["modules"]
    assert "trioproxy._tls" not in result["modules"]
    assert "trioproxy._workers" not in result["modules"]
    assert result["contexts"] == 0


def test_the_worker_check_sees_the_supervisors_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``_cli`` looks for the workers' variables by prefix without importing
    ``_workers``; a variable renamed there must still carry the prefix."""
    for name in (_workers.WORKER_FD_ENV, _workers.WORKER_INDEX_ENV):
        assert name.startswith(_cli.WORKER_ENV_PREFIX)
    monkeypatch.delenv(_workers.WORKER_FD_ENV, raising=False)
    monkeypatch.delenv(_workers.WORKER_INDEX_ENV, raising=False)
    assert _cli._worker_link() is None
    monkeypatch.setenv(_workers.WORKER_FD_ENV, "7")
    monkeypatch.setenv(_workers.WORKER_INDEX_ENV, "1")
    link = _cli._worker_link()
    assert link is not None
    assert (link.fd, link.index) == (7, 1)
