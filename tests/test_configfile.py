"""The config file (trioproxy/_configfile): keys, types, groups, routes, the
line of every error, precedence, and ``--check-config``."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from trioproxy._balance import UpstreamServer
from trioproxy._cli import given_settings, main
from trioproxy._config import all_settings
from trioproxy._configfile import ConfigError, KeyLines, load_settings, setting_value

GOOD = """\
# two services, three backends
read_size = "16KiB"
header_timeout = "5s"
connect_timeout = 2
allow = ["10.0.0.0/8", "::1"]
splice = false
log_level = "info"

[upstream.api]
servers = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
balance = "least_conn"
max_fails = 3
fail_timeout = "10s"

[upstream.static]
servers = ["http://127.0.0.1:9100"]

[[route]]
host = "api.example.test"
path_prefix = "/v1/"
upstream = "api"

[[route]]
upstream = "static"
"""


@pytest.fixture(autouse=True)
def no_auth_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIOPROXY_AUTH", raising=False)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trioproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(tmp_path: Path, text: str, given: dict[str, Any] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, given or {})
    return str(caught.value).removeprefix(path)


def test_a_good_file_sets_settings_groups_and_routes(tmp_path: Path) -> None:
    """Every kind of value: a size and a duration as strings, a duration as a
    number, a list, a ``--no-`` key, a log setting; two groups and two routes."""
    settings = load_settings(write(tmp_path, GOOD), {})
    config = settings.config
    assert (config.read_size, config.header_timeout, config.connect_timeout) == (16384, 5.0, 2.0)
    assert [str(network) for network in config.allow] == ["10.0.0.0/8", "::1/128"]
    assert config.splice is False
    assert settings.log.log_level == "info"
    api, static = config.upstreams
    assert (api.name, api.balance, api.max_fails, api.fail_timeout) == (
        "api",
        "least_conn",
        3,
        10.0,
    )
    assert api.servers == (
        UpstreamServer("http", "127.0.0.1", 9001),
        UpstreamServer("http", "127.0.0.1", 9002),
    )
    assert static.servers == (UpstreamServer("http", "127.0.0.1", 9100),)
    assert config.routes is not None
    assert [route.upstream for route in config.routes.routes] == ["api", "static"]
    assert config.mode == "reverse"


def test_the_one_line_upstream_is_one_group_and_one_default_route(tmp_path: Path) -> None:
    """``upstream = "http://..."`` in a file is ``--upstream``: one group
    ``default`` of one server and one default route, the same objects."""
    config = load_settings(write(tmp_path, 'upstream = "http://127.0.0.1:9000"\n'), {}).config
    [group], routes = config.groups_and_routes()
    assert (group.name, group.servers) == ("default", (UpstreamServer("http", "127.0.0.1", 9000),))
    assert routes is not None
    assert routes.match(b"any.test", b"/x") is not None


def test_https_servers_and_upstreams_keep_their_scheme(tmp_path: Path) -> None:
    """An https:// server in a group, and the one-line https:// upstream, are
    TLS servers (port 443 by default)."""
    text = "[upstream.api]\nservers = ['http://a:81', 'https://b']\n[[route]]\nupstream = 'api'\n"
    [api] = load_settings(write(tmp_path, text), {}).config.upstreams
    assert api.servers == (UpstreamServer("http", "a", 81), UpstreamServer("https", "b", 443))
    config = load_settings(write(tmp_path, 'upstream = "https://origin.test"\n'), {}).config
    [group], _ = config.groups_and_routes()
    assert group.servers == (UpstreamServer("https", "origin.test", 443),)


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (
            "listen = '127.0.0.1:1'\nreed_size = 5\n",
            2,
            "reed_size: unknown key (did you mean read_size?)",
        ),
        ("read_size = true\n", 1, "read_size: expected size"),
        ("read_size = '64 parsecs'\n", 1, "read_size: not a size"),
        ("header_timeout = [1]\n", 1, "header_timeout: expected duration"),
        ("workers = '2'\n", 1, "workers: expected integer"),
        ("allow = '10.0.0.0/8'\n", 1, "allow: expected array of strings"),
        ("splice = 'no'\n", 1, "splice: expected boolean"),
        ("log_level = 'loud'\n", 1, "log_level: must be one of debug, info, warning, error"),
        ("read_size = 4096\nmax_buffer_memory = 100\n", 2, "max_buffer_memory must be at least"),
        ("a = 1\nread_size = \n", 2, "not valid TOML"),
        # Bad input that the issue lists, each with its key and line:
        (
            "[upstream.api]\nservers = ['http://a:1']\n[[route]]\nupstream = 'apii'\n",
            4,
            "route 1: upstream 'apii' is not defined (defined: api)",
        ),
        ("[upstream.api]\nbalance = 'least_conn'\n", 1, "upstream.api: servers is required"),
        ("[upstream.api]\nservers = []\n", 2, "upstream.api.servers: an upstream group needs"),
        ("[upstream.api]\nservers = ['ftp://a']\n", 2, "must start with http:// or https://"),
        ("[upstream.api]\nservers = ['http://a:1/v1']\n", 2, "must not have a path"),
        ("[upstream.api]\nservers = ['http://a:1/?q']\n", 2, "must not have a query"),
        ("[upstream.api]\nservers = ['http://a:99999']\n", 2, "the port must be a number"),
        (
            "[upstream.a]\nservers = ['http://a']\n[[route]]\nhost = 'x.test'\nupstream = 'a'\n"
            "[[route]]\nupstream = 'a'\n[[route]]\nhost = 'y.test'\nupstream = 'a'\n",
            8,
            "route 3: comes after the default route (route 2,",
        ),
        (
            "[upstream.api]\nservers = ['http://a']\n[upstream.api]\nservers = ['http://b']\n",
            3,
            "not valid TOML: Cannot declare ('upstream', 'api') twice",
        ),
        ("[upstream.api]\nservers = ['http://a']\nmax_fails = -1\n", 3, "upstream.api.max_fails"),
        (
            "[upstream.api]\nservers = ['http://a']\nfail_timout = 3\n",
            3,
            "did you mean fail_timeout",
        ),
        (
            "[upstream.api]\nservers = ['http://a']\nhealth_check = 'healthz'\n",
            3,
            "a path starting",
        ),
        ("[[route]]\nupstream = 'x'\npath_prefix = 'v1'\n", 3, "route[1].path_prefix"),
        ("[[route]]\nupstream = 'x'\nhost = 5\n", 3, "route[1].host: expected a string"),
        ("[[route]]\nhost = 'a.test'\n", 1, "route[1]: upstream is required"),
        (
            "[upstream.api]\nservers = ['http://a']\n",
            None,
            "upstream groups need at least one route",
        ),
        (
            "parent_proxy = 'http://p:3128'\n[upstream.api]\nservers = ['http://a']\n"
            "[[route]]\nupstream = 'api'\n",
            1,
            "parent_proxy is for forward mode",
        ),
    ],
)
def test_errors_name_the_key_and_the_line(
    tmp_path: Path, text: str, line: int | None, expected: str
) -> None:
    """Every error says where: ``FILE:LINE: key: what is wrong``."""
    message = error_of(tmp_path, text)
    if line is None:
        assert message.startswith(": "), message
    else:
        assert message.startswith(f":{line}: "), message
    assert expected in message


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(str(tmp_path / "missing.toml"), {})


def test_the_command_line_wins_over_the_file(tmp_path: Path) -> None:
    """A flag given on the command line overrides the file's key, also for a
    repeatable flag (its list replaces the file's) and a ``--no-`` flag; a
    setting the command line does not give comes from the file, not from the
    flag's default."""
    path = write(tmp_path, GOOD)
    given = given_settings(["--read-size", "32k", "--allow", "192.0.2.0/24"])
    config = load_settings(path, given).config
    assert config.read_size == 32768
    assert [str(network) for network in config.allow] == ["192.0.2.0/24"]
    assert config.header_timeout == 5.0  # from the file
    assert config.splice is False  # from the file: no --no-splice, and no default over it


def test_upstream_on_the_command_line_replaces_the_files_groups(tmp_path: Path) -> None:
    config = load_settings(
        write(tmp_path, GOOD), given_settings(["--upstream", "http://127.0.0.1:7"])
    ).config
    [group], _ = config.groups_and_routes()
    assert group.servers == (UpstreamServer("http", "127.0.0.1", 7),)
    assert config.upstreams == ()


def test_a_command_line_error_has_no_file_position(tmp_path: Path) -> None:
    """A bad value from the command line is not blamed on the file."""
    message = error_of(tmp_path, "read_size = 4096\n", given_settings(["--max-buffer-memory", "1"]))
    assert message == "max_buffer_memory must be at least read_size (4096), got 1"


def test_the_environment_sits_between_the_command_line_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'auth = "file:pw"\n')
    assert load_settings(path, {}).config.auth == "file:pw"
    monkeypatch.setenv("TRIOPROXY_AUTH", "env:pw")
    assert load_settings(path, {}).config.auth == "env:pw"
    assert load_settings(path, {"auth": "cli:pw"}).config.auth == "cli:pw"


