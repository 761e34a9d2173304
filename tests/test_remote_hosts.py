"""The test cluster and host of tests/remote_hosts.py work: Slurm runs, queues and cancels jobs
(whose processes then end), and sshd lets the tests' key in, and only that key."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.remote_hosts import COMMAND_SECONDS, SlurmCluster, SshHost


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + COMMAND_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"still not {what}"
        time.sleep(0.1)


def test_srun_runs_a_command_on_the_node(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.run("srun", "hostname").strip() == socket.gethostname()
    # What a launcher's `srun` gets: the cluster, and a python3 with the kernel's packages.
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    script = "import sys, zmq, ipykernel; print(sys.prefix)"
    assert slurm_cluster.run("srun", "python3", "-c", script).strip() == sys.prefix


def test_more_jobs_than_cpus_run_at_once_and_scancel_ends_their_processes(
    slurm_cluster: SlurmCluster,
) -> None:
    """Kernels sleep, so the node takes more of them than it has CPUs; a cancelled job is
    reported CANCELLED and its processes end."""
    seconds = f"{random.randint(10_000, 99_999)}.5"  # marks the jobs' processes
    jobs = [
        slurm_cluster.run(
            "sbatch", "--parsable", "--output=/dev/null", f"--wrap=exec sleep {seconds}"
        ).strip()
        for _ in range(slurm_cluster.cpus + 1)
    ]

    def sleeping() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", seconds]
        ]

    wait_for("running", lambda: {slurm_cluster.job_state(job) for job in jobs} == {"RUNNING"})
    wait_for("sleeping", lambda: len(sleeping()) == len(jobs))
    slurm_cluster.run("scancel", *jobs)
    wait_for("cancelled", lambda: {slurm_cluster.job_state(job) for job in jobs} == {"CANCELLED"})
    wait_for("gone", lambda: not sleeping())
    assert not set(jobs) & set(slurm_cluster.active_jobs())


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False
    )


def test_ssh_runs_a_command_on_the_host(ssh_host: SshHost, isolated_home: Path) -> None:
    done = run(*ssh_host.argv("echo ok; echo $HOME; command -v python3"))
    assert done.returncode == 0, done.stderr
    ok, home, python = done.stdout.splitlines()
    assert ok == "ok"
    # The host's environment: the tests' home, and a python3 with the kernel's packages.
    assert home == str(isolated_home)
    assert run(*ssh_host.argv(python, "-c", "'import zmq, ipykernel'")).returncode == 0


def test_sshd_refuses_another_key(ssh_host: SshHost, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], check=True)
    options = list(ssh_host.options)
    options[options.index(str(ssh_host.identity))] = str(stranger)
    done = run("ssh", *options, ssh_host.destination, "echo ok")
    assert done.returncode == 255
    assert "Permission denied" in done.stderr
