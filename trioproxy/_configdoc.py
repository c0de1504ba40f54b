"""docs/config.md, made from the same field definitions as ``--help``.

Every key of a config file is documented by the field that defines it: a
setting's ``Setting`` (flag, help, kind, default, ``restart``), an upstream
group's ``GroupSpec`` field and a route's ``Route`` field (their metadata's
``help`` and ``example``). ``render_config_doc`` writes the page;
``scripts/config_doc.py`` saves it, and a test checks that the saved page is
what this renders, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs

from ._balance import GroupSpec
from ._config import GROUPS, KINDS, Setting, all_settings
from ._routes import Route

EXAMPLE = """\
# Two services, three backends.
listen = "0.0.0.0:8080"
max_buffer_memory = "64MiB"
header_timeout = "20s"
allow = ["0.0.0.0/0", "::/0"]

[upstream.api]
servers = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
balance = "least_conn"
max_fails = 3
fail_timeout = "10s"
health_check = "/healthz"
health_interval = "5s"

[upstream.static]
servers = ["http://127.0.0.1:9100"]

[[route]]
host = "api.example.test"
path_prefix = "/v1/"
upstream = "api"

[[route]]
upstream = "static"
"""
"""The example at the top of the page (tests load it)."""

_INTRO = """\
# The config file

<!-- Made by scripts/config_doc.py from the field definitions in
trioproxy/_config.py, trioproxy/_balance.py (GroupSpec) and
trioproxy/_routes.py (Route). Do not edit: change the fields and run
`python scripts/config_doc.py`. tests/test_config_doc.py checks it. -->

`trioproxy --config FILE` reads settings, upstream groups and routes from a
[TOML](https://toml.io) file. Every flag has a key: the flag's long name with
`_` for `-` (`--max-buffer-memory` is `max_buffer_memory`; a `--no-` flag's key
is what it turns off: `splice = false`). Sizes and durations are numbers
(bytes, seconds) or strings with a unit (`"64KiB"`, `"20s"`).

- **Precedence**: a flag on the command line, then an environment variable
  (`TRIOPROXY_AUTH`), then the file, then the default. `--upstream URL` on the
  command line replaces the file's groups and routes.
- **Errors**: an unknown key, a wrong type or a bad value ends with one line
  naming the file, the line and the key, and exit status 2.
  `trioproxy --check-config FILE` validates (with the other flags) and exits:
  0 when valid, 2 when not.
- **Reload**: `kill -HUP PID` re-reads the file. New exchanges follow the new
  routes and groups; exchanges in flight and idle keep-alive connections go
  on undisturbed; idle connections to removed servers are closed, busy ones
  when their exchange ends. A file that fails validation is one error line,
  and the running configuration stays. Keys marked *restart* keep their old
  value (a warning says so). With `--workers N`, signal the supervisor: it
  validates once and passes SIGHUP to every worker.

## Example

```toml
"""

_GROUPS_INTRO = """\
## Upstream groups: `[upstream.NAME]`

A group is the servers that serve one upstream name, with load balancing and
health. `upstream = "http://HOST:PORT"` at the top level is the one-line
form (as `--upstream`): one group named `default` with that one server, and
one default route to it. A group of one server is never taken out by passive
health (there is nowhere else to send its requests).

Passive health (nginx's semantics): a connect failure or a connection broken
before the response head is a failure of that server; `max_fails` of them
within `fail_timeout` take it out for `fail_timeout`, after which one request
tries it again (success: back in; failure: out for another `fail_timeout`).
A request whose connection could not be made is sent once to the next server,
whatever its method; a GET, HEAD or OPTIONS without a body whose connection
broke before any response byte is too. When every server of a group is out,
the answer is 502 at once.

| key | value | default | what it does | example |
|---|---|---|---|---|
"""

_ROUTES_INTRO = """\
## Routes: `[[route]]`

Routes are tried in the order written; the first match wins. A route with
neither `host` nor `path_prefix` is the default route, and must be the last.
A request that no route matches gets 404.

| key | value | default | what it does | example |
|---|---|---|---|---|
"""


def _toml(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value))


def _setting_default(spec: Setting) -> str:
    if spec.default is None:
        return "none"
    if spec.kind == "list":
        shown = spec.show(spec.default) if spec.show is not None else ",".join(spec.default)
        return _toml([item for item in shown.split(",") if item])
    if spec.kind in ("flag", "count", "size", "duration"):
        return _toml(spec.default)
    return _toml(spec.default_text)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _setting_rows() -> Iterator[str]:
    group = None
    for spec in all_settings():
        if spec.group != group:
            group = spec.group
            yield f"\n### {group}: {GROUPS[group]}\n\n"
            yield "| key | flag | value | default | what it does |\n|---|---|---|---|---|\n"
        flag = spec.flag if spec.metavar is None else f"{spec.flag} {spec.metavar}"
        value = KINDS[spec.kind] if spec.choices is None else " or ".join(spec.choices)
        restart = " *(restart)*" if spec.restart else ""
        # A --no- flag's key is what it turns off: say what false does.
        what = f"false: {spec.help}" if spec.action == "store_false" else spec.help
        yield (
            f"| `{spec.key}` | `{_cell(flag)}` | {_cell(value)} "
            f"| `{_cell(_setting_default(spec))}` | {_cell(what)}{restart} |\n"
        )


def _table_rows(fields: tuple[attrs.Attribute[Any], ...]) -> str:
    rows = []
    for field in fields:
        default = "required" if field.default is attrs.NOTHING else f"`{_toml_or_none(field)}`"
        rows.append(
            f"| `{field.name}` | {_cell(field.metadata['value'])} | {default} "
            f"| {_cell(field.metadata['help'])} | `{_cell(field.metadata['example'])}` |\n"
        )
    return "".join(rows)


def _toml_or_none(field: attrs.Attribute[Any]) -> str:
    return "none" if field.default is None else _toml(field.default)


def render_config_doc() -> str:
    """The whole of docs/config.md."""
    route_fields: tuple[attrs.Attribute[Any], ...] = tuple(attrs.fields(Route))
    return "".join(
        [
            _INTRO,
            EXAMPLE,
            "```\n\n## Settings\n",
            *_setting_rows(),
            "\n",
            _GROUPS_INTRO,
            _table_rows(GroupSpec.table_keys()),
            "\n",
            _ROUTES_INTRO,
            _table_rows(route_fields),
        ]
    )