def test_every_setting_has_a_key_a_file_accepts(tmp_path: Path) -> None:
    """Each setting's key, written with its default, reads back to the same
    configuration: the file speaks every key, in the types docs/config.md
    gives."""
    lines = []
    for spec in all_settings():
        if spec.default is None:
            continue
        default = spec.default_text
        assert default is not None
        if spec.kind == "flag":
            lines.append(f"{spec.key} = {str(spec.default).lower()}")
        elif spec.kind == "list":
            shown = spec.show(spec.default) if spec.show is not None else ",".join(spec.default)
            items = ", ".join(f'"{item}"' for item in shown.split(",") if item)
            lines.append(f"{spec.key} = [{items}]")
        elif spec.kind == "count":
            lines.append(f"{spec.key} = {default}")
        else:
            lines.append(f'{spec.key} = "{default}"')
    settings = load_settings(write(tmp_path, "\n".join(lines) + "\n"), {})
    defaults = load_settings(None, {})
    assert settings == defaults


@pytest.mark.parametrize(
    ("kind_value", "expected"),
    [(("read_size", 65536), 65536), (("read_size", "64k"), 65536), (("idle_timeout", 3), 3.0)],
)
def test_setting_value_takes_numbers_and_strings(
    kind_value: tuple[str, Any], expected: object
) -> None:
    key, value = kind_value
    [spec] = [spec for spec in all_settings() if spec.key == key]
    assert setting_value(spec, value) == expected


