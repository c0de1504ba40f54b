"""Command line: argparse -> ProxyConfig -> trio.run(serve).

The CLI only builds a ProxyConfig (and the LogSettings); all validation lives
there. Its flags are not written here: each is generated from a settings
field (``_config.all_settings``), with its help, default and parser. Any bad
flag or value ends with one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import attrs
import trio

from ._accesslog import JsonFormatter, access_logger
from ._config import AUTH_ENVIRONMENT_VARIABLE as AUTH_ENVIRONMENT_VARIABLE
from ._config import (
    GROUPS,
    LogSettings,
    ProxyConfig,
    Setting,
    all_settings,
    from_values,
)
from ._config import parse_listen as parse_listen
from ._limits import descriptors_needed, raise_open_file_limit
from ._listen import listening_line
from ._memory import prepare_process_memory
from ._metrics import startup_summary
from ._server import serve
from ._tls_legs import prepare_tls
from ._units import UNITS_HELP, for_argparse
from ._units import parse_size as parse_size
from ._version import VERSION
from ._workers import WorkerLink, WorkerStartupError, supervise

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


def build_parser() -> argparse.ArgumentParser:
    """The ``trioproxy`` command line: one flag per setting (``all_settings``),
    in one argument group per ``GROUPS`` entry."""
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
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    for spec in all_settings():
        _add_flag(groups[spec.group], spec)
    return parser


def _add_flag(group: argparse._ArgumentGroup, spec: Setting) -> None:
    """Add ``spec``'s flag, with the field's default. A setting with ``show``
    gets its default as text, which ``--help`` prints as a person writes it
    and argparse passes through ``type``. A repeatable flag or one with an
    environment variable gets None (the field's default then applies), so
    that ``--help`` shows neither the list it replaces nor a secret."""
    if spec.action in ("store_false", "store_true"):
        group.add_argument(spec.flag, dest=spec.key, action=spec.action, help=spec.help)
        return
    default = None if spec.action == "append" or spec.env else spec.default
    if spec.show is not None and default is not None:
        default = spec.show(default)
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


def configure_logging(args: argparse.Namespace) -> None:
    """Diagnostics to stderr at ``--log-level``; the access log at info level
    to ``--access-log``, whatever ``--log-level`` says, and not duplicated
    into the diagnostics.

    Raises:
        ValueError: a log setting is not one of its choices.
        OSError: the access log file cannot be opened.
    """
    settings = log_settings_from_args(args)

    def formatter(text_format: str) -> logging.Formatter:
        return JsonFormatter() if settings.log_format == "json" else logging.Formatter(text_format)

    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(formatter(_TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[diagnostics], force=True)
    access_logger.propagate = False
    for old in list(access_logger.handlers):
        access_logger.removeHandler(old)
    if settings.access_log == "off":
        access_logger.setLevel(logging.CRITICAL + 1)
        return
    access_handler: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if settings.access_log == "-"
        else logging.FileHandler(settings.access_log, encoding="utf-8")
    )
    access_handler.setFormatter(formatter(_ACCESS_TEXT_FORMAT))
    access_logger.addHandler(access_handler)
    access_logger.setLevel(logging.INFO)


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


async def _run(config: ProxyConfig, worker: WorkerLink | None = None) -> None:
    """Serve until a signal: the first drains (``--shutdown-timeout``), a second
    one cuts everything at once. Both end with exit status 0: the stop was
    asked for, and a supervisor should not count it as a crash.

    A ``worker`` reports to its supervisor instead of printing the startup
    line, and drains when the supervisor goes away."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        first_signal = trio.Event()
        async with trio.open_nursery() as nursery:

            async def serve_then_stop(
                task_status: trio.TaskStatus[list[trio.SocketListener]],
            ) -> None:
                report = await serve(
                    config, shutdown_trigger=first_signal.wait, task_status=task_status
                )
                print(f"trioproxy stopped: {report}", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            nursery.start_soon(_watch_signals, signals, first_signal, nursery.cancel_scope)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        prepare_tls(config)  # a bad certificate or CA file: one line now, not at a request
    except ValueError as exc:
        parser.error(str(exc))
    try:
        configure_logging(args)
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        parser.exit(1, f"trioproxy: error: cannot open the access log: {exc}\n")
    worker = WorkerLink.from_environ()
    if worker is None:
        _check_open_file_limit(config)  # once: workers inherit the raised limit
        if config.upstream_insecure:
            logger.warning(
                "--upstream-insecure: upstream TLS certificates and host names are NOT checked;"
                " anyone on the path can read and change upstream traffic"
            )
    else:
        config = attrs.evolve(config, reuse_port=True)
    try:
        if config.workers > 1:
            trio.run(supervise, config, sys.argv[1:] if argv is None else argv)
        else:
            trio.run(_run, config, worker)
    except WorkerStartupError as exc:
        parser.exit(1, f"trioproxy: error: {exc}\n")
    except OSError as exc:
        # Typically the address is in use or not ours to bind.
        parser.exit(
            1,
            f"trioproxy: error: cannot listen on {args.listen}: {exc.strerror or exc}\n",
        )
    except KeyboardInterrupt:
        parser.exit(0)
