"""The config file: TOML read with ``tomllib``, one key per setting, plus
upstream groups and routes.

Every setting has a key: its flag's long name with ``_`` for ``-``
(``Setting.key``: ``max_buffer_memory = "64MiB"``, ``header_timeout =
"20s"``, ``allow = ["127.0.0.0/8"]``; a ``--no-`` flag's key is the field
it turns off: ``splice = false``). Sizes and durations may be numbers
(bytes, seconds) or strings with a unit (``_units``). Besides the settings:

* ``[upstream.NAME]`` tables define upstream groups (``GroupSpec``: their
  keys are its fields); ``upstream = "http://host:port"`` is the one-line
  form, as ``--upstream``. TOML itself refuses a key that is both.
* ``[[route]]`` tables, tried in order (``_routes``): ``host``,
  ``path_prefix``, ``upstream``.

Precedence: a flag on the command line, then a setting's environment
variable (``TRIOPROXY_AUTH``), then the file, then the default. A
``--upstream`` flag replaces the file's groups and routes with its one.

Errors name the file, the line and the key, and the CLI exits with status
2. tomllib gives the line of a syntax error; for a bad value (a size that
is not one, an undefined group) this module finds the key's line by
scanning the text (``KeyLines``): the first line ``key = ...`` (plain,
quoted or dotted) inside the table the value came from (the top level,
``[upstream.NAME]``, or the Nth ``[[route]]``). It is a scan, not a second
parser: a key inside an inline table is found by its table's line, and a
message may come without a line; it still names the key. For an error that
``ProxyConfig`` finds across fields, the key is the first setting name the
message mentions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from ._balance import GroupSpec
from ._config import (
    KINDS,
    LogSettings,
    ProxyConfig,
    Setting,
    all_settings,
    from_values,
)
from ._routes import Route, RouteError, RouteTable

Table = tuple[str, ...]
"""Where a key sits: ``()`` the top level, ``("upstream", "api")``, or
``("route", "2")`` for the third ``[[route]]`` (counted from 0)."""

_BARE_OR_QUOTED = r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'"""
_HEADER = re.compile(r"\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(rf"\s*((?:{_BARE_OR_QUOTED})(?:\s*\.\s*(?:{_BARE_OR_QUOTED}))*)\s*=")
_TOML_LINE = re.compile(r"at line (\d+)")
_MULTILINE_QUOTES = ('"""', "'''")
_GROUP_KEY = re.compile(r"upstream\.([^.:]+)\.(\w+): ")


class ConfigError(ValueError):
    """A configuration that cannot be used, and where it says so.

    Attributes:
        message: what is wrong.
        path: the config file, or None for an error in flags alone.
        line: the line of the file (from 1), when it is known.
        key: the key at fault (``read_size``, ``upstream.api.servers``,
            ``route[2].upstream``), when it is known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.key = key

    def __str__(self) -> str:
        text = self.message
        if self.key is not None and not text.startswith(self.key):
            text = f"{self.key}: {text}"
        where = self.path or ""
        if where and self.line is not None:
            where += f":{self.line}"
        return f"{where}: {text}" if where else text


def _names(dotted: str) -> list[str]:
    """``upstream."a.b".servers`` -> ``["upstream", "a.b", "servers"]``."""
    return [part.strip("\"'") for part in re.findall(_BARE_OR_QUOTED, dotted)]


class KeyLines:
    """Where each table header and key of a TOML text is: see the module notes.

    Memory: one dict entry per header and key line of the file.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[Table, str | None], int] = {}
        table: Table = ()
        routes = 0
        in_string = False
        for number, line in enumerate(text.splitlines(), start=1):
            opens = sum(line.count(quotes) for quotes in _MULTILINE_QUOTES) % 2 == 1
            if in_string:
                in_string = not opens
                continue
            header = _HEADER.match(line)
            if header is not None:
                names = tuple(_names(header.group(2)))
                if header.group(1) == "[[" and names == ("route",):
                    names, routes = ("route", str(routes)), routes + 1
                table = names
                self._lines.setdefault((table, None), number)
                continue
            key = _KEY.match(line)
            if key is not None:
                parts = _names(key.group(1))
                for end in range(1, len(parts)):
                    self._lines.setdefault((table + tuple(parts[:end]), None), number)
                self._lines.setdefault((table + tuple(parts[:-1]), parts[-1]), number)
            in_string = opens

    def line_of(self, table: Table, key: str | None = None) -> int | None:
        """The line of ``key`` in ``table``, else of the table's header (or
        first key), else None."""
        found = self._lines.get((table, key))
        return found if found is not None else self._lines.get((table, None))


