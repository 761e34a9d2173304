"""Wrapping a kernel's command line in the user's shell, so profiles and setup code apply.

The wrapped command always ends by `exec`-ing the kernel (unlike Kallichore, which leaves the
shell in between): the kernel replaces the shell, so the pid the session holds, the signals it
sends and the working directory it tracks all belong to the kernel itself.

For `command` and `script` the setup step is bracketed by two marker lines on stdout. Which
of them appeared tells whether a failed start was the shell's, the setup step's or the
kernel's fault (`startup_failure_details`); the session layer hides them from users with
`is_marker_line`.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping, Sequence

from kallichore.errors import ErrorCode, StartupError
from kallichore.session.model import StartupEnvironment

logger = logging.getLogger(__name__)

BEGIN_MARKER = "KALLICHORE_STARTUP_BEGIN"
SUCCESS_MARKER = "KALLICHORE_STARTUP_SUCCESS"

# Tried in order when the server's $SHELL is unusable.
_FALLBACK_SHELLS = ("/bin/bash", "/bin/sh")

_CSH_FAMILY = frozenset({"csh", "tcsh"})
_LONG_LOGIN_FLAG = frozenset({"bash", "zsh"})


def choose_shell(server_env: Mapping[str, str]) -> str | None:
    """The shell to wrap kernels in: the server's own $SHELL (never a session's), else a default.

    A $SHELL that names no executable file is reported, since the user presumably expected
    their shell to be used, and then the fallbacks are tried; None if none of them exists.
    """
    configured = server_env.get("SHELL")
    if configured:
        if _is_executable(configured):
            return configured
        logger.warning("SHELL=%s is not an executable file; falling back to a default", configured)
    return next((shell for shell in _FALLBACK_SHELLS if _is_executable(shell)), None)


def build_command(
    argv: Sequence[str],
    mode: StartupEnvironment,
    arg: str | None,
    *,
    working_directory: str | None,
    shell: str | None,
) -> list[str]:
    """The command line to spawn for `argv` under startup environment `mode`.

    `arg` is the startup command (`command`) or script path (`script`); it is ignored by the
    other modes. `working_directory` is the directory the kernel will run in (None: the
    server's); a relative script path is resolved against it. With no shell the kernel is run
    directly, as Kallichore does when it finds none.

    sh-family shells run the setup step in a brace group, on lines of its own so that a
    trailing comment or `&` in it cannot swallow the rest of the wrapper. csh and tcsh have no
    command grouping, and a subshell would lose the variables the step sets, so there the
    command goes through `eval` (which runs in the shell itself and yields the status of its
    last command); tcsh also ignores `exit` in the middle of a multi-line `-c` string, which
    is why everything stays on one `&&`-chained line for them.

    Raises StartupError (KS-5) if `command`/`script` has no argument or the script is not a
    regular file, before anything has been spawned.
    """
    if mode is StartupEnvironment.NONE:
        return list(argv)
    if shell is None:
        logger.warning("no shell found; starting the kernel directly, without startup %s", mode)
        return list(argv)
    csh = _shell_name(shell) in _CSH_FAMILY
    kernel = "exec " + _join(argv, csh=csh)
    if mode is StartupEnvironment.SHELL:
        return [shell, _login_flag(shell), "-c", kernel]

    if arg is None or not arg.strip():
        raise StartupError(
            ErrorCode.PROCESS_START_FAILED,
            f"startup environment {mode.value!r} needs a {_SUBJECT[mode]} "
            "in startup_environment_arg",
        )
    if mode is StartupEnvironment.SCRIPT:
        path = _resolve_script(arg, working_directory)
        step = ("source " if csh else ". ") + _quote(path, csh=csh)
    elif csh:
        step = "eval " + _quote(arg, csh=True)
    else:
        step = arg
    if csh:
        chain = [f"echo {BEGIN_MARKER}", step, f"echo {SUCCESS_MARKER}", kernel]
    else:
        chain = [f"echo {BEGIN_MARKER}", f"{{\n{step}\n}}", f"echo {SUCCESS_MARKER}", kernel]
    return [shell, "-i", "-c", " && ".join(chain)]


def is_marker_line(line: str) -> bool:
    """Whether `line` is one of the wrapper's marker lines rather than output of the user's."""
    return line.rstrip("\r\n") in (BEGIN_MARKER, SUCCESS_MARKER)


def startup_failure_details(
    mode: StartupEnvironment, arg: str | None, shell: str | None, output: str
) -> str | None:
    """Explain a failed start in `command`/`script` mode, locating the fault via the markers.

    `output` is everything the process printed, marker lines included. The startup command
    or script is named because a user reading the error may not know one was configured.
    """
    if mode is StartupEnvironment.NONE or mode is StartupEnvironment.SHELL:
        return None
    subject = _SUBJECT[mode]
    header = f"Shell: {shell or 'none found'}\nStartup {subject}: {arg}\n"
    if shell is None:
        return header + f"No shell was found to run the startup {subject} in."
    markers = {line for line in output.splitlines() if is_marker_line(line)}
    if SUCCESS_MARKER in markers:
        verdict = f"The startup {subject} succeeded, but the kernel then failed to start."
    elif BEGIN_MARKER in markers:
        verdict = f"The startup {subject} failed or did not finish, so the kernel was not started."
    else:
        verdict = (
            f"The startup {subject} could not be run: the shell did not get as far as running "
            "it, so the kernel was not started."
        )
    return header + verdict


_SUBJECT = {StartupEnvironment.COMMAND: "command", StartupEnvironment.SCRIPT: "script"}


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _shell_name(shell: str) -> str:
    return os.path.basename(shell)


def _login_flag(shell: str) -> str:
    """The flag that makes `shell` a login shell; csh can't be one with `-c`, `-d` comes closest."""
    name = _shell_name(shell)
    if name in _LONG_LOGIN_FLAG:
        return "--login"
    if name in _CSH_FAMILY:
        return "-d"
    return "-l"


def _resolve_script(arg: str, working_directory: str | None) -> str:
    """An absolute path, so that `.` never searches $PATH for it."""
    path = os.path.join(working_directory or os.getcwd(), arg)
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    if not os.path.isfile(path):
        raise StartupError(
            ErrorCode.PROCESS_START_FAILED,
            f"startup script {path} does not exist or is not a regular file",
        )
    return path


def _quote(word: str, *, csh: bool) -> str:
    """Quote `word` as one literal word.

    csh expands `!` (history) even inside single quotes and rejects a raw newline there, so
    for csh both are backslash-escaped as well.
    """
    quoted = shlex.quote(word)
    if csh:
        quoted = quoted.replace("!", "\\!").replace("\n", "\\\n")
    return quoted


def _join(argv: Sequence[str], *, csh: bool) -> str:
    return " ".join(_quote(word, csh=csh) for word in argv)
