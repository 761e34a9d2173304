"""Kernels on another machine: the `ssh` launcher against a real sshd on loopback, and the
`slurm` launcher on a real single-node Slurm cluster (tests/remote_hosts.py), through the
real server, with real ipykernel processes.

Each launcher: start, `print(6*7)` with its ZeroMQ traffic captured on loopback (encrypted: the
code's text is not in it), an interrupt of `time.sleep(60)`, a restart, a kill (the remote
process or job gone afterwards), and a kernel ended out of band (`kill` on the host, `scancel`)
reported `exited` with the reason. Then the Jupyter API on a remote kernel, and a dropped ssh
connection that the daemon reconnects without losing the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest
import trio

from kallichore.client import ApiError, KallichoreClient, StatusChanged
from kallichore.session.launch.options import SshLauncher, parse_launcher
from kallichore.session.launch.ssh import SshPlan
from kallichore.supervisor import open_supervisor
from tests.conftest import (
    IPYKERNEL_ARGV,
    TIMEOUT,
    TOKEN,
    daemon,
    ipykernel_spec,
    new_session_body,
    serve,
    supervisor_config,
)
from tests.loopback_capture import capture_loopback
from tests.remote_hosts import SlurmCluster, SshHost

# In the code and in its output: neither may cross loopback in plaintext.
PROBE = "kallichore" + "-plaintext-probe"
CODE = f"probe = {PROBE!r}\nprint(6*7, probe[::-1])"


@attrs.frozen
class Remote:
    """A launcher under test: its block, and how to tell (and make) its kernel gone."""

    name: str
    block: dict[str, Any]
    # Whether what the session's `launcher` details name still runs.
    running: Callable[[dict[str, Any]], bool]
    # End the kernel out of band (as its host's or cluster's owner would); the reason's words.
    end_out_of_band: Callable[[dict[str, Any]], None]
    ended_because: str


def ssh_remote(host: SshHost) -> Remote:
    def kill_on_host(details: dict[str, Any]) -> None:
        os.kill(details["pid"], signal.SIGKILL)

    return Remote(
        name="ssh",
        block={"launcher": "ssh", "host": host.destination, "ssh_args": list(host.options)},
        running=lambda details: psutil.pid_exists(details["pid"]),
        end_out_of_band=kill_on_host,
        ended_because="killed by SIGKILL",
    )


def slurm_remote(cluster: SlurmCluster) -> Remote:
    def cancel(details: dict[str, Any]) -> None:
        cluster.run("scancel", details["job_id"])

    return Remote(
        name="slurm",
        block={"launcher": "slurm", "partition": cluster.partition, "time": "00:10:00"},
        running=lambda details: details["job_id"] in cluster.active_jobs(),
        end_out_of_band=cancel,
        ended_because="was cancelled",
    )


@pytest.fixture(params=["ssh", "slurm"])
def remote(request: pytest.FixtureRequest) -> Remote:
    if request.param == "ssh":
        return ssh_remote(request.getfixturevalue("ssh_host"))
    return slurm_remote(request.getfixturevalue("slurm_cluster"))


@pytest.fixture
async def client(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[KallichoreClient]:
    async with open_supervisor(supervisor_config(tmp_path / "runtime")) as supervisor:
        running = await serve(supervisor, nursery)
        async with KallichoreClient(running.url, token=TOKEN, timeout=TIMEOUT) as client:
            yield client
        nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait until `check()` holds (a hang guard, not a timing assumption)."""
    with trio.fail_after(TIMEOUT):
        while not check():
            await trio.sleep(0.1)


async def status_of(client: KallichoreClient, session_id: str) -> str:
    details = await client.get_session(session_id)
    status: str = details["status"]
    return status


