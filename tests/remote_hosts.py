"""A single-node Slurm cluster and an sshd on loopback, started by the tests themselves: the
remote launchers' tests need a real cluster and a real host, a CI machine has neither running,
and the tests must neither depend on nor change a machine's own.

Each runs as root in the foreground from a fresh temp dir (under /tmp: Unix socket paths are
short), with throwaway keys and ports of its own, and is stopped by PID when the test session
ends. Without root or the Debian packages (`.ci/run` installs them) the fixtures skip, or
fail when CI is set. tests/conftest.py makes the fixtures available to every test module.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import attrs
import pytest

from kallichore.jupyter.connection import PortAllocator
from tests.jupyter.servers import stop

# Hang guards, not measures of speed.
START_SECONDS = 60.0
COMMAND_SECONDS = 30.0
# Slurm's names for the one partition and its one node.
PARTITION = "debug"
NODE = "localhost"
# Jobs a CPU may run at once: a kernel sleeps most of the time, and a test may hold several.
JOBS_PER_CPU = 8
SLURM_PROGRAMS = (
    "setpriv",
    "munged",
    "slurmctld",
    "slurmd",
    "srun",
    "sbatch",
    "scancel",
    "scontrol",
    "sinfo",
    "squeue",
)
SSH_PROGRAMS = ("setpriv", "sshd", "ssh", "ssh-keygen")
# The test interpreter's bin: its `python3` has pyzmq and ipykernel, as on a prepared cluster
# node or remote host, so it comes first on PATH for jobs and ssh sessions.
INTERPRETER_BIN = str(Path(sys.executable).parent)
# Where Debian's packages put daemons, for a PATH without the sbin directories.
SEARCH_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when CI is set: `.ci/run` must provide what it needs."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


def require_root_and(programs: Sequence[str]) -> dict[str, str]:
    """The paths of `programs`, or the test skipped/failed (`unavailable`) with what is missing."""
    if os.geteuid() != 0:
        unavailable("needs root to run its own daemons")
    paths = {name: shutil.which(name, path=SEARCH_PATH) for name in programs}
    missing = sorted(name for name, path in paths.items() if path is None)
    if missing:
        unavailable(f"missing {', '.join(missing)}")
    return {name: path for name, path in paths.items() if path is not None}


@attrs.frozen
class Daemon:
    """A daemon running in the foreground, and its log (stdout and stderr)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{tail}")


def start_daemon(stack: contextlib.ExitStack, name: str, argv: Sequence[str], log: Path) -> Daemon:
    """`argv` started in its own process group, stopped (by PID) when `stack` closes, and sent
    SIGTERM if the test process dies first (even by SIGKILL), so that a crashed test run
    leaves no daemon behind."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM", *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(stop, process)
    return Daemon(name, process, log)


def wait_until(ready: Callable[[], bool], daemons: Sequence[Daemon], what: str) -> None:
    """Poll `ready` until it holds; fail at once with its log if a daemon exits meanwhile."""
    deadline = time.monotonic() + START_SECONDS
    while not ready():
        for daemon in daemons:
            daemon.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {START_SECONDS} s")
        time.sleep(0.05)


def short_temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# -- Slurm ------------------------------------------------------------------------------------


@attrs.frozen
class SlurmCluster:
    """A running single-node cluster: `conf` is its slurm.conf, which the Slurm commands find
    through SLURM_CONF (`env`)."""

    conf: Path
    cpus: int
    partition: str = PARTITION

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str) -> str:
        """A Slurm command's stdout; CalledProcessError (with its stderr) if it fails."""
        done = subprocess.run(
            argv,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
            check=True,
        )
        return done.stdout

    def job_state(self, job_id: str) -> str:
        """JobState of `scontrol show job` (PENDING, RUNNING, CANCELLED, COMPLETED, ...): a job
        stays known for MinJobAge after it ends."""
        fields = self.run("scontrol", "show", "job", "--oneliner", job_id).split()
        return next(field.partition("=")[2] for field in fields if field.startswith("JobState="))

    def active_jobs(self) -> list[str]:
        """The ids of the jobs pending, running or completing."""
        return self.run("squeue", "--noheader", "--format=%i").split()


def node_hardware(slurmd: str) -> dict[str, str]:
    """This machine's CPUs, sockets, cores, threads and memory, as `slurmd -C` reports them."""
    done = subprocess.run(
        [slurmd, "-C"], capture_output=True, text=True, timeout=COMMAND_SECONDS, check=True
    )
    fields = dict(field.split("=", 1) for field in done.stdout.splitlines()[0].split())
    fields.pop("NodeName")
    return fields


def slurm_conf(root: Path, ports: Sequence[int], hardware: dict[str, str]) -> str:
    """slurm.conf for one node named `NODE`, with every file under `root`.

    Processes are tracked by parentage and tasks get no cgroup or affinity: a container has no
    systemd to delegate cgroups. Memory is not a consumable resource and each CPU takes
    `JOBS_PER_CPU` jobs, so kernels, which sleep, never queue behind each other. A cancelled job
    gets SIGKILL 2 s after SIGTERM, and an ended job stays visible to `scontrol show job` for
    an hour.
    """
    node = " ".join(f"{name}={value}" for name, value in hardware.items())
    return f"""\
ClusterName=kallichore-test
SlurmctldHost={NODE}
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
InactiveLimit=0
KillWait=2
MinJobAge=3600
NodeName={NODE} {node} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:{JOBS_PER_CPU}
"""


