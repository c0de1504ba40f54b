"""Each setting written once: fields -> argparse -> fields (trioproxy/_config, _cli)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs
import pytest

from trioproxy import ProxyConfig
from trioproxy._cli import build_parser, config_from_args, log_settings_from_args
from trioproxy._config import (
    GROUPS,
    LogSettings,
    Setting,
    all_settings,
    from_values,
    parse_listen,
    setting,
    settings_of,
)
from trioproxy._units import UNITS_HELP

# One non-default way to write each setting, and the fields it must give.
# A new setting needs a line here, or test_every_setting_has_an_example fails.
EXAMPLES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "listen": (["--listen", "[::1]:9000"], {"listen_host": "::1", "listen_port": 9000}),
    "workers": (["--workers", "2"], {"workers": 2}),
    "max_connections": (["--max-connections", "7"], {"max_connections": 7}),
    "max_head_size": (["--max-head-size", "16k"], {"max_head_size": 16_384}),
    "max_header_fields": (["--max-header-fields", "9"], {"max_header_fields": 9}),
    "max_target_length": (["--max-target-length", "2kB"], {"max_target_length": 2000}),
    "connect_timeout": (["--connect-timeout", "500ms"], {"connect_timeout": 0.5}),
    "upstream_timeout": (["--upstream-timeout", "2m"], {"upstream_timeout": 120.0}),
    "header_timeout": (["--header-timeout", "5s"], {"header_timeout": 5.0}),
    "idle_timeout": (["--idle-timeout", "6"], {"idle_timeout": 6.0}),
    "stall_timeout": (["--stall-timeout", "1.5"], {"stall_timeout": 1.5}),
    "shutdown_timeout": (["--shutdown-timeout", "0"], {"shutdown_timeout": 0.0}),
    "read_size": (["--read-size", "16KiB"], {"read_size": 16_384}),
    "buffer_chunks": (["--buffer-chunks", "2"], {"buffer_chunks": 2}),
    "max_buffer_memory": (["--max-buffer-memory", "100MB"], {"max_buffer_memory": 100_000_000}),
    "splice": (["--no-splice"], {"splice": False}),
    "upstream": (["--upstream", "http://origin.test:81"], {"upstream": "http://origin.test:81"}),
    "upstream_pool_size": (["--upstream-pool-size", "0"], {"upstream_pool_size": 0}),
    "upstream_pool_total": (["--upstream-pool-total", "5"], {"upstream_pool_total": 5}),
    "upstream_idle_timeout": (["--upstream-idle-timeout", "1m"], {"upstream_idle_timeout": 60}),
    "allow": (["--allow", "10.0.0.0/8", "--allow", "::1"], {"allow": ["10.0.0.0/8", "::1"]}),
    "connect_ports": (["--connect-ports", "443,9000-9100"], {"connect_ports": "443,9000-9100"}),
    "auth": (["--auth", "u:p"], {"auth": "u:p"}),
    "metrics": (["--metrics", "127.0.0.1:9100"], {"metrics_listen": ("127.0.0.1", 9100)}),
    "log_level": (["--log-level", "debug"], {"log_level": "debug"}),
    "log_format": (["--log-format", "json"], {"log_format": "json"}),
    "access_log": (["--access-log", "off"], {"access_log": "off"}),
    "access_log_buffer": (["--access-log-buffer", "64KiB"], {"access_log_buffer": 64 * 1024}),
    "parent_proxy": (["--parent-proxy", "http://p:3128"], {"parent_proxy": "http://p:3128"}),
    "no_parent_for": (["--no-parent-for", ".corp.test"], {"no_parent_for": [".corp.test"]}),
    "proxy_protocol": (["--proxy-protocol"], {"proxy_protocol": True}),
    "proxy_protocol_from": (
        ["--proxy-protocol-from", "10.0.0.0/8"],
        {"proxy_protocol_from": ["10.0.0.0/8"]},
    ),
    "upstream_send_proxy": (["--upstream-send-proxy", "v2"], {"upstream_send_proxy": "v2"}),
    "tls_cert": (["--tls-cert", "a.pem", "--tls-cert", "b.pem"], {"tls_cert": ["a.pem", "b.pem"]}),
    "tls_key": (["--tls-key", "a.key"], {"tls_key": ["a.key"]}),
    "tls_handshake_timeout": (["--tls-handshake-timeout", "3s"], {"tls_handshake_timeout": 3.0}),
    "upstream_ca": (["--upstream-ca", "ca.pem"], {"upstream_ca": "ca.pem"}),
    "upstream_insecure": (["--upstream-insecure"], {"upstream_insecure": True}),
    "upstream_sni": (["--upstream-sni", "o.test"], {"upstream_sni": "o.test"}),
    "upstream_cert": (["--upstream-cert", "c.pem"], {"upstream_cert": "c.pem"}),
    "upstream_key": (["--upstream-key", "c.key"], {"upstream_key": "c.key"}),
}

# Settings that only mean something beside another one: the other's flags and
# fields, given too when the setting's example is built (and not counted as
# what the example changes).
BESIDE: dict[str, tuple[list[str], dict[str, Any]]] = {
    "tls_key": (["--tls-cert", "a.pem"], {"tls_cert": ["a.pem"]}),
    "upstream_sni": (["--upstream", "https://o.test"], {"upstream": "https://o.test"}),
    "upstream_cert": (["--upstream", "https://o.test"], {"upstream": "https://o.test"}),
    "upstream_key": (
        ["--upstream", "https://o.test", "--upstream-cert", "c.pem"],
        {"upstream": "https://o.test", "upstream_cert": "c.pem"},
    ),
}

# ProxyConfig fields that no flag sets, on purpose.
NO_FLAG = {
    "reuse_port",  # set for worker processes, never by a person
    "upstreams",  # a config file's [upstream.NAME] tables (tests/test_configfile.py)
    "routes",  # a config file's [[route]] tables
}


@pytest.fixture(autouse=True)
def no_auth_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIOPROXY_AUTH", raising=False)


def owner(spec: Setting) -> type[ProxyConfig] | type[LogSettings]:
    return ProxyConfig if spec in settings_of(ProxyConfig) else LogSettings


def built(argv: list[str]) -> tuple[ProxyConfig, LogSettings]:
    args = build_parser().parse_args(argv)
    return config_from_args(args), log_settings_from_args(args)


def test_every_setting_has_an_example() -> None:
    """The table above covers every setting, so the next test covers every flag."""
    assert set(EXAMPLES) == {spec.key for spec in all_settings()}


@pytest.mark.parametrize("spec", all_settings(), ids=lambda spec: spec.key)
def test_each_flag_sets_its_fields(spec: Setting) -> None:
    """A flag written on the command line reaches its field(s), changed from
    the default, and no other field changes."""
    argv, fields = EXAMPLES[spec.key]
    beside_argv, beside = BESIDE.get(spec.key, ([], {}))
    expected = owner(spec)(**fields, **beside)  # the same value, written in Python
    default = owner(spec)(**beside)
    built_both = built([*beside_argv, *argv])
    result = dict(zip((ProxyConfig, LogSettings), built_both, strict=True))[owner(spec)]
    assert result == expected
    changed = {name for name in fields if getattr(result, name) != getattr(default, name)}
    assert changed == set(fields)
    assert set(spec.fields) == set(fields)


@pytest.mark.parametrize(
    "spec",
    [spec for spec in all_settings() if spec.default_text is not None],
    ids=lambda spec: spec.key,
)
def test_the_default_written_out_round_trips(spec: Setting) -> None:
    """Writing a setting's default as ``--help`` shows it gives the default
    config: ``show`` and ``parse`` are each other's inverse."""
    assert spec.default_text is not None
    if spec.action in ("store_false", "store_true"):
        argv = []
    elif spec.action == "append":  # one flag per item
        argv = [text for item in spec.default for text in (spec.flag, str(item))]
    else:
        argv = [spec.flag, spec.default_text]
    assert built(argv) == built([]) == (ProxyConfig(), LogSettings())


