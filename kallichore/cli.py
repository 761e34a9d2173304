"""The `kallichore` (alias `kcserver`) command line, with kcserver's flags and rules.

Invalid combinations are refused before anything is bound or written: a message on stderr
starting with `Error:` and exit status 1, as kcserver does.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import resource
import secrets
import stat
import sys
from pathlib import Path
from typing import TextIO, get_args

import trio

from kallichore import __version__
from kallichore.api import models
from kallichore.api.jupyter import JupyterSettings, kernelspecs
from kallichore.jupyter.kernelspec import KernelSpec
from kallichore.server.daemon import DaemonError, DaemonOptions, Transport, run_daemon
from kallichore.server.http import LOOPBACK
from kallichore.session.model import KernelTransport
from kallichore.session.resources import MAX_SAMPLE_INTERVAL_MS
from kallichore.state_dir import StateDirError, saved_token

logger = logging.getLogger("kallichore")

# Kallichore's level names, as Python's logging levels (trace is below debug).
LOG_LEVELS = dict(
    zip(
        models.LOG_LEVELS,
        (5, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR),
        strict=True,
    )
)
MAX_TOKEN_LENGTH = 64
MAX_SESSION_BUFFER_MB = 2**20


class UsageError(Exception):
    """A bad flag or combination of flags."""


def program_name(argv0: str) -> str:
    """`kcserver` when started under kcserver's name (Positron's launch), else `kallichore`."""
    return "kcserver" if Path(argv0).name == "kcserver" else "kallichore"


def build_parser(prog: str = "kallichore") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "A headless Jupyter kernel supervisor: starts kernels and serves them over HTTP and "
            "WebSocket, wire-compatible with Posit's Kallichore (kcserver)."
        ),
        epilog=(
            "Without --transport, the API is served on TCP, or on a Unix socket when "
            "--unix-socket, --connection-file or --handshake-socket is given. "
            f"Commands for a running daemon: {prog} ls | start | run | kernelspecs | attach; "
            f"the MCP server: {prog} mcp (see {prog} COMMAND --help)."
        ),
    )
    parser.add_argument("-V", "--version", action="version", version=f"{prog} {__version__}")
    where = parser.add_argument_group("where to listen")
    where.add_argument(
        "-p", "--port", type=int, default=0, help="TCP port on --host (0: any free port)"
    )
    where.add_argument(
        "--host",
        default=LOOPBACK,
        help="the address to listen on (default: %(default)s, this machine only); any other "
        "is refused with --token none, as anyone who can reach it could run code",
    )
    where.add_argument("--transport", help="tcp, socket, or named-pipe (Windows only)")
    where.add_argument("--unix-socket", type=Path, help="serve the API on this Unix socket path")
    where.add_argument(
        "--socket-dir",
        type=Path,
        help="where to make the private (0700) directory of the sockets we name ourselves "
        "(default: $XDG_RUNTIME_DIR or the temp dir)",
    )
    tell = parser.add_argument_group("telling the client")
    tell.add_argument(
        "--connection-file", type=Path, help="write where and how to connect here (JSON, mode 0600)"
    )
    tell.add_argument(
        "--handshake-socket",
        type=Path,
        help="connect to this Unix socket, write the connection document there, and close it",
    )
    tell.add_argument(
        "-t",
        "--token",
        help="file holding the bearer token (read, then deleted), or 'none' to turn auth off; "
        "default: a random token",
    )
    behave = parser.add_argument_group("behaviour")
    behave.add_argument(
        "-i",
        "--idle-shutdown-hours",
        type=int,
        help="exit after this many idle hours (0: 30 seconds)",
    )
    behave.add_argument(
        "--idle-shutdown-seconds",
        type=float,
        help="exit after this many idle seconds (overrides hours)",
    )
    behave.add_argument(
        "-r",
        "--resource-sample-interval",
        type=int,
        default=1000,
        help="milliseconds between CPU/memory samples of kernels (0: never)",
    )
    behave.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds a kernel gets to exit after shutdown_request before it is killed",
    )
    behave.add_argument(
        "--state-dir",
        type=Path,
        help="keep session records and the token in this directory (0700), and leave kernels "
        "running if the daemon dies: started again with the same directory, it re-adopts "
        "them under the same ids and token (default: off; kernels end with the daemon)",
    )
    behave.add_argument(
        "--session-buffer-mb",
        type=int,
        default=64,
        help="MiB of events each session keeps for its clients: the backlog of a client that "
        "does not read and the replay window after a drop; the oldest are dropped beyond it "
        "(default: %(default)s)",
    )
    behave.add_argument(
        "--kernel-transport",
        choices=get_args(KernelTransport),
        default="ipc",
        help="how the daemon reaches the kernels it starts: Unix sockets in a private "
        "directory, or loopback TCP ports (default: %(default)s; adopted kernels are reached "
        "as their connection info says)",
    )
    behave.add_argument(
        "--default-kernel",
        metavar="NAME",
        help="single-kernel mode: create the session 'default' running the kernelspec NAME and "
        "start it before serving; GET /health and the /kernel/* routes act on it",
    )
    jupyter = parser.add_argument_group("the Jupyter Server kernels API (/api/...)")
    jupyter.add_argument(
        "--root-dir",
        type=Path,
        help="where kernels run: relative KERNEL_WORKING_DIR values and session paths are "
        "taken from here, and may not leave it (default: the current directory)",
    )
    jupyter.add_argument(
        "--jupyter-env-allow",
        action="append",
        default=[],
        metavar="NAME",
        help="a variable a client may pass to its kernel in the env of POST /api/kernels, "
        "besides KERNEL_* ones (repeatable; Kernel Gateway's env_whitelist)",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "-l", "--log-level", help="trace, debug, info, warn or error (default: $RUST_LOG or info)"
    )
    logs.add_argument(
        "--log-file", type=Path, help="also write the log to this file (truncated at start)"
    )
    return parser


def choose_transport(args: argparse.Namespace) -> Transport:
    """kcserver's rule: explicit --transport, else a Unix socket for socket flags, else TCP."""
    if args.transport is not None:
        try:
            transport = Transport(args.transport)
        except ValueError:
            raise UsageError(
                f"invalid transport {args.transport!r}: expected tcp, socket or named-pipe"
            ) from None
    elif args.unix_socket or args.connection_file or args.handshake_socket:
        transport = Transport.SOCKET
    else:
        transport = Transport.TCP
    if transport is Transport.NAMED_PIPE:
        raise UsageError("the named-pipe transport is only available on Windows; use tcp or socket")
    if args.port != 0 and transport is not Transport.TCP:
        raise UsageError(
            f"--port can only be used with the tcp transport (transport is {transport})"
        )
    if args.unix_socket is not None and transport is not Transport.SOCKET:
        raise UsageError(f"--unix-socket needs the socket transport (transport is {transport})")
    if args.host != LOOPBACK and transport is not Transport.TCP:
        raise UsageError(
            f"--host can only be used with the tcp transport (transport is {transport})"
        )
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    return transport