@contextlib.contextmanager
def running_slurm_cluster(programs: dict[str, str]) -> Iterator[SlurmCluster]:
    """munged with a fresh key, slurmctld and slurmd, until the node is idle; at the end the
    jobs left are cancelled and the daemons stopped."""
    root = short_temp_dir("kc-slurm-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        for name in ("state", "spool", "munge"):
            (root / name).mkdir(mode=0o755)
        key = root / "munge" / "munge.key"
        key.touch(mode=0o600)
        key.write_bytes(os.urandom(128))
        socket_path = root / "munge" / "socket"
        munged = start_daemon(
            stack,
            "munged",
            [
                programs["munged"],
                "--foreground",
                "--force",  # its socket is in a private (0700) dir, which munged refuses
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={root}/munge/munged.pid",
                f"--seed-file={root}/munge/munged.seed",
            ],
            root / "munged.log",
        )
        wait_until(socket_path.exists, [munged], "munged")

        allocator = PortAllocator.for_this_machine()
        hardware = node_hardware(programs["slurmd"])
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, allocator.allocate(2), hardware))
        (root / "plugstack.conf").touch()
        cluster = SlurmCluster(conf, cpus=int(hardware["CPUs"]))
        daemons = [
            munged,
            start_daemon(
                stack,
                "slurmctld",
                [programs["slurmctld"], "-D", "-f", str(conf)],
                root / "slurmctld.log",
            ),
            start_daemon(
                stack,
                "slurmd",
                [programs["slurmd"], "-D", "-N", NODE, "-f", str(conf)],
                root / "slurmd.log",
            ),
        ]

        def node_idle() -> bool:
            try:
                state = cluster.run("sinfo", "--noheader", "--node", NODE, "--format=%T")
            except subprocess.CalledProcessError:
                return False  # slurmctld not listening yet
            return state.strip() == "idle"

        wait_until(node_idle, daemons, "the Slurm node")
        stack.callback(cancel_jobs, cluster)
        yield cluster


def cancel_jobs(cluster: SlurmCluster) -> None:
    """Cancel what the tests left and wait until it has ended: a job's processes belong to
    slurmstepd, which stopping slurmd would leave running."""
    if not cluster.active_jobs():
        return
    cluster.run("scancel", f"--user={os.geteuid()}")
    deadline = time.monotonic() + COMMAND_SECONDS
    while cluster.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster with one partition, running for the whole test session.

    SLURM_CONF is set in os.environ meanwhile, so `srun` and `sbatch` run by the code under
    test (embedded or a daemon subprocess) reach it; and as jobs inherit the environment,
    `INTERPRETER_BIN` comes first on PATH, where nox has put it anyway.
    """
    programs = require_root_and(SLURM_PROGRAMS)
    with running_slurm_cluster(programs) as cluster, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        patch.setenv("PATH", INTERPRETER_BIN, prepend=os.pathsep)
        yield cluster


# -- SSH --------------------------------------------------------------------------------------


@attrs.frozen
class SshHost:
    """A running sshd on loopback that lets `user` in with the key `identity`, and the ssh
    options that reach it with the host key pinned and never a prompt."""

    user: str
    port: int
    identity: Path
    known_hosts: Path
    host: str = "127.0.0.1"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def options(self) -> tuple[str, ...]:
        """ssh's options, without the user's or the machine's ssh_config."""
        return (
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-i",
            str(self.identity),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        )

    def argv(self, *command: str) -> list[str]:
        """`ssh` running `command` on the host."""
        return ["ssh", *self.options, self.destination, *command]


def sshd_config(root: Path, port: int, login_env: dict[str, str]) -> str:
    """Key-only logins (root included) on 127.0.0.1:`port`, with `login_env` in every session.

    StrictModes is off because the key files lie under /tmp, which is world-writable.
    """
    settings = " ".join(f'"{name}={value}"' for name, value in login_env.items())
    return f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
MaxStartups 100
SetEnv {settings}
"""


def login_environment() -> dict[str, str]:
    """What a session on the host gets on top of sshd's defaults: `INTERPRETER_BIN` first on
    PATH, and the tests' isolated home (tests/conftest.py), so a remote kernel writes nowhere
    else."""
    path = os.pathsep.join((INTERPRETER_BIN, "/usr/local/bin", "/usr/bin", "/bin"))
    names = ("HOME", "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "MPLBACKEND")
    return {"PATH": path} | {name: os.environ[name] for name in names if name in os.environ}


def make_key(path: Path, ssh_keygen: str) -> str:
    """A new ed25519 key pair without passphrase at `path`; its public line."""
    subprocess.run(
        [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=COMMAND_SECONDS,
    )
    return path.with_suffix(".pub").read_text()


def accepts_connections(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def running_sshd(programs: dict[str, str]) -> Iterator[SshHost]:
    """sshd with a fresh host key, letting the current user in with a fresh client key."""
    root = short_temp_dir("kc-sshd-")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        host_key = make_key(root / "host_key", programs["ssh-keygen"])
        (root / "authorized_keys").write_text(make_key(root / "id", programs["ssh-keygen"]))
        (port,) = PortAllocator.for_this_machine().allocate(1)
        algorithm, key = host_key.split()[:2]
        (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {algorithm} {key}\n")
        config = root / "sshd_config"
        config.write_text(sshd_config(root, port, login_environment()))
        # The privilege separation directory, which Debian's service would make.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd = start_daemon(
            stack, "sshd", [programs["sshd"], "-D", "-e", "-f", str(config)], root / "sshd.log"
        )
        wait_until(lambda: accepts_connections(port), [sshd], "sshd")
        user = pwd.getpwuid(os.geteuid()).pw_name
        yield SshHost(user, port, identity=root / "id", known_hosts=root / "known_hosts")


@pytest.fixture(scope="session")
def ssh_host(isolated_home: Path) -> Iterator[SshHost]:
    """An sshd on a loopback port for the whole test session (see `SshHost`), whose sessions
    use `isolated_home`."""
    with running_sshd(require_root_and(SSH_PROGRAMS)) as host:
        yield host
