"""Command line: argparse -> ProxyConfig -> trio.run(serve).

The CLI only builds a ProxyConfig; all validation lives there. Any bad flag
or value ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import trio

from ._config import (
    DEFAULT_BUFFER_CHUNKS,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADER_FIELDS,
    DEFAULT_MAX_TARGET_LENGTH,
    DEFAULT_READ_SIZE,
    ProxyConfig,
)
from ._policy import LOOPBACK_NETWORKS
from ._server import serve

_SIZE = re.compile(r"(\d+)\s*(k|kib|kb|m|mib|mb|g|gib|gb)?", re.IGNORECASE)
# Credentials on the command line are visible to every user in ps.
AUTH_ENVIRONMENT_VARIABLE = "TRIOPROXY_AUTH"
# Binary multiples throughout: a buffer size is a memory size.
_SIZE_FACTORS = {"k": 1024, "m": 1024**2, "g": 1024**3}


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="address to listen on; port 0 picks a free port",
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="reverse mode: send every request to this http://host:port (default: forward proxy)",
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
        default=10.0,
        metavar="SECONDS",
        help="time to connect to the upstream (then 504)",
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="time from the end of the request to the upstream's response head (then 504)",
    )
    # --- Access control and request limits ---
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
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="logging level",
    )
    return parser


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
        allow=args.allow if args.allow is not None else LOOPBACK_NETWORKS,
        connect_ports=args.connect_ports,
        # Read here, not as the flag's default, so --help never prints it.
        auth=args.auth or os.environ.get(AUTH_ENVIRONMENT_VARIABLE) or None,
        max_header_fields=args.max_header_fields,
        max_target_length=args.max_target_length,
    )


async def _run(config: ProxyConfig) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, config)
        host, port = listeners[0].socket.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"trioproxy listening on http://{shown}:{port}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trioproxy`` console script and ``python -m trioproxy``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        trio.run(_run, config)
    except OSError as exc:
        # Typically the address is in use or not ours to bind.
        parser.exit(
            1,
            f"trioproxy: error: cannot listen on {args.listen}: {exc.strerror or exc}\n",
        )
    except KeyboardInterrupt:
        parser.exit(0)
