"""The deployment recipes cannot drift from the program (docs/deploy.md).

Each recipe's command line must use only flags that ``trioproxy --help``
lists, with values the command line accepts; each memory limit must cover
the ceiling of docs/memory.md for the flags beside it, and the arithmetic
shown in its comment must be that ceiling; each stop grace period must be
longer than the drain. The unit is parsed as an INI file, the Containerfile
by its instructions, and the Kubernetes manifest as text (PyYAML is not a
dependency of the project).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trioproxy import ProxyConfig
from trioproxy._cli import build_parser, config_from_args
from trioproxy._metrics import (
    CONNECTION_OVERHEAD_BYTES,
    EXCHANGE_OVERHEAD_BYTES,
    POOLED_CONNECTION_OVERHEAD_BYTES,
)

from .helpers import PROMPTLY, proxy_process

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "trioproxy.service"
CONTAINERFILE = ROOT / "Containerfile"
MANIFEST = ROOT / "contrib" / "kubernetes.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
UNIT_PROGRAM = "/opt/trioproxy/bin/trioproxy"
MiB = 1024 * 1024
# Idle RSS with --metrics: 29.2 MB measured (docs/memory.md, "The terms");
# the recipes round it up to 30 MiB.
IDLE_RSS = 30 * MiB
# Options of other programs that docs/deploy.md shows (podman, systemctl,
# kubectl, systemd-analyze, kubernetes-validate); every other --option in it
# must be trioproxy's.
OTHER_TOOLS_OPTIONS = {
    "--format",
    "--name",
    "--memory",
    "--stop-timeout",
    "--now",
    "--dry-run",
    "--validate",
    "--replicas",
    "--strict",
    "--offline",
}


@pytest.fixture(scope="module")
def help_flags() -> frozenset[str]:
    """Every option ``python -m trioproxy --help`` lists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=PROMPTLY,
    )
    options = result.stdout.split("options:", 1)[1]
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", options))


def accepted_config(args: list[str], help_flags: frozenset[str]) -> ProxyConfig:
    """The config ``args`` give, after checking every flag is in ``--help``."""
    flags = [arg.split("=", 1)[0] for arg in args if arg.startswith("--")]
    assert flags, "no flags found: the parsing in this test is out of date"
    unknown = sorted(set(flags) - help_flags)
    assert not unknown, f"not flags of trioproxy --help: {unknown}"
    return config_from_args(build_parser().parse_args(args))


def ceiling(config: ProxyConfig) -> int:
    """docs/memory.md's ceiling, with every connection in an exchange and a
    full pool (none in forward mode)."""
    per_connection = CONNECTION_OVERHEAD_BYTES + EXCHANGE_OVERHEAD_BYTES
    pooled = config.pool_caps[0] * POOLED_CONNECTION_OVERHEAD_BYTES
    return IDLE_RSS + config.max_buffer_memory + config.max_connections * per_connection + pooled


def shown_ceiling_mib(text: str) -> int:
    """The ``= N MiB`` total of the arithmetic in a file's comment."""
    totals = re.findall(r"^#\s+= (\d+) MiB", text, re.MULTILINE)
    assert len(totals) == 1, totals
    return int(totals[0])


def value_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# -- systemd -----------------------------------------------------------------


class _Unit(configparser.ConfigParser):
    """systemd's INI dialect, near enough: case-sensitive keys, repeats allowed."""

    def __init__(self) -> None:
        super().__init__(strict=False, interpolation=None, delimiters=("=",))

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def unit_service() -> configparser.SectionProxy:
    unit = _Unit()
    unit.read(UNIT, encoding="utf-8")
    return unit["Service"]


def unit_command() -> list[str]:
    """ExecStart, its backslash continuations joined, split as systemd does."""
    return shlex.split(unit_service()["ExecStart"].replace("\\\n", " "))


def test_unit_sandboxes_and_restarts_the_service() -> None:
    """The unit runs as a dynamic user with no new privileges on a read-only
    system, restarts on failure, stops the main process only, and reloads
    with SIGHUP to the main process (which re-reads a --config file)."""
    service = unit_service()
    assert service["DynamicUser"] == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_unit_command_line_is_accepted(help_flags: frozenset[str]) -> None:
    """ExecStart runs the installed program with flags and values it accepts."""
    command = unit_command()
    assert command[0] == UNIT_PROGRAM
    config = accepted_config(command[1:], help_flags)
    assert config.metrics_listen is not None
    assert config.workers == 1  # the memory arithmetic is for one process


