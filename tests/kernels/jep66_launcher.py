"""Run an IPython kernel that reports its ports by a JEP 66 registration handshake.

Usage: ``python jep66_launcher.py <registration_file>``

ipykernel does not implement JEP 66, so this stands in for a kernel that does (like ark): it
lets ipykernel bind five random ports, sends them to the supervisor's registration socket in a
signed `handshake_request`, and runs the kernel once the supervisor has answered. Signing and
verifying use jupyter_client's Session, not kallichore's codec, so the tests see a second
implementation of the wire format.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import zmq
from ipykernel.kernelapp import IPKernelApp
from jupyter_client.session import Session

REPLY_TIMEOUT_MS = 30_000
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class LaunchError(Exception):
    """Why the kernel could not register; printed before exiting with status 1."""


def read_registration(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            registration = json.load(f)
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read the registration file: {exc}") from None
    if not isinstance(registration, dict):
        raise LaunchError(f"{path}: not a JSON object")
    missing = [
        name
        for name in ("transport", "ip", "key", "signature_scheme", "registration_port")
        if name not in registration
    ]
    if missing:
        raise LaunchError(f"{path}: missing {', '.join(missing)}")
    return registration


def initialize_kernel(registration: dict[str, Any]) -> IPKernelApp:
    """An initialized IPKernelApp whose sockets are bound to random ports, signing with our key.

    ipykernel takes its key and address from a connection file: we hand it one with every port
    0, which makes it bind random ports. It is only read during initialize, so it is deleted
    once the real ports are known.
    """
    with tempfile.TemporaryDirectory(prefix="jep66-") as tmp:
        connection_file = Path(tmp) / "kernel.json"
        connection_file.write_text(
            json.dumps(
                {
                    "transport": registration["transport"],
                    "ip": registration["ip"],
                    "key": registration["key"],
                    "signature_scheme": registration["signature_scheme"],
                    **dict.fromkeys(PORT_NAMES, 0),
                }
            )
        )
        app = IPKernelApp.instance()
        # ipykernel does not annotate initialize() or start().
        app.initialize(["-f", str(connection_file)])  # type: ignore[no-untyped-call]
    return app


def handshake(registration: dict[str, Any], ports: dict[str, int]) -> None:
    """Send the ports to the supervisor and wait for its acceptance."""
    session = Session(
        key=str(registration["key"]).encode(),
        signature_scheme=registration["signature_scheme"],
    )
    address = f"tcp://{registration['ip']}:{registration['registration_port']}"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, REPLY_TIMEOUT_MS)
    sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
    request = session.msg("handshake_request", ports)
    try:
        sock.connect(address)
        session.send(sock, request)
        frames = sock.recv_multipart()
    except zmq.Again:
        raise LaunchError(
            f"no handshake reply from {address} within {REPLY_TIMEOUT_MS // 1000} s"
        ) from None
    except zmq.ZMQError as exc:
        raise LaunchError(f"cannot reach {address}: {exc}") from None
    finally:
        sock.close()
        context.term()
    if len(frames) == 1:
        # The supervisor could not read our request, so it answered in plain JSON.
        raise LaunchError(f"the supervisor rejected the handshake: {frames[0].decode()}")
    try:
        _, body = session.feed_identities(frames)
        reply = session.deserialize(body)
    except (ValueError, TypeError, KeyError) as exc:
        raise LaunchError(f"invalid handshake reply: {exc}") from None
    if reply["msg_type"] != "handshake_reply":
        raise LaunchError(f"expected a handshake_reply, got {reply['msg_type']!r}")
    if reply["parent_header"].get("msg_id") != request["header"]["msg_id"]:
        raise LaunchError("the handshake reply does not answer our request")
    if reply["content"].get("status") != "ok":
        raise LaunchError(f"the supervisor rejected the handshake: {reply['content']}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} <registration_file>", file=sys.stderr)
        return 2
    # After initialize, sys.stderr goes to the kernel's iopub, and fd 2 into a pipe that a daemon
    # thread may not have drained before we exit: our errors go to a copy of the real stderr.
    stderr: TextIO = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    try:
        registration = read_registration(argv[1])
        app = initialize_kernel(registration)
        handshake(registration, {name: getattr(app, name) for name in PORT_NAMES})
    except LaunchError as exc:
        print(f"jep66_launcher: {exc}", file=stderr, flush=True)
        return 1
    stderr.close()
    app.start()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
