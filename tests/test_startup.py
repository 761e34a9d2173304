"""Shell wrappers for kernels, run through real shells around a small probe program."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kallichore.errors import ErrorCode, StartupError
from kallichore.session import startup
from kallichore.session.model import StartupEnvironment
from kallichore.session.startup import (
    BEGIN_MARKER,
    SUCCESS_MARKER,
    build_command,
    choose_shell,
    is_marker_line,
    startup_failure_details,
)

# Stands in for a kernel: reports who and where it is, and what it was given.
PROBE = [
    sys.executable,
    "-c",
    "import json, os, sys; print(json.dumps({'pid': os.getpid(), 'ppid': os.getppid(), "
    "'var': os.environ.get('PROBE_VAR'), 'cwd': os.getcwd(), 'argv': sys.argv[1:]}))",
]

# Arguments that each break naive quoting in at least one shell.
AWKWARD_ARGS = [
    "with space",
    "it's",
    '"double"',
    "$HOME",
    "${PROBE_VAR}",
    "`echo injected`",
    "$(echo injected)",
    "a!b",
    "!!",
    "",
    "two\nlines",
    "back\\slash",
    "*",
    "~",
    "semi;colon && more",
    "-c",
]

COMMAND = StartupEnvironment.COMMAND
SCRIPT = StartupEnvironment.SCRIPT
SHELL = StartupEnvironment.SHELL
NONE = StartupEnvironment.NONE


def shell_param(name: str) -> Any:
    path = shutil.which(name)
    return pytest.param(
        path or name, id=name, marks=pytest.mark.skipif(path is None, reason=f"no {name} here")
    )


BASH = shutil.which("bash") or "/bin/bash"
SH_FAMILY = [shell_param("bash"), shell_param("sh"), shell_param("zsh")]
ALL_SHELLS = [*SH_FAMILY, shell_param("tcsh")]


def is_csh(shell: str) -> bool:
    return Path(shell).name in ("csh", "tcsh")


def export(shell: str, value: str) -> str:
    """A command, in `shell`'s language, that exports PROBE_VAR=value."""
    if is_csh(shell):
        return f"setenv PROBE_VAR {value}"
    return f"export PROBE_VAR={value}"