def test_unit_memory_max_covers_the_ceiling(help_flags: frozenset[str]) -> None:
    """MemoryMax is above the ceiling of ExecStart's flags, and the comment's
    arithmetic adds up to that ceiling."""
    config = accepted_config(unit_command()[1:], help_flags)
    memory_max = unit_service()["MemoryMax"]
    assert memory_max.endswith("M")  # systemd: base 1024
    assert int(memory_max[:-1]) * MiB > ceiling(config)
    assert shown_ceiling_mib(UNIT.read_text()) * MiB == ceiling(config)


def test_unit_stop_timeout_leaves_the_drain_its_time(help_flags: frozenset[str]) -> None:
    """systemd's SIGKILL comes after --shutdown-timeout, not during the drain."""
    config = accepted_config(unit_command()[1:], help_flags)
    assert float(unit_service()["TimeoutStopSec"]) > config.shutdown_timeout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say about the unit, with
    ExecStart pointed at this environment's trioproxy (verify refuses a path
    that is not executable, and /opt/trioproxy is not installed here)."""
    program = Path(sys.executable).with_name("trioproxy")
    if not program.exists():
        pytest.skip(f"no {program} to stand in for {UNIT_PROGRAM}")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(UNIT_PROGRAM, str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=PROMPTLY,
        check=False,
    )
    # verify exits 0 even for unknown keys and bad values; it only prints them.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# -- Containerfile -----------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = "\n".join(
        line for line in CONTAINERFILE.read_text().splitlines() if not line.startswith("#")
    )
    joined = re.sub(r"\\\n\s*", " ", text)
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword, rest.strip()))
    return pairs


def instruction(keyword: str) -> str:
    found = [rest for key, rest in instructions() if key == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def image_command() -> list[str]:
    args: list[str] = json.loads(instruction("CMD"))
    return args


def healthcheck_command() -> list[str]:
    _, _, exec_form = instruction("HEALTHCHECK").partition(" CMD ")
    command: list[str] = json.loads(exec_form)
    return command


def healthcheck_url() -> str:
    urls = re.findall(r"http://[^'\"]+", " ".join(healthcheck_command()))
    assert len(urls) == 1, urls
    return str(urls[0])


def test_image_is_slim_python_and_not_root() -> None:
    """A slim Python base, a numeric non-root user, the proxy as entrypoint."""
    assert re.fullmatch(r"python:3\.\d+-slim", instruction("FROM"))
    user = instruction("USER").split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    assert json.loads(instruction("ENTRYPOINT")) == ["trioproxy"]


def test_image_command_is_accepted(help_flags: frozenset[str]) -> None:
    """CMD's flags and values are accepted; it listens beyond loopback (or the
    published port would reach nothing) and serves metrics."""
    config = accepted_config(image_command(), help_flags)
    assert config.listen_host == "0.0.0.0"
    assert config.metrics_listen is not None


def test_healthcheck_gets_metrics_on_the_metrics_port(help_flags: frozenset[str]) -> None:
    """The health check's URL is /metrics on the port CMD gives --metrics."""
    config = accepted_config(image_command(), help_flags)
    assert config.metrics_listen is not None
    assert healthcheck_url() == f"http://127.0.0.1:{config.metrics_listen[1]}/metrics"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def run_healthcheck(port: int) -> int:
    """The HEALTHCHECK command with this interpreter, pointed at ``port``."""
    command = healthcheck_command()
    assert command[0] == "python"
    command = [
        sys.executable,
        *(
            part.replace(healthcheck_url(), f"http://127.0.0.1:{port}/metrics")
            for part in command[1:]
        ),
    ]
    result = await trio.run_process(command, capture_stderr=True, check=False)
    return result.returncode


