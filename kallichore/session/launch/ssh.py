"""The `ssh` launcher: a kernel on another host, reached with the system's ssh client.

Authentication is the user's own (agent, key file, ssh_config); we never see a password. The
shim keeps the kernel through a dropped connection for `reconnect_seconds`, and we reattach over
a new connection: the kernel's ZeroMQ traffic does not go through ssh, so a short drop costs
nothing but the output printed meanwhile beyond the shim's buffer.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Mapping
from typing import Any

import attrs

from kallichore.errors import ErrorCode, StartupError
from kallichore.session import process as kernel_process
from kallichore.session.launch.options import SshLauncher
from kallichore.session.launch.remote import (
    CONNECTION_FAILED,
    RemoteKernel,
    shell_command,
    shim_command,
)


@attrs.define
class SshPlan:
    """How the ssh launcher starts, signals and reattaches (see `RemotePlan`)."""

    options: SshLauncher
    name: str = "ssh"
    own_session: bool = True

    @property
    def reconnect_seconds(self) -> float:
        return self.options.reconnect_seconds

    def registration_ip(self) -> str:
        """Our address the kernel connects back to: configured, or the one our routing uses
        towards the host (no packet is sent to find it)."""
        if self.options.registration_ip:
            return self.options.registration_ip
        host = self.options.host.rpartition("@")[2]
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, 22, type=socket.SOCK_DGRAM)[
                0
            ]
            with socket.socket(family, kind, proto) as probe:
                probe.connect(address)
                ip: str = probe.getsockname()[0]
        except OSError as exc:
            raise StartupError(
                ErrorCode.PROCESS_START_FAILED,
                f"cannot tell which address of ours {host!r} can reach: {exc}",
                "set registration_ip in the launcher block to an address of this machine "
                "that the host can connect to",
            ) from None
        return ip

    def _ssh(self, remote: list[str]) -> list[str]:
        options = self.options
        argv = ["ssh", "-T", "-o", "BatchMode=yes"]
        # A dead connection is noticed (and reattached) within about 15 seconds.
        argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if options.port is not None:
            argv += ["-p", str(options.port)]
        if options.identity_file is not None:
            argv += ["-i", options.identity_file]
        return [*argv, *options.ssh_args, "--", options.host, shell_command(remote)]

    def command(self, python: str) -> list[str]:
        return self._ssh(shim_command(python))

    def attach_command(self, python: str, path: str) -> list[str] | None:
        return self._ssh(shim_command(python, "attach", path))

    def details(self) -> dict[str, Any]:
        return {"host": self.options.host}

    def waiting(self, line: str) -> str | None:
        return None

    def announced(self, info: Mapping[str, Any]) -> None:
        pass

    async def deliver(self, kernel: RemoteKernel, signum: int) -> None:
        await kernel.write_line("kill" if signum == signal.SIGKILL else f"signal {signum}")

    async def exit_reason(self, returncode: int) -> str:
        if returncode == CONNECTION_FAILED:
            return f"the connection to {self.options.host} failed"
        return f"the kernel on {self.options.host} {kernel_process.describe_exit(returncode)}"