def is_loopback(host: str) -> bool:
    """`host` is an address of this machine alone (a name other than localhost may not be)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_kernelspec(name: str | None) -> KernelSpec | None:
    """The kernelspec of --default-kernel, looked up before anything is bound."""
    if name is None:
        return None
    specs = kernelspecs()
    try:
        return specs[name.lower()]
    except KeyError:
        raise UsageError(
            f"--default-kernel: no kernelspec is named {name!r}; there are: "
            f"{', '.join(sorted(specs))}"
        ) from None


def read_token(option: str | None, state_dir: Path | None = None) -> str | None:
    """None for `--token none`; the file's token (the file is then deleted); else the token
    the last daemon with this state directory served; else a new one."""
    if option is None:
        return (state_dir and saved_token(state_dir)) or secrets.token_hex(8)
    if option == "none":
        logger.warning("authentication is turned off (--token none)")
        return None
    path = Path(option)
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise UsageError(f"the token in {path} is longer than {MAX_TOKEN_LENGTH} characters")
    try:
        path.unlink()
    except OSError as exc:
        logger.warning("could not delete the token file %s: %s", path, exc)
    return token


def open_private_log(path: Path) -> TextIO:
    """`path` truncated and readable by its owner alone (0600), an existing file included: a
    log names sessions, paths and what kernels print, which is nobody else's business. (A
    device such as /dev/null is written as it is.)"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return open(fd, "w", encoding="utf-8", errors="backslashreplace")


