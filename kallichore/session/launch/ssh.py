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
import trio

from kallichore.errors import ErrorCode, StartupError
from kallichore.session import process as kernel_process
from kallichore.session.launch.options import SshLauncher
from kallichore.session.launch.remote import (
    COMMAND_NOT_FOUND,
    CONNECTION_FAILED,
    RemoteKernel,
    shell_command,
    shim_command,
)

# How long ssh waits for a host to answer (connect and greeting).
CONNECT_TIMEOUT_SECONDS = 10


@attrs.define
class SshPlan:
    """How the ssh launcher starts, signals and reattaches (see `RemotePlan`)."""

    options: SshLauncher
    name: str = "ssh"
    own_session: bool = True

    @property
    def reconnect_seconds(self) -> float:
        return self.options.reconnect_seconds

    async def registration_ip(self) -> str:
        """Our address the kernel connects back to: configured, or the one our routing uses
        towards the host (no packet is sent to find it); the host as ssh resolves it, which
        may be a Host of the ssh_config with a HostName."""
        if self.options.registration_ip:
            return self.options.registration_ip
        host = await self._host_name()
        try:
            # Through trio: a slow resolver must not hold up every other session.
            found = await trio.socket.getaddrinfo(host, 22, type=socket.SOCK_DGRAM)
            family, kind, proto, _, address = found[0]
            with socket.socket(family, kind, proto) as probe:
                probe.connect(address)
                ip: str = probe.getsockname()[0]
        except OSError as exc:
            raise StartupError(
                ErrorCode.PROCESS_START_FAILED,
                f"cannot find the ssh host {host!r}: {exc.strerror or exc}",
                "check the launcher's host; if this machine cannot resolve it but ssh reaches "
                "it (a jump host), set registration_ip to an address of this machine that the "
                "host can connect to",
            ) from None
        return ip

    async def _host_name(self) -> str:
        """The name ssh connects to: `host`'s HostName in the ssh_config, if it has one."""
        result = await trio.run_process(
            [*self._ssh_options(), "-G", "--", self.options.host],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        for line in result.stdout.decode(errors="replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value:
                return value
        return self.options.host.rpartition("@")[2]

    def _ssh_options(self) -> list[str]:
        """The user's `ssh_args` first: for an `-o` option given twice, ssh takes the first."""
        options = self.options
        argv = ["ssh", "-T", *options.ssh_args, "-o", "BatchMode=yes"]
        # A host that does not answer fails a start (or one reattach attempt) in 10 seconds; a
        # dead connection is noticed (and reattached) within about 15.
        argv += ["-o", f"ConnectTimeout={CONNECT_TIMEOUT_SECONDS}"]
        argv += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if options.port is not None:
            argv += ["-p", str(options.port)]
        if options.identity_file is not None:
            argv += ["-i", options.identity_file]
        return argv

    def _ssh(self, remote: list[str]) -> list[str]:
        return [*self._ssh_options(), "--", self.options.host, shell_command(remote)]

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

    async def start_failure(self, returncode: int, python: str) -> str:
        host = self.options.host
        if returncode == CONNECTION_FAILED:
            return (
                f"ssh could not connect to {host} (its output says why); `ssh {host}` must "
                "work for the daemon's user without a prompt (a key, an agent or ssh_config)"
            )
        if returncode == COMMAND_NOT_FOUND:
            return (
                f"{python!r} was not found on {host}; set `python` in the launcher block to "
                "a Python there that has pyzmq"
            )
        return (
            f"our shim on {host} ended with code {returncode} before it started the kernel "
            "(its output says why)"
        )
