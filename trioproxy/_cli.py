"""Command line: argparse (and a config file) -> ProxyConfig -> trio.run(serve).

The CLI only builds a ProxyConfig (and the LogSettings); all validation lives
there. Its flags are not written here: each is generated from a settings
field (``_config.all_settings``), with its help, default and parser. Any bad
flag or value ends with one line on stderr and exit status 2, never a
traceback.

``--config FILE`` reads the settings, upstream groups and routes from a TOML
file (``_configfile``); flags given on the command line win over it.
``--check-config FILE`` validates and exits (0, or 2 with the error).
With a config file, SIGHUP reloads it: a file that fails validation is
logged in one line and changes nothing; a valid one is sent to the server
(``_reload``), and the log settings are applied again (which also reopens
the access log file, for log rotation). With ``--workers N`` the supervisor
validates the file once and passes SIGHUP on to every worker, which reloads
it in turn.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from ._accesslog import (
    AccessLogBuffer,
    JsonFormatter,
    access_logger,
    flush_access_log,
    flush_access_log_forever,
    use_access_log_buffer,
)
from ._config import AUTH_ENVIRONMENT_VARIABLE as AUTH_ENVIRONMENT_VARIABLE
from ._config import (
    GROUPS,
    LogSettings,
    ProxyConfig,
    Setting,
    all_settings,
    format_listen,
    from_values,
)
from ._config import parse_listen as parse_listen
from ._configfile import Settings, load_settings
from ._limits import descriptors_needed, raise_open_file_limit
from ._listen import listening_line
from ._memory import prepare_process_memory
from ._metrics import startup_summary
from ._server import serve
from ._tls_legs import prepare_tls
from ._units import UNITS_HELP, for_argparse
from ._units import parse_size as parse_size
from ._version import VERSION

logger = logging.getLogger("trioproxy")

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ACCESS_TEXT_FORMAT = "%(asctime)s %(message)s"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts read stderr.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(*, defaults: bool = True) -> argparse.ArgumentParser:
    """The ``trioproxy`` command line: one flag per setting (``all_settings``),
    in one argument group per ``GROUPS`` entry. Without ``defaults``, a
    setting not on the command line is left out of the namespace."""
    parser = _Parser(
        prog="trioproxy",
        description=(
            "A streaming HTTP/1.1 proxy whose memory per connection is bounded: "
            "(buffer-chunks + 2) x read-size bytes per direction."
        ),
        epilog=UNITS_HELP,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"trioproxy {VERSION}")
    files = parser.add_argument_group("config file", "settings, upstream groups and routes (TOML)")
    files.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (docs/config.md); flags win over it; "
        "SIGHUP reloads it",
    )
    files.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate this TOML file with the other flags, print the result, and exit "
        "(0: valid, 2: not)",
    )
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    for spec in all_settings():
        _add_flag(groups[spec.group], spec, defaults=defaults)
    return parser


def given_settings(argv: Sequence[str]) -> dict[str, Any]:
    """The settings the command line ``argv`` gives, by key: only the flags
    written there (a config file must not be overridden by defaults)."""
    given = vars(build_parser(defaults=False).parse_args(argv))
    return {spec.key: given[spec.key] for spec in all_settings() if spec.key in given}


def _add_flag(group: argparse._ArgumentGroup, spec: Setting, *, defaults: bool = True) -> None:
    """Add ``spec``'s flag, with the field's default. A setting with ``show``
    gets its default as text, which ``--help`` prints as a person writes it
    and argparse passes through ``type``. A repeatable flag or one with an
    environment variable gets None (the field's default then applies), so
    that ``--help`` shows neither the list it replaces nor a secret. Without
    ``defaults``: none at all (``argparse.SUPPRESS``)."""
    if spec.action in ("store_false", "store_true"):
        unset: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
        group.add_argument(spec.flag, dest=spec.key, action=spec.action, help=spec.help, **unset)
        return
    default = None if spec.action == "append" or spec.env else spec.default
    if spec.show is not None and default is not None:
        default = spec.show(default)
    if not defaults:
        default = argparse.SUPPRESS
    options: dict[str, Any] = {}
    if spec.parse is not None:
        options["type"] = for_argparse(spec.parse)
    group.add_argument(
        spec.flag,
        dest=spec.key,
        action=spec.action,
        default=default,
        metavar=spec.metavar,
        choices=spec.choices,
        help=spec.help,
        **options,
    )


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the ProxyConfig; raises ValueError with a message for bad values."""
    return from_values(ProxyConfig, vars(args))


def log_settings_from_args(args: argparse.Namespace) -> LogSettings:
    """Build the LogSettings; raises ValueError with a message for bad values."""
    return from_values(LogSettings, vars(args))


def configure_logging(settings: LogSettings) -> None:
    """Diagnostics to stderr at ``--log-level``; the access log at info level
    to ``--access-log``, whatever ``--log-level`` says, and not duplicated
    into the diagnostics. Again on a reload: the access log file is opened
    anew (after a rotation), and nothing changes if it cannot be.

    Raises:
        OSError: the access log file cannot be opened.
    """

    def formatter(text_format: str) -> logging.Formatter:
        return JsonFormatter() if settings.log_format == "json" else logging.Formatter(text_format)

    access_handler: logging.StreamHandler[Any] | None = None
    if settings.access_log != "off":
        access_handler = (
            logging.StreamHandler(sys.stderr)
            if settings.access_log == "-"
            else logging.FileHandler(settings.access_log, encoding="utf-8")
        )
        access_handler.setFormatter(formatter(_ACCESS_TEXT_FORMAT))
    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(formatter(_TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[diagnostics], force=True)
    access_logger.propagate = False
    use_access_log_buffer(None)  # writes the old buffer's lines before its file closes
    for old in list(access_logger.handlers):
        access_logger.removeHandler(old)
        old.close()
    if access_handler is None:
        access_logger.setLevel(logging.CRITICAL + 1)
        return
    access_logger.addHandler(access_handler)
    access_logger.setLevel(logging.INFO)
    if settings.access_log_buffer > 0:  # the lines skip logging; see _accesslog
        buffer = AccessLogBuffer(
            access_handler.stream,
            max_bytes=settings.access_log_buffer,
            json_format=settings.log_format == "json",
        )
        use_access_log_buffer(buffer)


def _check_open_file_limit(config: ProxyConfig) -> None:
    limit = raise_open_file_limit()
    if limit is None:
        return
    logger.info("open file limit: %d", limit)
    needed = descriptors_needed(config.max_connections)
    if limit < needed:
        logger.warning(
            "open file limit %d is below the %d that --max-connections %d may need",
            limit,
            needed,
            config.max_connections,
        )


Loader = Callable[[], Settings]
"""Reads the settings again (the config file under the command line's flags)."""


if TYPE_CHECKING:
    from ._workers import WorkerLink

# What every variable the supervisor hands a worker starts with
# (``_workers.WORKER_FD_ENV``, ``WORKER_INDEX_ENV``). ``_workers`` is imported
# only by a supervisor and its workers: one process alone never needs it
# (0.1 MB of RSS).
WORKER_ENV_PREFIX = "TRIOPROXY_WORKER_"


def _worker_link() -> WorkerLink | None:
    """This process's link to its supervisor, or None if it is no worker."""
    if not any(name.startswith(WORKER_ENV_PREFIX) for name in os.environ):
        return None
    from ._workers import WorkerLink

    return WorkerLink.from_environ()


def _supervise(config: ProxyConfig, arguments: list[str], reload: Loader | None) -> str | None:
    """Run ``--workers`` processes until a signal; the error if they could not start."""
    from ._workers import WorkerStartupError, supervise

    try:
        trio.run(supervise, config, arguments, reload and (lambda: reload().config))
    except WorkerStartupError as exc:
        return str(exc)
    return None


async def _run(
    config: ProxyConfig, worker: WorkerLink | None = None, reload: Loader | None = None
) -> None:
    """Serve until a signal: the first drains (``--shutdown-timeout``), a second
    one cuts everything at once. Both end with exit status 0: the stop was
    asked for, and a supervisor should not count it as a crash.

    A ``worker`` reports to its supervisor instead of printing the startup
    line, and drains when the supervisor goes away. With ``reload``, SIGHUP
    reloads the settings (see the module notes)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        first_signal = trio.Event()
        send_reloads, reloads = trio.open_memory_channel[ProxyConfig](1)
        async with trio.open_nursery() as nursery:
            if reload is not None:  # before the startup line: a SIGHUP then must not kill us
                await nursery.start(_reload_on_hangup, reload, send_reloads)

            async def serve_then_stop(
                task_status: trio.TaskStatus[list[trio.SocketListener]],
            ) -> None:
                report = await serve(
                    config,
                    shutdown_trigger=first_signal.wait,
                    reloads=reloads if reload is not None else None,
                    task_status=task_status,
                )
                flush_access_log()  # the exchanges' lines before the last line
                print(f"trioproxy stopped: {report}", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            nursery.start_soon(_watch_signals, signals, first_signal, nursery.cancel_scope)
            # Writes the buffered access lines (if --access-log-buffer) each
            # second, and once more when the drain ends and cancels it.
            nursery.start_soon(flush_access_log_forever)
            listeners = await nursery.start(serve_then_stop)
            host, port = listeners[0].socket.getsockname()[:2]
            if worker is None:
                print(
                    listening_line(host, port, tls=bool(config.tls_cert)),
                    file=sys.stderr,
                    flush=True,
                )
                print(startup_summary(config, VERSION), file=sys.stderr, flush=True)
            else:
                await nursery.start(worker.report_ready_then_watch, host, port, first_signal.set)


async def _reload_on_hangup(
    load: Loader,
    reloads: trio.MemorySendChannel[ProxyConfig],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On each SIGHUP, read the settings again and send the configuration to
    the server; a file that fails validation is one error line, and the
    running configuration stays."""
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        task_status.started()
        async for _ in hangups:
            logger.info("SIGHUP: reloading the configuration")
            try:
                settings = load()
            except ValueError as exc:
                logger.error("reload refused, the running configuration stays: %s", exc)
                continue
            try:
                configure_logging(settings.log)
            except OSError as exc:
                logger.error("reload: cannot open the access log, logging stays as it was: %s", exc)
            await reloads.send(settings.config)


async def _watch_signals(
    signals: AsyncIterator[int], first_signal: trio.Event, everything: trio.CancelScope
) -> None:
    """Set ``first_signal`` on the first signal; cancel ``everything`` on the second."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if first_signal.is_set():
            logger.warning("second signal (%s): stopping now", name)
            everything.cancel()
            return
        logger.info("%s: shutting down", name)
        first_signal.set()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trioproxy`` console script and ``python -m trioproxy``."""
    if argv is None:  # a real command line, not a test calling main([...])
        prepare_process_memory()  # see _memory: so that freed memory can go back to the OS
    arguments = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(arguments)
    given = given_settings(arguments)
    path: str | None = args.check_config if args.check_config is not None else args.config
    worker = _worker_link()

    def load() -> Settings:
        settings = load_settings(path, given)
        if worker is None:
            return settings
        return attrs.evolve(settings, config=worker.worker_config(settings.config))

    try:
        settings = load()
        prepare_tls(settings.config)  # a bad certificate or CA file: one line now, not later
    except ValueError as exc:
        parser.error(str(exc))
    if args.check_config is not None:
        print(f"{path}: valid ({describe(settings.config)})", flush=True)
        return
    try:
        configure_logging(settings.log)
    except OSError as exc:
        parser.exit(1, f"trioproxy: error: cannot open the access log: {exc}\n")
    config = settings.config
    if worker is None:
        _check_open_file_limit(config)  # once: workers inherit the raised limit
        if config.upstream_insecure:
            logger.warning(
                "--upstream-insecure: upstream TLS certificates and host names are NOT checked;"
                " anyone on the path can read and change upstream traffic"
            )
    reload = load if path is not None else None
    try:
        if config.workers == 1:
            trio.run(_run, config, worker, reload)
        elif (error := _supervise(config, arguments, reload)) is not None:
            parser.exit(1, f"trioproxy: error: {error}\n")
    except OSError as exc:
        # Typically the address is in use or not ours to bind.
        address = format_listen((config.listen_host, config.listen_port))
        parser.exit(1, f"trioproxy: error: cannot listen on {address}: {exc.strerror or exc}\n")
    except KeyboardInterrupt:
        parser.exit(0)


def describe(config: ProxyConfig) -> str:
    """``reverse mode, 2 routes, 2 upstream groups, 3 servers`` or ``forward mode``."""
    specs, routes = config.groups_and_routes()
    if routes is None:
        return f"{config.mode} mode"
    servers = sum(len(spec.servers) for spec in specs)
    return (
        f"{config.mode} mode, {len(routes.routes)} routes, {len(specs)} upstream groups, "
        f"{servers} servers"
    )