def configure_logging(level_name: str | None, log_file: Path | None) -> str:
    """Log to stderr (and the file) at the named level; returns the effective level name."""
    name = (level_name or os.environ.get("RUST_LOG") or "info").lower()
    if name not in LOG_LEVELS:
        print(f"unknown log level {name!r}; using info", file=sys.stderr)
        name = "info"
    logging.addLevelName(LOG_LEVELS["trace"], "TRACE")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        try:
            handlers.append(logging.StreamHandler(open_private_log(log_file)))
        except OSError as exc:
            raise UsageError(
                f"cannot open the log file {log_file}: {exc.strerror or exc}"
            ) from None
    logging.basicConfig(
        level=LOG_LEVELS[name],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return name


def options_from(args: argparse.Namespace) -> DaemonOptions:
    transport = choose_transport(args)
    hours = args.idle_shutdown_hours
    if hours is not None and not 0 <= hours <= models.MAX_IDLE_SHUTDOWN_HOURS:
        raise UsageError(
            f"--idle-shutdown-hours must be between 0 and {models.MAX_IDLE_SHUTDOWN_HOURS}"
        )
    if args.idle_shutdown_seconds is not None and not 0 < args.idle_shutdown_seconds < math.inf:
        raise UsageError("--idle-shutdown-seconds must be positive")
    if not 0 <= args.resource_sample_interval <= MAX_SAMPLE_INTERVAL_MS:
        raise UsageError(
            f"--resource-sample-interval must be between 0 and {MAX_SAMPLE_INTERVAL_MS}"
        )
    if not 0 <= args.shutdown_grace < math.inf:
        raise UsageError("--shutdown-grace must not be negative")
    if not 1 <= args.session_buffer_mb <= MAX_SESSION_BUFFER_MB:
        raise UsageError(f"--session-buffer-mb must be between 1 and {MAX_SESSION_BUFFER_MB}")
    root_dir = (args.root_dir or Path.cwd()).absolute()
    if not root_dir.is_dir():
        raise UsageError(f"--root-dir {args.root_dir} is not a directory")
    if args.token == "none" and not is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} needs a token: without one, anyone who can reach the port "
            "could run code on this machine"
        )
    default_kernel = default_kernelspec(args.default_kernel)
    token = read_token(args.token, args.state_dir)
    log_level = configure_logging(args.log_level, args.log_file)
    return DaemonOptions(
        transport=transport,
        host=args.host,
        port=args.port,
        unix_socket=args.unix_socket.absolute() if args.unix_socket else None,
        socket_dir=args.socket_dir.absolute() if args.socket_dir else None,
        connection_file=args.connection_file.absolute() if args.connection_file else None,
        handshake_socket=args.handshake_socket,
        token=token,
        idle_shutdown_hours=args.idle_shutdown_hours,
        idle_shutdown_seconds=args.idle_shutdown_seconds,
        resource_sample_interval_ms=args.resource_sample_interval,
        shutdown_grace=args.shutdown_grace,
        session_buffer_bytes=args.session_buffer_mb * 2**20,
        kernel_transport=args.kernel_transport,
        log_level=log_level,
        log_file=args.log_file.absolute() if args.log_file else None,
        state_dir=args.state_dir.absolute() if args.state_dir else None,
        jupyter=JupyterSettings(root_dir, frozenset(args.jupyter_env_allow)),
        default_kernel=default_kernel,
    )


# What the daemon raises its soft limit of open files to (at most its hard limit).
OPEN_FILES = 65536


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files towards the hard one, as servers do: a kernel takes
    13 descriptors of ours (docs/scaling.md), so a common soft limit of 1,024 would stop the
    daemon at about 75 kernels."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(program_name(sys.argv[0])).parse_args(argv)
    try:
        options = options_from(args)
        raise_open_files_limit()
        return trio.run(run_daemon, options)
    except BaseException as error:
        leaf = error
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if not isinstance(leaf, UsageError | DaemonError | StateDirError | OSError):
            raise
        print(f"Error: {leaf}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