async def test_a_remote_kernel_from_start_to_kill(client: KallichoreClient, remote: Remote) -> None:
    sid = f"remote-{remote.name}"
    await client.create_session(
        **new_session_body(sid, interrupt_mode="signal", launcher=remote.block)
    )
    # Started with the loopback captured: what the launcher carries (srun forwards stdin and
    # output unencrypted) holds none of the kernel's secrets.
    with capture_loopback() as start:
        await client.start(sid)
    details = (await client.get_session(sid))["launcher"]
    assert details["launcher"] == remote.name
    assert remote.running(details)
    info = await client.connection_info(sid)
    assert info.curve_secretkey is not None
    seen = start.payload()
    assert len(seen) > 1000  # the start's traffic is there
    assert info.key.encode() not in seen
    assert info.curve_secretkey.encode() not in seen

    # Executed with its ZeroMQ traffic captured: encrypted, so the probe is not in it.
    kernel_ports = [info.shell_port, info.iopub_port, info.control_port, info.stdin_port]
    with capture_loopback() as capture:
        outcome = await client.execute(sid, CODE)
    assert outcome["status"] == "ok"
    assert outcome["output"][0]["text"] == f"42 {PROBE[::-1]}\n"
    kernel_traffic = capture.payload(ports=kernel_ports)
    assert len(kernel_traffic) > 200  # the execution's messages went through those ports
    assert PROBE.encode() not in kernel_traffic
    assert PROBE[::-1].encode() not in kernel_traffic

    # An interrupt reaches the remote kernel.
    outcome = await interrupted_sleep(client, sid)
    assert outcome["status"] == "error"
    assert outcome["error_name"] == "KeyboardInterrupt"

    # A restart is a new remote kernel (a new job); the old one is gone.
    await client.restart(sid)
    await eventually_async(lambda: status_is(client, sid, "idle"))
    restarted = (await client.get_session(sid))["launcher"]
    assert restarted != details
    await eventually(lambda: not remote.running(details))
    outcome = await client.execute(sid, "print(6*7)")
    assert outcome["output"][0]["text"] == "42\n"

    # A kill ends it, and nothing is left where it ran.
    await client.kill(sid)
    assert await status_of(client, sid) == "exited"
    await eventually(lambda: not remote.running(restarted))

    # Ended out of band: reported exited, with the reason (a new session: its channel holds
    # nothing of before).
    sid = f"remote-{remote.name}-2"
    await client.create_session(**new_session_body(sid, launcher=remote.block))
    async with client.channels(sid) as channels:
        await client.start(sid)
        details = (await client.get_session(sid))["launcher"]
        remote.end_out_of_band(details)
        with trio.fail_after(TIMEOUT):
            events = await channels.receive_until(
                lambda e: isinstance(e, StatusChanged) and e.status == "exited"
            )
    exited = events[-1]
    assert isinstance(exited, StatusChanged)
    assert exited.reason is not None
    assert remote.ended_because in exited.reason
    await eventually(lambda: not remote.running(details))


async def interrupted_sleep(client: KallichoreClient, session_id: str) -> dict[str, Any]:
    """The outcome of `time.sleep(60)`, interrupted once the kernel runs it."""
    async with trio.open_nursery() as nursery:
        outcomes: list[dict[str, Any]] = []

        async def sleep_long() -> None:
            outcomes.append(await client.execute(session_id, "import time; time.sleep(60)"))

        nursery.start_soon(sleep_long)
        await eventually_async(lambda: status_is(client, session_id, "busy"))
        await client.interrupt(session_id)
    return outcomes[0]


async def status_is(client: KallichoreClient, session_id: str, status: str) -> bool:
    return await status_of(client, session_id) == status


async def eventually_async(check: Callable[[], Any]) -> None:
    """`eventually` for a check that must be awaited."""
    with trio.fail_after(TIMEOUT):
        while not await check():
            await trio.sleep(0.1)


def write_kernelspec(name: str, block: dict[str, Any]) -> Path:
    """An ipykernel kernelspec `name` in the tests' Jupyter data dir whose
    `metadata.kallichore` is `block`; its directory (for the test to remove)."""
    spec_dir = Path(os.environ["JUPYTER_DATA_DIR"]) / "kernels" / name
    spec_dir.mkdir(parents=True)
    kernel_json = {
        "argv": list(IPYKERNEL_ARGV),
        "display_name": f"Python ({name})",
        "language": "python",
        "metadata": {"kallichore": block},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json))
    return spec_dir