@dataclass
class Run:
    pid: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def probe(self) -> dict[str, Any] | None:
        """What the probe reported, if it ran."""
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result
        return None

    def ran(self) -> dict[str, Any]:
        assert self.probe is not None, f"probe did not run: {self}"
        return self.probe


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME of its own, so login and interactive shells don't read the real user's files."""
    path = tmp_path / "home"
    path.mkdir()
    # Keeps zsh from offering its new-user setup to an interactive shell.
    (path / ".zshrc").touch()
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work dir"
    path.mkdir()
    return path


def run(cmd: list[str], home: Path, cwd: Path, **env: str) -> Run:
    """Spawn `cmd` as the session layer does: own session, no stdin, piped output."""
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home), **env}
    with subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    ) as proc:
        stdout, stderr = proc.communicate(timeout=60)
    return Run(proc.pid, proc.returncode, stdout, stderr)


def wrap(shell: str | None, mode: StartupEnvironment, arg: str | None, workdir: Path) -> list[str]:
    return build_command(
        [*PROBE, *AWKWARD_ARGS], mode, arg, working_directory=str(workdir), shell=shell
    )


def assert_is_the_kernel(result: Run, workdir: Path) -> dict[str, Any]:
    """The probe replaced the shell, got its arguments intact and runs in the right place."""
    probe = result.ran()
    assert result.returncode == 0, result
    assert probe["pid"] == result.pid
    assert probe["ppid"] == os.getpid()
    assert probe["argv"] == AWKWARD_ARGS
    assert probe["cwd"] == str(workdir)
    return probe


def marker_lines(result: Run) -> list[str]:
    return [line for line in result.stdout.splitlines(keepends=True) if is_marker_line(line)]


# --- none / no shell ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(StartupEnvironment))
def test_argv_is_unchanged_without_a_wrapper(mode: StartupEnvironment, workdir: Path) -> None:
    argv = [*PROBE, *AWKWARD_ARGS]
    assert wrap(None, mode, "setup", workdir) == argv
    if mode is NONE:
        assert wrap("/bin/sh", mode, "setup", workdir) == argv


def test_none_mode_runs_the_kernel_itself(home: Path, workdir: Path) -> None:
    result = run(wrap("/bin/sh", NONE, None, workdir), home, workdir, PROBE_VAR="env")
    assert assert_is_the_kernel(result, workdir)["var"] == "env"


# --- shell ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ALL_SHELLS)
def test_shell_mode_execs_the_kernel(shell: str, home: Path, workdir: Path) -> None:
    result = run(wrap(shell, SHELL, None, workdir), home, workdir, PROBE_VAR="env")
    assert assert_is_the_kernel(result, workdir)["var"] == "env"
    assert marker_lines(result) == []


@pytest.mark.parametrize(("shell", "profile"), [(BASH, ".bash_profile"), ("/bin/sh", ".profile")])
def test_shell_mode_is_a_login_shell(shell: str, profile: str, home: Path, workdir: Path) -> None:
    (home / profile).write_text("export PROBE_VAR=profile\n")
    result = run(wrap(shell, SHELL, None, workdir), home, workdir)
    assert assert_is_the_kernel(result, workdir)["var"] == "profile"


@pytest.mark.parametrize(
    ("shell", "flag"),
    [
        ("/bin/bash", "--login"),
        ("/usr/local/bin/zsh", "--login"),
        ("/bin/sh", "-l"),
        ("/bin/dash", "-l"),
        ("/bin/ksh", "-l"),
        ("/opt/bin/nu", "-l"),
        ("/bin/csh", "-d"),
        ("/usr/bin/tcsh", "-d"),
    ],
)
def test_login_flag_depends_on_the_shell(shell: str, flag: str, workdir: Path) -> None:
    assert wrap(shell, SHELL, None, workdir)[:3] == [shell, flag, "-c"]
    assert wrap(shell, COMMAND, "true", workdir)[:3] == [shell, "-i", "-c"]


# --- command --------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ALL_SHELLS)
def test_command_exports_reach_the_kernel(shell: str, home: Path, workdir: Path) -> None:
    cmd = wrap(shell, COMMAND, export(shell, "from-command"), workdir)
    result = run(cmd, home, workdir, PROBE_VAR="env")
    assert assert_is_the_kernel(result, workdir)["var"] == "from-command"
    assert marker_lines(result) == [f"{BEGIN_MARKER}\n", f"{SUCCESS_MARKER}\n"]
    assert result.stdout.index(SUCCESS_MARKER) < result.stdout.index("{")


@pytest.mark.parametrize("shell", ALL_SHELLS)
@pytest.mark.parametrize(("command", "status"), [("false", None), ("exit 3", 3)])
def test_failing_command_stops_the_kernel(
    shell: str, command: str, status: int | None, home: Path, workdir: Path
) -> None:
    cmd = wrap(shell, COMMAND, f"{export(shell, 'set')} && {command}", workdir)
    result = run(cmd, home, workdir)
    assert result.probe is None
    assert result.returncode != 0
    if status is not None:
        assert result.returncode == status
    assert marker_lines(result) == [f"{BEGIN_MARKER}\n"]
    details = startup_failure_details(COMMAND, command, shell, result.stdout)
    assert details is not None
    assert "failed" in details.splitlines()[-1]


@pytest.mark.parametrize("shell", SH_FAMILY)
@pytest.mark.parametrize(
    "command",
    [
        "export PROBE_VAR=commented # a trailing comment",
        "true\nexport PROBE_VAR=commented\n",
        "export PROBE_VAR=commented; sleep 0 &",
        "false || export PROBE_VAR=commented",
    ],
)
def test_command_is_grouped_as_a_whole(shell: str, command: str, home: Path, workdir: Path) -> None:
    result = run(wrap(shell, COMMAND, command, workdir), home, workdir)
    assert assert_is_the_kernel(result, workdir)["var"] == "commented"


@pytest.mark.parametrize("shell", SH_FAMILY)
def test_last_status_of_a_compound_command_decides(shell: str, home: Path, workdir: Path) -> None:
    result = run(wrap(shell, COMMAND, "true; false", workdir), home, workdir)
    assert result.probe is None
    assert result.returncode != 0


def test_command_mode_is_an_interactive_shell(home: Path, workdir: Path) -> None:
    (home / ".bashrc").write_text("export PROBE_VAR=bashrc\n")
    result = run(wrap(BASH, COMMAND, "true", workdir), home, workdir)
    assert assert_is_the_kernel(result, workdir)["var"] == "bashrc"


@pytest.mark.parametrize("shell", ALL_SHELLS)
def test_kernel_that_cannot_start_after_the_command(shell: str, home: Path, workdir: Path) -> None:
    cmd = build_command(
        [str(workdir / "no-such-kernel")], COMMAND, "true", working_directory=None, shell=shell
    )
    result = run(cmd, home, workdir)
    assert result.returncode != 0
    assert marker_lines(result) == [f"{BEGIN_MARKER}\n", f"{SUCCESS_MARKER}\n"]
    details = startup_failure_details(COMMAND, "true", shell, result.stdout)
    assert details is not None
    assert "succeeded" in details


@pytest.mark.parametrize("mode", [COMMAND, SCRIPT])
@pytest.mark.parametrize("arg", [None, "", "  \n"])
def test_command_and_script_need_an_argument(
    mode: StartupEnvironment, arg: str | None, workdir: Path
) -> None:
    with pytest.raises(StartupError) as caught:
        wrap("/bin/sh", mode, arg, workdir)
    assert caught.value.code is ErrorCode.PROCESS_START_FAILED


# --- script ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ALL_SHELLS)
def test_relative_script_is_sourced_from_the_working_directory(
    shell: str, home: Path, workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / "setup script").write_text(export(shell, "from-script") + "\n")
    monkeypatch.chdir(tmp_path)
    cmd = wrap(shell, SCRIPT, "setup script", workdir)
    result = run(cmd, home, workdir)
    assert assert_is_the_kernel(result, workdir)["var"] == "from-script"
    assert marker_lines(result) == [f"{BEGIN_MARKER}\n", f"{SUCCESS_MARKER}\n"]


@pytest.mark.parametrize("shell", ALL_SHELLS)
def test_failing_script_stops_the_kernel(shell: str, home: Path, workdir: Path) -> None:
    script = workdir / "setup"
    script.write_text(f"{export(shell, 'set')}\nexit 4\n")
    result = run(wrap(shell, SCRIPT, str(script), workdir), home, workdir)
    assert result.probe is None
    assert result.returncode == 4
    assert marker_lines(result) == [f"{BEGIN_MARKER}\n"]


@pytest.mark.parametrize("name", ["missing.sh", "."])
def test_missing_script_is_refused_before_spawning(name: str, workdir: Path) -> None:
    with pytest.raises(StartupError) as caught:
        wrap("/bin/sh", SCRIPT, name, workdir)
    assert caught.value.code is ErrorCode.PROCESS_START_FAILED
    assert str(workdir) in caught.value.message


# --- shell choice ---------------------------------------------------------------------------


def executable(path: Path, mode: int = 0o755) -> str:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return str(path)


@pytest.fixture
def fallbacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two fallback shells standing in for /bin/bash and /bin/sh, both present at first."""
    paths = [executable(tmp_path / "bash"), executable(tmp_path / "sh")]
    monkeypatch.setattr(startup, "_FALLBACK_SHELLS", tuple(paths))
    return paths


