"""Command line: argparse -> ProxyConfig -> trio.run(serve).

The CLI only builds a ProxyConfig; all validation lives there. Any bad flag
or value ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import NoReturn

import trio

from ._accesslog import JsonFormatter, access_logger
from ._config import (
    DEFAULT_BUFFER_CHUNKS,
    DEFAULT_MAX_BUFFER_MEMORY,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADER_FIELDS,
    DEFAULT_MAX_TARGET_LENGTH,
    DEFAULT_READ_SIZE,
    ProxyConfig,
)
from ._limits import descriptors_needed, raise_open_file_limit
from ._listen import listening_line
from ._memory import prepare_process_memory
from ._policy import LOOPBACK_NETWORKS
from ._server import serve
from ._workers import WorkerLink, WorkerStartupError, supervise

logger = logging.getLogger("trioproxy")

_DEFAULTS = ProxyConfig()
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ACCESS_TEXT_FORMAT = "%(asctime)s %(message)s"

_SIZE = re.compile(r"(\d+)\s*(k|kib|kb|m|mib|mb|g|gib|gb)?", re.IGNORECASE)
# Credentials on the command line are visible to every user in ps.
AUTH_ENVIRONMENT_VARIABLE = "TRIOPROXY_AUTH"
# Binary multiples throughout: a buffer size is a memory size.
_SIZE_FACTORS = {"k": 1024, "m": 1024**2, "g": 1024**3}


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


def parse_size(text: str) -> int:
    """Parse ``65536``, ``64k``, ``64KiB``, ``1m``... into bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 65536 or 64KiB)")
    number, suffix = match.groups()
    return int(number) * (_SIZE_FACTORS[suffix[0].lower()] if suffix else 1)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    return host or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trioproxy",
        description=(
            "A streaming HTTP/1.1 proxy whose memory per connection is bounded: "
            "(buffer-chunks + 2) x read-size bytes per direction."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default="127.0.0.1:8080",  # argparse passes string defaults through type
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free port",
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="reverse mode: send every request to this http://host:port (else: forward proxy)",
    )
    parser.add_argument(
        "--read-size",
        type=parse_size,
        default=DEFAULT_READ_SIZE,
        metavar="BYTES",
        help="largest chunk read at once",
    )
    parser.add_argument(
        "--buffer-chunks",
        type=int,
        default=DEFAULT_BUFFER_CHUNKS,
        metavar="N",
        help="chunks that may wait for a slow receiver, per direction",
    )
    parser.add_argument(
        "--max-head-size",
        type=parse_size,
        default=DEFAULT_MAX_HEAD_SIZE,
        metavar="BYTES",
        help="largest request or response head (larger requests get 431)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=_DEFAULTS.connect_timeout,
        metavar="SECONDS",
        help="time to connect to the upstream (then 504)",
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=_DEFAULTS.upstream_timeout,
        metavar="SECONDS",
        help="time from the end of the request to the upstream's response head (then 504)",
    )
    _add_access_arguments(parser)
    _add_memory_arguments(parser)
    _add_operations_arguments(parser)
    _add_pool_arguments(parser)
    _add_logging_arguments(parser)
    parser.add_argument(
        "--workers",
        type=int,
        default=_DEFAULTS.workers,
        metavar="N",
        help="processes sharing the port (SO_REUSEPORT, Linux), supervised by this one; "
        "limits such as --max-connections apply to each",
    )
    return parser


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The reverse mode's pool of idle upstream keep-alive connections."""
    parser.add_argument(
        "--upstream-pool-size",
        type=int,
        default=_DEFAULTS.upstream_pool_size,
        metavar="N",
        help="reverse mode: idle upstream connections kept for reuse (0: a new one per request)",
    )
    parser.add_argument(
        "--upstream-idle-timeout",
        type=float,
        default=_DEFAULTS.upstream_idle_timeout,
        metavar="SECONDS",
        help="reverse mode: time an idle upstream connection is kept (then closed)",
    )


def _add_operations_arguments(parser: argparse.ArgumentParser) -> None:
    """Timeouts, limits, shutdown and logging: what makes it safe to expose."""
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=_DEFAULTS.header_timeout,
        metavar="SECONDS",
        help="time for a whole request head from its first byte, never extended (then 408)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=_DEFAULTS.idle_timeout,
        metavar="SECONDS",
        help="time a keep-alive connection may wait for its next request (then closed)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=_DEFAULTS.stall_timeout,
        metavar="SECONDS",
        help="time a body relay or a tunnel may go with no byte moving either way "
        "(then 504, an aborted response, or a closed tunnel)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=_DEFAULTS.max_connections,
        metavar="N",
        help="client connections served at once; more wait in the kernel's backlog",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=_DEFAULTS.shutdown_timeout,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, time in-flight requests get before they are cut; "
        "a second signal cuts them at once",
    )