@attrs.frozen
class ConfigFile:
    """What a config file says, checked key by key.

    Attributes:
        path: the file.
        values: setting key -> value, as a command line flag gives it.
        upstreams: the ``[upstream.NAME]`` groups.
        routes: the ``[[route]]`` tables, or None for none.
        lines: where each key is, for errors found later.
    """

    path: str
    values: dict[str, Any]
    upstreams: tuple[GroupSpec, ...]
    routes: RouteTable | None
    lines: KeyLines

    def error(
        self, message: str, table: Table = (), key: str | None = None, *, named: bool = False
    ) -> ConfigError:
        """A ``ConfigError`` at ``key`` of ``table`` in this file; ``named``:
        the message already names the place (a ``RouteError``)."""
        line = self.lines.line_of(table, key)
        return ConfigError(
            message, path=self.path, line=line, key=None if named else _key_name(table, key)
        )


def _key_name(table: Table, key: str | None) -> str | None:
    if table[:1] == ("route",) and len(table) == 2:
        prefix = f"route[{int(table[1]) + 1}]"
        return prefix if key is None else f"{prefix}.{key}"
    names = [*table, key] if key is not None else list(table)
    return ".".join(names) or None


def read_config_file(path: str) -> ConfigFile:
    """Read, parse and check ``path``; see the module notes.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or a key is
            unknown, of the wrong type or has a bad value.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the config file: {reason}", path=path) from None
    import tomllib  # here, not at the top: only a config file needs it (~150 KiB of RSS)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line = int(found.group(1)) if found else len(text.splitlines()) or None
        raise ConfigError(f"not valid TOML: {exc}", path=path, line=line) from None
    empty = ConfigFile(path, {}, (), None, KeyLines(text))
    return _checked(empty, data)


def _checked(file: ConfigFile, data: dict[str, Any]) -> ConfigFile:
    """``file`` with the values, groups and routes of ``data``, each checked."""
    by_key = {spec.key: spec for spec in all_settings()}
    values: dict[str, Any] = {}
    upstreams: tuple[GroupSpec, ...] = ()
    routes: RouteTable | None = None
    for key, value in data.items():
        if key == "upstream" and isinstance(value, dict):
            upstreams = _groups(file, value)
        elif key == "route":
            routes = _routes(file, value)
        elif key in by_key:
            try:
                values[key] = setting_value(by_key[key], value)
            except ValueError as exc:
                raise file.error(str(exc), (), key) from None
        else:
            raise file.error(_unknown(key, [*by_key, "route"]), (), key)
    return attrs.evolve(file, values=values, upstreams=upstreams, routes=routes)


def _unknown(key: str, known: list[str]) -> str:
    import difflib  # only on this error path

    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; docs/config.md lists every key"


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "a table")


def setting_value(spec: Setting, value: Any) -> Any:
    """The value of ``spec`` that a config file writes as ``value``, as the
    command line would give it (parsed the same way).

    Raises:
        ValueError: for a value of the wrong type (see ``KINDS``) or a bad one.
    """
    kind = spec.kind
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "flag" and isinstance(value, bool):
        return value
    if kind == "list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [spec.parse(v) for v in value] if spec.parse is not None else list(value)
    if kind in ("count", "size") and number and isinstance(value, int):
        return value
    if kind == "duration" and number:
        return float(value)
    if kind not in ("flag", "list", "count") and isinstance(value, str):
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"must be one of {', '.join(spec.choices)}, got {value!r}")
        return spec.parse(value) if spec.parse is not None else value
    raise ValueError(f"expected {KINDS[kind]}, got {_type_name(value)}")


def _check_field(cls: type[attrs.AttrsInstance], name: str, value: Any) -> None:
    """Run the converter and validator of one field of ``cls`` on ``value``
    (validators that do not look at the instance only)."""
    field = attrs.fields_dict(cls)[name]
    if callable(field.converter):
        value = field.converter(value)
    if field.validator is not None:
        field.validator(None, field, value)


def _check_table(
    file: ConfigFile,
    where: Table,
    table: dict[str, Any],
    cls: type[attrs.AttrsInstance],
    known: list[str],
    *,
    text_only: bool = False,
) -> None:
    """Check each key of ``table`` (an instance of ``cls`` as written) on its own."""
    for key, value in table.items():
        if key not in known:
            raise file.error(_unknown(key, known), where, key)
        if text_only and not isinstance(value, str):
            raise file.error(f"expected a string, got {_type_name(value)}", where, key)
        try:
            _check_field(cls, key, value)
        except ValueError as exc:
            raise file.error(str(exc), where, key) from None


def _groups(file: ConfigFile, tables: dict[str, Any]) -> tuple[GroupSpec, ...]:
    known = [field.name for field in GroupSpec.table_keys()]
    groups = []
    for name, table in tables.items():
        where: Table = ("upstream", name)
        if not isinstance(table, dict):
            raise file.error("an upstream group is a table: [upstream.NAME]", ("upstream",), name)
        _check_table(file, where, table, GroupSpec, known)
        if "servers" not in table:
            raise file.error("servers is required: the group's server URLs", where)
        try:
            groups.append(GroupSpec(name=name, **table))
        except ValueError as exc:
            raise file.error(str(exc), where) from None
    return tuple(groups)


def _routes(file: ConfigFile, tables: Any) -> RouteTable:
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise file.error("write each route as a [[route]] table", (), "route")
    known = [field.name for field in attrs.fields(Route)]
    routes = []
    for index, table in enumerate(tables):
        where: Table = ("route", str(index))
        _check_table(file, where, table, Route, known, text_only=True)
        if "upstream" not in table:
            raise file.error("upstream is required: the group this route sends to", where)
        routes.append(Route(**table))
    try:
        return RouteTable(routes)
    except RouteError as exc:
        raise file.error(str(exc), ("route", str(exc.index)), named=True) from None


@attrs.frozen
class Settings:
    """Everything a command line and a config file set."""

    config: ProxyConfig
    log: LogSettings


def load_settings(
    path: str | None, given: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> Settings:
    """The settings of the flags ``given`` (setting key -> value, only those
    on the command line) over ``path``'s, if there is a file.

    Raises:
        ConfigError: naming the file, line and key where there is one.
    """
    file = read_config_file(path) if path is not None else None
    values = dict(file.values) if file is not None else {}
    for spec in all_settings():
        if spec.env is not None and environ.get(spec.env):
            values[spec.key] = environ[spec.env]
    values.update(given)
    front: dict[str, Any] = {}
    if file is not None and "upstream" not in given:
        front = {"upstreams": file.upstreams, "routes": file.routes}
    try:
        return Settings(from_values(ProxyConfig, values, **front), from_values(LogSettings, values))
    except RouteError as exc:
        assert file is not None  # only a file writes routes
        raise file.error(str(exc), ("route", str(exc.index)), "upstream", named=True) from None
    except ValueError as exc:
        raise _located(str(exc), file, given) from None


def _located(message: str, file: ConfigFile | None, given: Mapping[str, Any]) -> ConfigError:
    """An error ``ProxyConfig`` found across fields, at the first setting key
    its message names (at the file's line of it, when the file set it).
    A message about a group's key (``upstream.api.servers: ...``) is placed
    at that key of the group's table."""
    group_key = _GROUP_KEY.match(message)
    if file is not None and group_key is not None:
        return file.error(message, ("upstream", group_key[1]), group_key[2])
    mentions = []
    for spec in all_settings():
        for name in {spec.key, *spec.fields}:
            found = re.search(rf"\b{re.escape(name)}\b", message)
            if found is not None:
                mentions.append((found.start(), spec.key))
    key = min(mentions)[1] if mentions else None
    if file is None or key in given:
        return ConfigError(message)
    if key is None or key not in file.values:
        return ConfigError(message, path=file.path)
    return file.error(message, (), key)