async def test_healthcheck_passes_against_the_image_command() -> None:
    """Run as the image runs it (addresses moved to 127.0.0.1 and free ports),
    the proxy passes the health check; once it is gone, the check fails."""
    metrics_port = free_port()
    args = image_command()
    args[args.index("--listen") + 1] = "127.0.0.1:0"
    args[args.index("--metrics") + 1] = f"127.0.0.1:{metrics_port}"
    with trio.fail_after(PROMPTLY):
        async with proxy_process(*args) as proxy:
            assert await run_healthcheck(metrics_port) == 0
            proxy.process.kill()
            await proxy.process.wait()
        assert await run_healthcheck(metrics_port) != 0


# -- Kubernetes --------------------------------------------------------------


def manifest_args() -> list[str]:
    """The container's ``args:`` list (double-quoted block items, comments skipped)."""
    lines = MANIFEST.read_text().splitlines()
    (start,) = [index for index, line in enumerate(lines) if line.strip() == "args:"]
    indent = len(lines[start]) - len(lines[start].lstrip())
    args = []
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if len(line) - len(line.lstrip()) <= indent or not stripped.startswith("- "):
            break
        args.append(json.loads(stripped[2:]))
    return args


def manifest_int(key: str) -> int:
    (value,) = re.findall(rf"^\s*{key}: (\d+)\s*$", MANIFEST.read_text(), re.MULTILINE)
    return int(value)


def test_manifest_deploys_replicas_behind_a_service() -> None:
    """A Deployment of more than one replica and a Service selecting its pods."""
    text = MANIFEST.read_text()
    assert re.search(r"^kind: Deployment$", text, re.MULTILINE)
    assert re.search(r"^kind: Service$", text, re.MULTILINE)
    assert manifest_int("replicas") >= 2
    assert re.search(r"^\s*runAsNonRoot: true$", text, re.MULTILINE)
    assert manifest_int("runAsUser") == int(instruction("USER").split(":")[0])


def test_manifest_args_are_accepted(help_flags: frozenset[str]) -> None:
    """The args are trioproxy flags with accepted values, the metrics address
    reachable by the kubelet."""
    config = accepted_config(manifest_args(), help_flags)
    assert config.metrics_listen is not None
    assert config.metrics_listen[0] == "0.0.0.0"


def test_manifest_probes_use_the_metrics_port(help_flags: frozenset[str]) -> None:
    """Readiness and liveness get /metrics on the named port that --metrics
    listens on."""
    config = accepted_config(manifest_args(), help_flags)
    assert config.metrics_listen is not None
    text = MANIFEST.read_text()
    (port,) = re.findall(r"- name: metrics\s+containerPort: (\d+)", text)
    assert int(port) == config.metrics_listen[1]
    probes = re.findall(r"(\w+Probe):\s+httpGet:\s+path: /metrics\s+port: metrics\s", text)
    assert sorted(probes) == ["livenessProbe", "readinessProbe"]


def test_manifest_grace_period_covers_pre_stop_and_drain(help_flags: frozenset[str]) -> None:
    """terminationGracePeriodSeconds exceeds the preStop sleep plus --shutdown-timeout."""
    config = accepted_config(manifest_args(), help_flags)
    (sleep,) = re.findall(r'command: \["sleep", "(\d+)"\]', MANIFEST.read_text())
    assert manifest_int("terminationGracePeriodSeconds") > int(sleep) + config.shutdown_timeout


def test_manifest_memory_limit_covers_the_ceiling(help_flags: frozenset[str]) -> None:
    """The memory limit is above the ceiling of the args, and the comment's
    arithmetic adds up to that ceiling."""
    config = accepted_config(manifest_args(), help_flags)
    text = MANIFEST.read_text()
    (limit,) = re.findall(r"limits:\s+(?:#.*\s+)*memory: (\d+)Mi\s", text)
    assert int(limit) * MiB > ceiling(config)
    assert shown_ceiling_mib(text) * MiB == ceiling(config)


# -- docs/deploy.md ----------------------------------------------------------


def test_deploy_doc_names_only_real_flags(help_flags: frozenset[str]) -> None:
    """Every --option in docs/deploy.md is trioproxy's or one of the few of
    the other tools it shows."""
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", DEPLOY_DOC.read_text()))
    assert not sorted(mentioned - help_flags - OTHER_TOOLS_OPTIONS)
    assert mentioned & help_flags  # the pattern still finds trioproxy's flags