async def test_the_jupyter_api_on_a_kernelspec_that_runs_over_ssh(
    client: KallichoreClient, ssh_host: SshHost, isolated_home: Path
) -> None:
    """A kernelspec whose `metadata.kallichore` names the ssh launcher, started through the
    Jupyter API: its v1 channels run code, and deleting the kernel ends the remote process."""
    spec_dir = write_kernelspec("remote-python", ssh_remote(ssh_host).block)
    try:
        http = client.http
        created = (await http.post("/api/kernels", json={"name": "remote-python"})).json()
        kernel_id = created["id"]
        await eventually_async(lambda: status_is(client, kernel_id, "idle"))
        details = (await client.get_session(kernel_id))["launcher"]
        assert details["launcher"] == "ssh"
        async with client.jupyter_channels(kernel_id) as channels:
            with trio.fail_after(TIMEOUT):
                assert (await channels.execute("print(6*7)")).stdout == "42\n"
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        await eventually(lambda: not psutil.pid_exists(details["pid"]))
    finally:
        shutil.rmtree(spec_dir)


def ssh_clients(*words: str) -> list[psutil.Process]:
    """Our running `ssh` children whose command line holds `words`."""
    found = []
    for child in psutil.Process().children():
        try:
            command = " ".join(child.cmdline())
            if child.name() == "ssh" and all(word in command for word in words):
                found.append(child)
        except psutil.Error:  # gone, or a zombie not reaped yet
            continue
    return found


async def test_a_dropped_ssh_connection_is_made_again_and_the_kernel_kept(
    client: KallichoreClient, ssh_host: SshHost
) -> None:
    sid = "remote-reconnected"
    block = ssh_remote(ssh_host).block
    await client.create_session(**new_session_body(sid, interrupt_mode="signal", launcher=block))
    await client.start(sid)
    await client.execute(sid, "x = 6")
    (first,) = ssh_clients(ssh_host.destination)
    first.kill()
    # The daemon reattaches to the shim over a new connection; the kernel never noticed.
    await eventually(lambda: len(ssh_clients("attach")) == 1)
    outcome = await client.execute(sid, "print(x * 7)")
    assert outcome["output"][0]["text"] == "42\n"
    assert await status_of(client, sid) == "idle"
    # Signals travel the new connection.
    assert (await interrupted_sleep(client, sid))["error_name"] == "KeyboardInterrupt"
    details = (await client.get_session(sid))["launcher"]
    await client.kill(sid)
    await eventually(lambda: not psutil.pid_exists(details["pid"]))
    assert ssh_clients(ssh_host.destination) == []


async def test_a_job_waiting_in_the_queue_is_shown_and_given_up_after_the_timeout(
    client: KallichoreClient, slurm_cluster: SlurmCluster
) -> None:
    """A job that cannot start yet (held until later) is `starting` with the queue as the
    reason; past the session's `connection_timeout` the start fails and the job is gone."""
    sid = "remote-queued"
    block = slurm_remote(slurm_cluster).block | {"extra_args": ["--begin=now+3600"]}
    await client.create_session(**new_session_body(sid, connection_timeout=3, launcher=block))
    async with client.channels(sid) as channels:
        with pytest.raises(ApiError) as refused:
            await client.start(sid)
        with trio.fail_after(TIMEOUT):
            events = await channels.receive_until(
                lambda e: isinstance(e, StatusChanged) and e.status == "exited"
            )
    reasons = [e.reason for e in events if isinstance(e, StatusChanged) and e.reason]
    assert any("queued, waiting for resources" in reason for reason in reasons)
    assert "did not register within 3 seconds" in str(refused.value)
    assert "the slurm launcher had not started the kernel yet" in str(refused.value)
    await eventually(lambda: slurm_cluster.active_jobs() == [])


