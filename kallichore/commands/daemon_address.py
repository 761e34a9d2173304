"""Which daemon a subcommand talks to, and with which token.

The address, first found: `--connection-file` (the file a daemon wrote with its own
`--connection-file`: address and token), `--unix-socket`, `--url`; then the same from the
variables KALLICHORE_CONNECTION_FILE, KALLICHORE_UNIX_SOCKET, KALLICHORE_URL; else
http://127.0.0.1:8182, where the README's daemon listens. The token: `--token`, else
KALLICHORE_TOKEN, else the connection file's, else none (a daemon run with `--token none`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kallichore.client import KallichoreClient
from kallichore.client.client import DEFAULT_URL
from kallichore.commands.errors import CommandError

CONNECTION_FILE_VARIABLE = "KALLICHORE_CONNECTION_FILE"
UNIX_SOCKET_VARIABLE = "KALLICHORE_UNIX_SOCKET"
URL_VARIABLE = "KALLICHORE_URL"
TOKEN_VARIABLE = "KALLICHORE_TOKEN"
# No request of a subcommand waits on a kernel for longer than a start does; `run` has its own.
REQUEST_TIMEOUT = 120.0


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say where the daemon is, as a group of `parser`'s help."""
    group = parser.add_argument_group(
        "which daemon",
        f"Default: ${CONNECTION_FILE_VARIABLE}, ${UNIX_SOCKET_VARIABLE} or ${URL_VARIABLE}, "
        f"else {DEFAULT_URL}.",
    )
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--connection-file",
        type=Path,
        metavar="FILE",
        help="the connection file the daemon wrote (its --connection-file): address and token",
    )
    where.add_argument("--url", help=f"the daemon's base URL on TCP (e.g. {DEFAULT_URL})")
    where.add_argument(
        "--unix-socket", type=Path, metavar="PATH", help="the daemon's API socket (--unix-socket)"
    )
    group.add_argument(
        "--token",
        help=f"the bearer token; rather set ${TOKEN_VARIABLE}, since a command line is visible "
        "to every user of the machine (default: the connection file's, else none)",
    )


def open_client(
    args: argparse.Namespace, timeout: float | None = REQUEST_TIMEOUT
) -> KallichoreClient:
    """A client of the daemon that `args` (from `add_address_arguments`) and the environment
    name."""
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    connection_file = args.connection_file
    unix_socket = args.unix_socket
    url = args.url
    if connection_file is None and unix_socket is None and url is None:
        connection_file = os.environ.get(CONNECTION_FILE_VARIABLE) or None
        unix_socket = os.environ.get(UNIX_SOCKET_VARIABLE) or None
        url = os.environ.get(URL_VARIABLE) or None
    if connection_file is not None:
        return _from_connection_file(Path(connection_file), token, timeout)
    if unix_socket is not None:
        return KallichoreClient(token=token, socket_path=unix_socket, timeout=timeout)
    return KallichoreClient(url or DEFAULT_URL, token=token, timeout=timeout)


def _from_connection_file(path: Path, token: str | None, timeout: float | None) -> KallichoreClient:
    try:
        return KallichoreClient.from_connection_file(path, token=token, timeout=timeout)
    except OSError as error:
        raise CommandError(f"cannot read the connection file {path}: {error.strerror}") from None
    except ValueError as error:  # not JSON, or no address in it
        raise CommandError(f"the connection file {path} is unusable: {error}") from None
