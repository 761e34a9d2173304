"""The `slurm` launcher: a kernel as a job step on a Slurm cluster, started with `srun`.

srun is our child for as long as the job runs: its exit is the job's end (no polling of the
queue). While the job waits for resources, srun says so on stderr, which becomes the session's
`starting` reason. Interrupts are `scancel --signal=INT`, a kill is `scancel`; the kernel stays
in the shim's process group so that Slurm's signal reaches it once. Why a job ended (cancelled,
time limit, pre-empted, node failure) is read from `scontrol show job` afterwards.
"""

from __future__ import annotations

import logging
import re
import secrets
import signal
import socket
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from kallichore.session import process as kernel_process
from kallichore.session.launch.options import SlurmLauncher
from kallichore.session.launch.remote import RemoteKernel, shim_command

logger = logging.getLogger(__name__)

_QUEUED = re.compile(r"srun: job (\d+) queued and waiting for resources")
_ALLOCATED = re.compile(r"srun: job (\d+) has been allocated resources")
_FIELD = re.compile(r"(\w+)=(\S*)")
# How long `scontrol` may take to tell why a job ended; the job's end is reported meanwhile.
SCONTROL_SECONDS = 10.0
# Job states that are not final yet: asked again a few times.
_TRANSIENT = {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING", "SIGNALING", "STAGE_OUT"}
_STATES = {
    "CANCELLED": "was cancelled",
    "TIMEOUT": "reached its time limit",
    "PREEMPTED": "was pre-empted",
    "NODE_FAIL": "ended: its node failed",
    "OUT_OF_MEMORY": "ran out of memory",
    "DEADLINE": "reached its deadline",
    "BOOT_FAIL": "ended: its node failed to boot",
}


@attrs.define
class SlurmPlan:
    """How the slurm launcher starts, signals and explains (see `RemotePlan`)."""

    options: SlurmLauncher
    session_id: str
    name: str = "slurm"
    own_session: bool = False
    reconnect_seconds: float = 0.0
    job_id: str | None = None
    node: str | None = None
    # Unique, so that a job not yet numbered can still be cancelled by name.
    job_name: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.job_name = f"kallichore-{self.session_id}-{secrets.token_hex(4)}"

    async def registration_ip(self) -> str:
        """Our address the job's node connects back to: configured, or our host name's."""
        if self.options.registration_ip:
            return self.options.registration_ip
        try:
            # Through trio: a slow resolver must not hold up every other session.
            found = await trio.socket.getaddrinfo(socket.gethostname(), 0, socket.AF_INET)
        except OSError:
            return "127.0.0.1"
        return str(found[0][4][0])

    def command(self, python: str) -> list[str]:
        options = self.options
        argv = ["srun", f"--job-name={self.job_name}", "--ntasks=1", "--unbuffered"]
        if options.partition is not None:
            argv.append(f"--partition={options.partition}")
        if options.time is not None:
            argv.append(f"--time={options.time}")
        return [*argv, *options.extra_args, *shim_command(python)]

    def attach_command(self, python: str, path: str) -> list[str] | None:
        return None

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"job_id": self.job_id}
        if self.node is not None:
            details["host"] = self.node
        return details

    def waiting(self, line: str) -> str | None:
        if match := _QUEUED.search(line):
            self.job_id = match.group(1)
            return f"Slurm job {self.job_id} is queued, waiting for resources"
        if match := _ALLOCATED.search(line):
            self.job_id = match.group(1)
            return f"Slurm job {self.job_id} has been allocated resources"
        return None

    def announced(self, info: Mapping[str, Any]) -> None:
        if isinstance(job_id := info.get("job_id"), str | int) and not isinstance(job_id, bool):
            self.job_id = str(job_id)
        if isinstance(host := info.get("host"), str):
            self.node = host

    def _target(self) -> list[str]:
        return [self.job_id] if self.job_id is not None else [f"--name={self.job_name}"]

    async def deliver(self, kernel: RemoteKernel, signum: int) -> None:
        if signum == signal.SIGKILL:
            argv = ["scancel", *self._target()]
        else:
            argv = ["scancel", f"--signal={signal.Signals(signum).name[3:]}", *self._target()]
        try:
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError as exc:  # scancel gone from PATH since the start
            logger.warning("slurm: %s failed: %s", " ".join(argv), exc)
            return
        if result.returncode != 0:
            logger.warning(
                "slurm: %s failed: %s",
                " ".join(argv),
                result.stderr.decode(errors="replace").strip(),
            )

    async def exit_reason(self, returncode: int) -> str:
        ended = f"the kernel {kernel_process.describe_exit(returncode)}"
        if self.job_id is None:
            return ended
        return await self._job_ended() or f"Slurm job {self.job_id}: {ended}"

    async def start_failure(self, returncode: int, python: str) -> str:
        return await self._job_ended() or (
            f"srun ended with code {returncode} before the kernel started (its output says "
            "why: check the launcher's partition, time and extra_args)"
        )

    async def _job_ended(self) -> str | None:
        """Why Slurm ended the job (cancelled, time limit, ...), if it did."""
        if self.job_id is None:
            return None
        fields: dict[str, str] = {}
        with trio.move_on_after(SCONTROL_SECONDS):
            for _ in range(20):
                fields = await self._job(self.job_id)
                if fields.get("JobState") not in _TRANSIENT:
                    break
                await trio.sleep(0.25)
        words = _STATES.get(fields.get("JobState", ""))
        if words is None:
            return None
        reason = fields.get("Reason", "None")
        more = f" ({reason})" if reason not in ("None", "") else ""
        return f"Slurm job {self.job_id} {words}{more}"

    @staticmethod
    async def _job(job_id: str) -> dict[str, str]:
        try:
            result = await trio.run_process(
                ["scontrol", "show", "job", "--oneliner", job_id],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError:
            return {}
        return dict(_FIELD.findall(result.stdout.decode(errors="replace")))