def test_every_field_is_a_setting_or_deliberately_not() -> None:
    """A ProxyConfig field gets a flag by its definition alone; the only
    fields without one are listed in NO_FLAG."""
    covered = {name for spec in settings_of(ProxyConfig) for name in spec.fields}
    names = {field.name for field in attrs.fields(ProxyConfig)}
    assert names - covered == NO_FLAG
    assert {field.name for field in attrs.fields(LogSettings)} == {
        name for spec in settings_of(LogSettings) for name in spec.fields
    }


def test_help_lists_every_setting_once_in_its_group() -> None:
    """``--help`` has one entry per setting, under its group's title, in
    GROUPS order, after the config file's two, and states the units rule."""
    text = build_parser().format_help()
    options = text.split("\noptions:\n", 1)[1]
    entries = [line.split()[0] for line in options.splitlines() if line.startswith("  --")]
    assert entries == ["--config", "--check-config", *(spec.flag for spec in all_settings())]
    positions = [options.index(f"\n{group}:\n  {about}") for group, about in GROUPS.items()]
    assert positions == sorted(positions)
    for spec in all_settings():
        entry = re.search(rf"^  {re.escape(spec.flag)}(?![\w-])", options, re.MULTILINE)
        assert entry is not None
        before = options[: entry.start()]
        assert re.findall(r"^(\w+):$", before, re.MULTILINE)[-1] == spec.group, spec.flag
    assert " ".join(UNITS_HELP.split()) in " ".join(text.split())