@pytest.mark.parametrize("curve", [True, False])
async def test_a_local_kernel_is_encrypted_when_its_launcher_says_curve(
    tmp_path: Path, curve: bool
) -> None:
    """Over loopback TCP, a local kernel whose launcher block says `curve` (ipykernel >= 7)
    carries no plaintext; without it the same capture does see the code (the check can fail)."""
    config = supervisor_config(tmp_path / "runtime")
    config = attrs.evolve(config, session=attrs.evolve(config.session, kernel_transport="tcp"))
    spec = ipykernel_spec("local-curve", launcher=parse_launcher({"curve": curve}))
    async with open_supervisor(config) as supervisor:
        session = await supervisor.create_session(spec)
        await session.start()
        info = session.connection_info
        assert info is not None
        assert (info.curve is not None) == curve
        with capture_loopback() as capture:
            outcome = await session.run_code(CODE, timeout=TIMEOUT)
        assert outcome.output[0]["text"] == f"42 {PROBE[::-1]}\n"
        traffic = capture.payload(ports=[info.shell_port, info.iopub_port])
        assert (PROBE.encode() in traffic) == (not curve)
        assert (PROBE[::-1].encode() in traffic) == (not curve)


async def test_a_launcher_named_by_a_list_or_object_is_a_400(
    client: KallichoreClient, isolated_home: Path
) -> None:
    """Not a 500: in a request and in a kernelspec, the message names the launcher."""
    http = client.http
    body = new_session_body("wrong-shape", launcher={"launcher": ["ssh"]})
    refused = await http.put("/sessions", json=body)
    assert refused.status_code == 400
    assert "invalid launcher: unknown launcher ['ssh']" in refused.text
    spec_dir = write_kernelspec("wrong-shape", {"launcher": {"slurm": True}})
    try:
        refused = await http.post("/api/kernels", json={"name": "wrong-shape"})
        assert refused.status_code == 400
        assert "invalid launcher: unknown launcher" in refused.text
    finally:
        shutil.rmtree(spec_dir)


def without_config_file(options: tuple[str, ...]) -> list[str]:
    """ssh options with their `-F /dev/null` left out."""
    at = options.index("-F")
    return [*options[:at], *options[at + 2 :]]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        # A key the host does not accept (its own host key) instead of ours.
        (
            lambda host: {
                "ssh_args": [
                    str(host.identity.parent / "host_key") if arg == str(host.identity) else arg
                    for arg in host.options
                ]
            },
            "ssh could not connect to",
        ),
        (
            lambda host: {"python": "/nonexistent/python3"},
            "'/nonexistent/python3' was not found on",
        ),
    ],
)
async def test_an_ssh_start_that_fails_says_why_and_leaves_nothing(
    client: KallichoreClient,
    ssh_host: SshHost,
    change: Callable[[SshHost], dict[str, Any]],
    says: str,
) -> None:
    sid = "remote-refused"
    block = ssh_remote(ssh_host).block | change(ssh_host)
    await client.create_session(**new_session_body(sid, launcher=block))
    with pytest.raises(ApiError) as refused:
        await client.start(sid)
    assert f"the ssh launcher did not start the kernel: {says}" in str(refused.value)
    assert ssh_clients(ssh_host.destination) == []