def _add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """The global memory budget and the metrics endpoint."""
    parser.add_argument(
        "--max-buffer-memory",
        type=parse_size,
        default=DEFAULT_MAX_BUFFER_MEMORY,
        metavar="BYTES",
        help="payload bytes all connections together may buffer; readers wait beyond it",
    )
    parser.add_argument(
        "--metrics",
        type=parse_listen,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics and /debug/memory (JSON) on this address; "
        "with --workers N, worker i serves them on PORT + i",
    )
    parser.add_argument(
        "--no-splice",
        dest="splice",
        action="store_false",
        help="never use the zero-copy splice(2) path; always relay through user space",
    )


def _add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may use the proxy, where CONNECT may go, and request head limits."""
    parser.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        help="client network allowed to use the proxy (repeatable; default: loopback only, "
        "127.0.0.0/8 and ::1/128)",
    )
    parser.add_argument(
        "--connect-ports",
        default="443",
        metavar="PORTS",
        help="ports CONNECT may reach, e.g. 443,8443,9000-9100",
    )
    parser.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help=f"require Basic proxy credentials (better: set {AUTH_ENVIRONMENT_VARIABLE}, "
        "which stays out of ps)",
    )
    parser.add_argument(
        "--max-header-fields",
        type=int,
        default=DEFAULT_MAX_HEADER_FIELDS,
        metavar="N",
        help="most header fields in a request head (more get 431)",
    )
    parser.add_argument(
        "--max-target-length",
        type=parse_size,
        default=DEFAULT_MAX_TARGET_LENGTH,
        metavar="BYTES",
        help="longest request target (longer gets 414)",
    )


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """Diagnostics and the access log."""
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="level of the diagnostic log (stderr)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="format of the diagnostic and access logs",
    )
    parser.add_argument(
        "--access-log",
        default="-",
        metavar="PATH|-|off",
        help="where to append one line per request: a file, - for stderr, or off",
    )


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    """Build the ProxyConfig; raises ValueError with a message for bad values."""
    host, port = args.listen
    return ProxyConfig(
        listen_host=host,
        listen_port=port,
        upstream=args.upstream,
        read_size=args.read_size,
        buffer_chunks=args.buffer_chunks,
        max_head_size=args.max_head_size,
        connect_timeout=args.connect_timeout,
        upstream_timeout=args.upstream_timeout,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        stall_timeout=args.stall_timeout,
        max_connections=args.max_connections,
        shutdown_timeout=args.shutdown_timeout,
        max_buffer_memory=args.max_buffer_memory,
        metrics_listen=args.metrics,
        splice=args.splice,
        workers=args.workers,
        allow=args.allow if args.allow is not None else LOOPBACK_NETWORKS,
        connect_ports=args.connect_ports,
        # Read here, not as the flag's default, so --help never prints it.
        auth=args.auth or os.environ.get(AUTH_ENVIRONMENT_VARIABLE) or None,
        max_header_fields=args.max_header_fields,
        max_target_length=args.max_target_length,
        upstream_pool_size=args.upstream_pool_size,
        upstream_idle_timeout=args.upstream_idle_timeout,
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Diagnostics to stderr at ``--log-level``; the access log at info level
    to ``--access-log``, whatever ``--log-level`` says, and not duplicated
    into the diagnostics."""

    def formatter(text_format: str) -> logging.Formatter:
        return JsonFormatter() if args.log_format == "json" else logging.Formatter(text_format)

    diagnostics = logging.StreamHandler(sys.stderr)
    diagnostics.setFormatter(formatter(_TEXT_FORMAT))
    logging.basicConfig(level=args.log_level.upper(), handlers=[diagnostics], force=True)
    access_logger.propagate = False
    for old in list(access_logger.handlers):
        access_logger.removeHandler(old)
    if args.access_log == "off":
        access_logger.setLevel(logging.CRITICAL + 1)
        return
    access_handler: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if args.access_log == "-"
        else logging.FileHandler(args.access_log, encoding="utf-8")
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
                await serve(config, shutdown_trigger=first_signal.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop watching signals

            nursery.start_soon(_watch_signals, signals, first_signal, nursery.cancel_scope)
            listeners = await nursery.start(serve_then_stop)
            host, port = listeners[0].socket.getsockname()[:2]
            if worker is None:
                print(listening_line(host, port), file=sys.stderr, flush=True)
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
    except ValueError as exc:
        parser.error(str(exc))
    try:
        configure_logging(args)
    except OSError as exc:
        parser.exit(1, f"trioproxy: error: cannot open the access log: {exc}\n")
    worker = WorkerLink.from_environ()
    if worker is None:
        _check_open_file_limit(config)  # once: workers inherit the raised limit
    else:
        config = worker.worker_config(config)
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