def test_key_lines_finds_keys_in_their_tables() -> None:
    """Plain, quoted and dotted keys, group tables, the Nth route, and keys
    inside a multi-line string are not mistaken for keys."""
    lines = KeyLines(
        textwrap.dedent(
            '''\
            a = 1
            "b" = 2
            note = """
            c = 3
            """
            upstream.x.servers = []
            [upstream."y"]
            servers = [
              "http://h=1",
            ]
            [[route]]
            upstream = "x"
            [[route]]
            upstream = "y"
            '''
        )
    )
    assert lines.line_of((), "a") == 1
    assert lines.line_of((), "b") == 2
    assert lines.line_of((), "c") is None
    assert lines.line_of(("upstream", "x"), "servers") == 6
    assert lines.line_of(("upstream", "y"), "servers") == 8
    assert lines.line_of(("upstream", "y"), "balance") == 7  # the table's header
    assert lines.line_of(("route", "0"), "upstream") == 12
    assert lines.line_of(("route", "1"), "upstream") == 14


def test_check_config_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--check-config FILE`` exits 0 with a summary for a good file, and 2
    with one line naming the line and key for a bad one; it never listens."""
    good = write(tmp_path, GOOD)
    main(["--check-config", good])
    out = capsys.readouterr().out
    assert out == f"{good}: valid (reverse mode, 2 routes, 2 upstream groups, 3 servers)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("max_fails = 3", 'max_fails = "3"'))
    with pytest.raises(SystemExit) as exited:
        main(["--check-config", str(bad)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.fullmatch(
        rf"trioproxy: error: {re.escape(str(bad))}:12: upstream\.api\.max_fails: .*\n", err
    )


def test_check_config_applies_the_other_flags(tmp_path: Path) -> None:
    """The file is checked together with the command line: a flag that makes
    it invalid fails the check."""
    path = write(tmp_path, GOOD)
    with pytest.raises(SystemExit) as exited:
        main(["--check-config", path, "--parent-proxy", "http://p:3128"])
    assert exited.value.code == 2