async def test_an_ssh_host_that_never_answers_fails_the_start_and_says_so(
    client: KallichoreClient, ssh_host: SshHost
) -> None:
    """A host whose port takes the connection and never speaks: ssh gives up after its
    ConnectTimeout, within the session's connection_timeout, with ssh's own words."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        at = ssh_host.options.index("-p")
        block = {
            "launcher": "ssh",
            "host": ssh_host.destination,
            "port": silent.getsockname()[1],
            "ssh_args": [*ssh_host.options[:at], *ssh_host.options[at + 2 :]],
        }
        sid = "remote-silent"
        await client.create_session(**new_session_body(sid, launcher=block))
        refused = await client.http.post(f"/sessions/{sid}/start")
    assert refused.status_code == 500
    assert "ssh could not connect to" in refused.json()["error"]["message"]
    assert "timed out" in refused.json()["output"]  # ssh's own words
    assert ssh_clients(ssh_host.destination) == []


def test_ssh_args_come_before_our_ssh_options_so_that_theirs_win() -> None:
    """ssh takes the first value of an option given twice (ssh_config(5))."""
    block = {"launcher": "ssh", "host": "h", "ssh_args": ["-o", "ConnectTimeout=3"]}
    options = parse_launcher(block)
    assert isinstance(options, SshLauncher)
    argv = SshPlan(options).command("python3")
    assert argv.index("ConnectTimeout=3") < argv.index("ConnectTimeout=10")
    assert argv.index("ConnectTimeout=3") < argv.index("BatchMode=yes")


async def test_a_launcher_program_not_on_path_is_named(
    client: KallichoreClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    for block, program in [
        ({"launcher": "slurm"}, "srun"),
        ({"launcher": "ssh", "host": "h"}, "ssh"),
    ]:
        sid = f"no-{program}"
        await client.create_session(**new_session_body(sid, launcher=block))
        with pytest.raises(ApiError) as refused:
            await client.start(sid)
        assert f"failed to start the {block['launcher']} launcher: '{program}'" in str(
            refused.value
        )


async def test_an_ssh_config_host_is_reached_by_its_host_name(
    client: KallichoreClient, ssh_host: SshHost, tmp_path: Path
) -> None:
    """`host` may be a Host of an ssh_config: our address is found towards its HostName."""
    config = tmp_path / "ssh_config"
    config.write_text(f"Host kallichore-alias\n  HostName {ssh_host.host}\n")
    block = {
        "launcher": "ssh",
        "host": f"{ssh_host.user}@kallichore-alias",
        "ssh_args": ["-F", str(config), *without_config_file(ssh_host.options)],
    }
    sid = "remote-alias"
    await client.create_session(**new_session_body(sid, launcher=block))
    await client.start(sid)
    details = (await client.get_session(sid))["launcher"]
    await client.kill(sid)
    await eventually(lambda: not psutil.pid_exists(details["pid"]))


async def test_a_remote_kernels_program_is_not_looked_for_here(client: KallichoreClient) -> None:
    """The argv of a kernel on another machine names a program there: no KS-19 for it here,
    as there is for a local kernel; a bad launcher block is a 400 naming the field."""
    argv = [
        "/opt/only-on-the-cluster/python",
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
    ]
    block = {"launcher": "slurm", "partition": "gpu"}
    await client.create_session(**new_session_body("remote-argv", argv=argv, launcher=block))
    with pytest.raises(ApiError) as local:
        await client.create_session(**new_session_body("local-argv", argv=argv))
    assert local.value.code == "KS-19"
    with pytest.raises(ApiError) as bad:
        await client.create_session(
            **new_session_body("bad-launcher", launcher={"launcher": "slurm", "time": 60})
        )
    assert bad.value.status == 400
    assert "time must be a non-empty string" in str(bad.value)


async def test_a_queued_job_goes_with_a_killed_daemon(
    tmp_path: Path, slurm_cluster: SlurmCluster
) -> None:
    """srun waiting for a queued job reads nothing: the daemon's death is told it by SIGTERM,
    on which it cancels the job."""
    block = slurm_remote(slurm_cluster).block | {"extra_args": ["--begin=now+3600"]}
    async with daemon(tmp_path) as killed, killed.client() as client:
        sid = "queued-orphan"
        await client.create_session(**new_session_body(sid, launcher=block))

        async def start() -> None:
            with contextlib.suppress(Exception):  # the daemon dies meanwhile
                await client.start(sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            await eventually(lambda: slurm_cluster.active_jobs() != [])
            killed.process.kill()
            await killed.wait()
            nursery.cancel_scope.cancel()
    await eventually(lambda: slurm_cluster.active_jobs() == [])
    assert not any("srun" in p.name() for p in psutil.Process().children(recursive=True))
