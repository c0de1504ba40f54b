"""Command-line flags of access control and request limits."""

from __future__ import annotations

import ipaddress

import pytest

from trioproxy import ProxyConfig
from trioproxy._cli import build_parser, config_from_args, main


def config_for(*argv: str) -> ProxyConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without flags: loopback clients only, CONNECT to 443 only, no auth, 100 fields, 8 KiB."""
    monkeypatch.delenv("TRIOPROXY_AUTH", raising=False)
    config = config_for()
    assert config.allow == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.connect_ports == ((443, 443),)
    assert config.auth is None
    assert (config.max_header_fields, config.max_target_length) == (100, 8192)


def test_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag sets its field; --allow is repeatable and replaces the default."""
    monkeypatch.delenv("TRIOPROXY_AUTH", raising=False)
    config = config_for(
        "--allow", "10.0.0.0/8", "--allow", "::1",
        "--connect-ports", "443,9000-9100",
        "--auth", "u:p",
        "--max-header-fields", "50",
        "--max-target-length", "2k",
    )  # fmt: skip
    assert config.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.connect_ports == ((443, 443), (9000, 9100))
    assert config.credentials == b"u:p"
    assert (config.max_header_fields, config.max_target_length) == (50, 2048)


def test_auth_from_the_environment_stays_out_of_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TRIOPROXY_AUTH sets the credentials, and --help never prints them."""
    monkeypatch.setenv("TRIOPROXY_AUTH", "envuser:envsecret")
    assert config_for().credentials == b"envuser:envsecret"
    assert config_for("--auth", "flag:wins").credentials == b"flag:wins"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "envsecret" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allow", "10.0.0.1/8"], "allow"),
        (["--connect-ports", "25-"], "connect ports"),
        (["--auth", "nocolon"], "USER:PASSWORD"),
        (["--max-header-fields", "0"], "max_header_fields"),
        (["--max-target-length", "1"], "max_target_length"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value ends with status 2 and a one-line message naming the setting."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert error.count("\n") == 1