def test_settings_are_unique() -> None:
    """No two settings share a flag, a key, or a field."""
    settings = all_settings()
    for attribute in ("flag", "key"):
        values = [getattr(spec, attribute) for spec in settings]
        assert len(values) == len(set(values)), attribute
    fields = [(owner(spec), name) for spec in settings for name in spec.fields]
    assert len(fields) == len(set(fields))


@pytest.mark.parametrize(
    ("text", "seconds"), [("20s", 20.0), ("500ms", 0.5), ("20", 20.0), ("0.5", 0.5), ("2m", 120.0)]
)
def test_duration_flags_take_units(text: str, seconds: float) -> None:
    """Every duration flag takes 20s and 500ms as well as plain seconds."""
    durations = [spec for spec in all_settings() if spec.metavar == "SECONDS"]
    assert len(durations) == 8
    for spec in durations:
        config, _ = built([spec.flag, text])
        assert getattr(config, spec.fields[0]) == seconds, spec.flag


@pytest.mark.parametrize(
    ("text", "size"), [("64k", 65_536), ("64KiB", 65_536), ("64kB", 64_000), ("65536", 65_536)]
)
def test_size_flags_follow_the_one_rule(text: str, size: int) -> None:
    """Every size flag reads k as 1024 and kB as 1000."""
    sizes = [spec for spec in all_settings() if spec.metavar == "BYTES"]
    assert len(sizes) == 5
    for spec in sizes:
        # A budget below one read_size is refused: make room for 64 KiB.
        argv = [spec.flag, text] + ([] if spec.key == "read_size" else ["--read-size", "1k"])
        config, log = built(argv)
        holder = log if spec.key == "access_log_buffer" else config
        assert getattr(holder, spec.fields[0]) == size, spec.flag


def test_a_bad_size_names_the_flag_and_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """A size argparse cannot read ends with status 2, naming the flag, the
    text, and how to write it."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--read-size", "64 apples"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--read-size" in err
    assert "'64 apples' has the unknown unit 'apples'" in err
    assert err.count("\n") == 1


# ---- The mechanism, on a class of its own ----


@attrs.frozen(kw_only=True)
class Example:
    host: str = attrs.field(
        default="a",
        metadata=setting(
            "--where", group="listen", parse=parse_listen, help="h", sets=("host", "port")
        ),
    )
    port: int = 1
    names: tuple[str, ...] = attrs.field(
        default=("x",), metadata=setting("--name", group="access", help="n")
    )
    secret: str | None = attrs.field(
        default=None, metadata=setting("--secret", group="access", env="EXAMPLE_SECRET", help="s")
    )


def test_a_field_with_setting_metadata_is_a_setting() -> None:
    """settings_of finds the fields, completes fields and default, and keys
    follow the flag."""
    where, names, secret = settings_of(Example)
    assert (where.key, where.fields, where.default) == ("where", ("host", "port"), ("a", 1))
    assert (names.key, names.fields, names.default) == ("name", ("names",), ("x",))
    assert secret.env == "EXAMPLE_SECRET"


def test_from_values_spreads_falls_back_and_keeps_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tuple value spreads over its fields; None keeps the default; a
    missing or empty value with an environment variable reads it."""
    monkeypatch.setenv("EXAMPLE_SECRET", "from-env")
    built_example = from_values(Example, {"where": ("b", 2), "name": None, "secret": ""})
    assert built_example == Example(host="b", port=2, names=("x",), secret="from-env")
    monkeypatch.delenv("EXAMPLE_SECRET")
    assert from_values(Example, {}) == Example()
    assert from_values(Example, {"secret": "given"}).secret == "given"


def test_an_unknown_group_is_refused() -> None:
    """A typo in a group name fails where the field is defined."""
    with pytest.raises(ValueError, match="unknown group 'memroy'"):
        setting("--x", group="memroy", help="x")


def test_the_namespace_keeps_its_names() -> None:
    """Code that reads argparse's namespace (the worker command, scripts)
    finds the names it always did."""
    args = build_parser().parse_args(["--listen", "[::1]:1", "--metrics", "127.0.0.1:2"])
    assert args.listen == ("::1", 1)
    assert args.metrics == ("127.0.0.1", 2)
    assert args.splice is True
    assert args.allow is None
    assert args.connect_ports == "443"
    config, _ = built(["--allow", "192.0.2.0/24"])
    assert config.allow == (ipaddress.ip_network("192.0.2.0/24"),)