def test_server_shell_is_preferred(tmp_path: Path, fallbacks: list[str]) -> None:
    mine = executable(tmp_path / "myshell")
    assert choose_shell({"SHELL": mine}) == mine


@pytest.mark.parametrize("env", [{}, {"SHELL": ""}])
def test_unset_shell_falls_back_quietly(
    env: dict[str, str], fallbacks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert choose_shell(env) == fallbacks[0]
    assert caplog.records == []


@pytest.mark.parametrize("kind", ["missing", "not executable", "directory"])
def test_unusable_shell_is_reported_and_skipped(
    kind: str, tmp_path: Path, fallbacks: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    configured = tmp_path / "configured"
    if kind == "not executable":
        executable(configured, 0o644)
    elif kind == "directory":
        configured.mkdir()
    with caplog.at_level(logging.WARNING):
        assert choose_shell({"SHELL": str(configured)}) == fallbacks[0]
    assert str(configured) in caplog.text


def test_falls_back_to_sh_then_none(fallbacks: list[str]) -> None:
    Path(fallbacks[0]).unlink()
    assert choose_shell({}) == fallbacks[1]
    Path(fallbacks[1]).unlink()
    assert choose_shell({}) is None


# --- markers and details --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (BEGIN_MARKER, True),
        (f"{SUCCESS_MARKER}\n", True),
        (f"{BEGIN_MARKER}\r\n", True),
        (f"{SUCCESS_MARKER}\r", True),
        (f" {BEGIN_MARKER}", False),
        (f"{BEGIN_MARKER} done\n", False),
        (f"echo {SUCCESS_MARKER}", False),
        ("KALLICHORE_STARTUP", False),
        ("", False),
    ],
)
def test_is_marker_line(line: str, expected: bool) -> None:
    assert is_marker_line(line) is expected


@pytest.mark.parametrize(
    ("output", "verdict"),
    [
        ("bash: syntax error\n", "could not be run"),
        (f"{BEGIN_MARKER}\nmodule: not found\n", "failed or did not finish"),
        (f"{BEGIN_MARKER}\r\n{SUCCESS_MARKER}\r\nTraceback\n", "succeeded, but the kernel"),
        (f"say {BEGIN_MARKER}\n", "could not be run"),
    ],
)
@pytest.mark.parametrize(("mode", "subject"), [(COMMAND, "command"), (SCRIPT, "script")])
def test_failure_details_locate_the_fault(
    mode: StartupEnvironment, subject: str, output: str, verdict: str
) -> None:
    details = startup_failure_details(mode, "conda activate x", "/bin/zsh", output)
    assert details is not None
    lines = details.splitlines()
    assert lines[:2] == ["Shell: /bin/zsh", f"Startup {subject}: conda activate x"]
    assert len(lines) == 3
    assert verdict in lines[2]
    assert f"startup {subject}" in lines[2]


def test_failure_details_without_a_shell() -> None:
    details = startup_failure_details(COMMAND, "true", None, "")
    assert details is not None
    assert details.splitlines()[0] == "Shell: none found"
    assert "No shell" in details


@pytest.mark.parametrize("mode", [NONE, SHELL])
def test_no_failure_details_without_a_startup_step(mode: StartupEnvironment) -> None:
    assert startup_failure_details(mode, "ignored", "/bin/bash", BEGIN_MARKER) is None
