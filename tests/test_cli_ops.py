"""CLI flags for timeouts, limits, shutdown and logs (parsing only, no server)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from trioproxy._accesslog import (
    AccessRecord,
    JsonFormatter,
    access_logger,
    log_access,
    use_access_log_buffer,
)
from trioproxy._cli import (
    build_parser,
    config_from_args,
    configure_logging,
    log_settings_from_args,
    main,
)


def test_help_shows_every_new_flag_with_its_default() -> None:
    """``--help`` lists each operations flag with its default value."""
    text = " ".join(build_parser().format_help().split())
    for flag, default in [
        ("--header-timeout", "20.0"),
        ("--idle-timeout", "75.0"),
        ("--connect-timeout", "10.0"),
        ("--upstream-timeout", "60.0"),
        ("--stall-timeout", "120.0"),
        ("--max-connections", "1024"),
        ("--shutdown-timeout", "10.0"),
        ("--log-format", "text"),
        ("--access-log", "-"),
    ]:
        after_flag = text.split(f"{flag} ", 2)[2]  # skip the usage line
        assert f"(default: {default})" in after_flag.split(" --", 1)[0], flag


def test_flags_reach_the_config() -> None:
    """Each flag sets its ProxyConfig field."""
    args = build_parser().parse_args(
        [
            "--header-timeout=5",
            "--idle-timeout=6",
            "--stall-timeout=7",
            "--max-connections=8",
            "--shutdown-timeout=0",
        ]
    )
    config = config_from_args(args)
    assert (
        config.header_timeout,
        config.idle_timeout,
        config.stall_timeout,
        config.max_connections,
        config.shutdown_timeout,
    ) == (5.0, 6.0, 7.0, 8, 0.0)


def test_bad_value_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A value the config refuses ends with status 2 and a one-line message."""
    with pytest.raises(SystemExit) as exited:
        main(["--max-connections", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "max_connections" in err


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes global state; put it back after the test."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), access_logger.level, list(access_logger.handlers))
    saved_propagate = access_logger.propagate
    yield
    use_access_log_buffer(None)
    for handler in access_logger.handlers:
        handler.close()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    access_logger.setLevel(saved[2])
    access_logger.handlers[:] = saved[3]
    access_logger.propagate = saved_propagate


async def test_json_access_log_to_a_file(tmp_path: Path, restore_logging: None) -> None:
    """``--access-log PATH --log-format json`` appends one JSON object per
    request to the file, and not to the diagnostics."""
    path = tmp_path / "access.log"
    args = build_parser().parse_args(
        ["--access-log", str(path), "--log-format", "json", "--access-log-buffer", "0"]
    )
    configure_logging(log_settings_from_args(args))
    assert isinstance(access_logger.handlers[0].formatter, JsonFormatter)
    assert access_logger.propagate is False
    record = AccessRecord(client="192.0.2.1", started=0.0)
    record.status = 204
    log_access(record)
    access_logger.handlers[0].flush()
    [line] = path.read_text().splitlines()
    data = json.loads(line)
    assert (data["client"], data["status"], data["bytes_out"]) == ("192.0.2.1", 204, 0)


async def test_access_log_off(restore_logging: None) -> None:
    """``--access-log off`` emits nothing on the access logger."""
    configure_logging(log_settings_from_args(build_parser().parse_args(["--access-log", "off"])))
    assert not access_logger.isEnabledFor(logging.CRITICAL)
