"""The remote shim: stands in for our child process beside a kernel on another machine.

The ssh and slurm launchers start a local child (``ssh HOST python3 -c SOURCE``, ``srun ...
python3 -c SOURCE``) whose far end is this script. The remote host may not have kallichore, so
it uses only the standard library and pyzmq and travels as source text. It reads one JSON
launch order from stdin (the secrets come there, never on a command line, which ``ps`` shows to
every user of the host); picks five free ports on the address the daemon reaches this host at;
writes a 0600 connection file (with the kernel's CurveZMQ key pair when given); starts the
kernel; and tells the daemon where it listens with one signed JEP 66 ``handshake_request``
(connect-back: no port is guessed on a machine the daemon cannot see).

Then it relays the kernel's output (stderr lines to stderr), reports its own events as lines
``EVENT_PREFIX + JSON`` on stdout, and obeys ``signal N`` and ``kill`` lines on stdin. When
stdin ends (the connection dropped) it may keep the kernel for ``reconnect_seconds``, buffering
its output, until ``python3 -c SOURCE attach PATH`` connects to the attach socket and takes over
(the new controller's first line is an ``attached`` event).

One single-threaded poll loop over pipes, sockets and a signal wake-up pipe: no thread to race
with the kernel's exit, and every wait has a deadline. Written for Python 3.8 and later, which
is what a cluster node may have.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from typing import Any

try:
    import zmq
except ImportError:
    sys.exit(
        f"kallichore-shim: {sys.executable} has no pyzmq, which the shim needs: set `python` "
        "in the launcher block to a Python there that has it (a Python kernel's own has)"
    )

EVENT_PREFIX = "\x1ekallichore-shim "
EVENT_PREFIX_BYTES = EVENT_PREFIX.encode()
# What a kernel's line that looks like one of our events starts with instead (no event spoofed).
ESCAPED_PREFIX = b"\\x1e" + EVENT_PREFIX_BYTES[1:]
STDOUT, STDERR = 1, 2
# Output kept for a controller that reads slowly or is gone: past this the oldest output lines
# are dropped, so the kernel never blocks on a full pipe because nobody reads us.
OUTBOX_BYTES = 1 << 20
# A longer line is passed on in pieces, each ending a line, so an event never lands inside one.
MAX_LINE_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
# How long the daemon may take to answer the handshake unless the order says otherwise.
HANDSHAKE_SECONDS = 60.0
# The shim's exit status when it fails itself (bad order, no handshake) rather than the kernel.
FAILED = 1
DELIMITER = b"<IDS|MSG>"
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class Lines:
    """Cuts a byte stream into lines that each end with a newline."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        *lines, self._partial = (self._partial + data).split(b"\n")
        complete = [line + b"\n" for line in lines]
        while len(self._partial) >= MAX_LINE_BYTES:
            complete.append(self._partial[:MAX_LINE_BYTES] + b"\n")
            self._partial = self._partial[MAX_LINE_BYTES:]
        return complete

    def end(self) -> list[bytes]:
        """The unfinished last line, given its newline."""
        rest, self._partial = self._partial, b""
        return [rest + b"\n"] if rest else []


class Outbox:
    """Lines on their way to the controller, oldest first, each with its stream (1 or 2).

    At most `limit` bytes of kernel output are kept: the oldest output line goes (never an event,
    never a line partly written) and a note on stderr says how much went, where the gap is.
    For an attach connection, which carries both streams, each line is framed with its stream's
    digit in front.
    """

    def __init__(self, limit: int = OUTBOX_BYTES) -> None:
        self._limit = limit
        self._lines: deque[tuple[int, bytes, bool]] = deque()  # stream, line, droppable
        self._droppable_bytes = 0
        self._dropped = 0
        # How much of the first line, as framed for the current controller, it has taken.
        self._written = 0
        self._tagged = False

    def __bool__(self) -> bool:
        return bool(self._lines) or self._dropped > 0

    def put(self, stream: int, line: bytes, *, droppable: bool = True) -> None:
        self._lines.append((stream, line, droppable))
        if droppable:
            self._droppable_bytes += len(line)
        while self._droppable_bytes > self._limit and self._drop_oldest():
            pass

    def _drop_oldest(self) -> bool:
        """Drop the oldest line that may go; False if none may."""
        for index, (_, line, droppable) in enumerate(self._lines):
            if droppable and not (index == 0 and self._written):
                del self._lines[index]
                self._droppable_bytes -= len(line)
                self._dropped += len(line)
                return True
        return False

    def restart(self, greeting: bytes, *, tagged: bool) -> None:
        """A new controller: it gets `greeting`, then the first line from its start, framed as
        it needs."""
        self._written = 0
        self._tagged = tagged
        self._lines.appendleft((STDOUT, greeting, False))

    def first(self) -> tuple[int, bytes]:
        """The stream and the framed bytes to write next (the rest, if partly written)."""
        if self._dropped and not self._written:
            note = f"kallichore-shim: {self._dropped} bytes of kernel output dropped\n"
            self._lines.appendleft((STDERR, note.encode(), False))
            self._dropped = 0
        stream, line, _ = self._lines[0]
        return stream, self._frame(stream, line)[self._written :]

    def advance(self, count: int) -> None:
        """`count` more bytes of the first line have been written."""
        self._written += count
        stream, line, droppable = self._lines[0]
        if self._written == len(self._frame(stream, line)):
            self._lines.popleft()
            self._written = 0
            if droppable:
                self._droppable_bytes -= len(line)

    def _frame(self, stream: int, line: bytes) -> bytes:
        return str(stream).encode() + line if self._tagged else line


class Controller:
    """Whoever the shim answers to: its own stdin, stdout and stderr (the launcher's child), or
    an attach connection, a socket that carries both output streams as lines tagged 1 or 2."""

    def __init__(self, connection: socket.socket | None = None) -> None:
        self.connection = connection
        self.commands = Lines()
        if connection is None:
            self.read_fd, self.fds = 0, {STDOUT: 1, STDERR: 2}
            for fd in (1, 2):
                os.set_blocking(fd, False)
        else:
            connection.setblocking(False)
            fd = connection.fileno()
            self.read_fd, self.fds = fd, {STDOUT: fd, STDERR: fd}

    def close(self) -> None:
        """Let go: an attach connection is closed; our own standard streams, which belong to
        the launcher's child, become /dev/null so that a late write cannot fail."""
        if self.connection is not None:
            self.connection.close()
            return
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)


class Order:
    """The launch order from stdin, checked field by field so that a mistake is named.

    Besides the fields the launchers send, `handshake_seconds` (default 60) bounds the wait for
    the daemon's handshake reply.
    """

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ValueError("the launch order is not a JSON object")
        self._raw = raw
        self.argv: list[str] = self._get("argv", list)
        self.env: dict[str, str] = self._get("env", dict, {})
        self.cwd: str | None = self._get("cwd", str, None)
        self.signature_scheme: str = self._get("signature_scheme", str, "hmac-sha256")
        self.registration: str = self._get("registration", str)
        # The registration socket's CurveZMQ public key: what we tell it is encrypted.
        self.registration_publickey: str = self._get("registration_publickey", str)
        self.own_session: bool = self._get("own_session", bool, True)
        self.reconnect_seconds = float(self._get("reconnect_seconds", (int, float), 0.0))
        self.handshake_seconds = float(
            self._get("handshake_seconds", (int, float), HANDSHAKE_SECONDS)
        )
        if not self.argv or not all(isinstance(arg, str) for arg in self.argv):
            raise ValueError("'argv' must be a non-empty list of strings")
        if not all(isinstance(value, str) for value in self.env.values()):
            raise ValueError("'env' must map names to strings")
        if self.signature_scheme != "hmac-sha256":
            raise ValueError(f"unsupported signature scheme {self.signature_scheme!r}")

    _REQUIRED = object()

    def _get(self, name: str, kind: Any, default: Any = _REQUIRED) -> Any:
        value = self._raw.get(name, default)
        if value is self._REQUIRED:
            raise ValueError(f"the launch order has no {name!r}")
        if value is not default and not isinstance(value, kind):
            raise ValueError(f"{name!r} in the launch order has the wrong type")
        return value


def sign(key: str, parts: list[bytes]) -> bytes:
    """The Jupyter wire protocol's signature: hex HMAC-SHA256 over the four JSON frames."""
    if not key:
        return b""
    mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.hexdigest().encode()


def handshake_request(key: str, content: dict[str, Any]) -> list[bytes]:
    """The frames of a signed JEP 66 `handshake_request`."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "handshake_request",
        "session": uuid.uuid4().hex,
        "username": "kallichore-shim",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "version": "5.5",
    }
    parts = [json.dumps(part).encode() for part in (header, {}, {}, content)]
    return [DELIMITER, sign(key, parts), *parts]


def request_digest(frames: list[bytes]) -> str:
    """What the daemon recognises our registration request by (SHA-256 over its frames)."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "big"))
        digest.update(frame)
    return digest.hexdigest()


def refusal(key: str, frames: list[bytes]) -> str | None:
    """Why `frames` are not the daemon's signed, positive `handshake_reply`; None if they are."""
    if DELIMITER not in frames:
        try:
            said = json.loads(frames[0]).get("error")
        except (ValueError, AttributeError, IndexError):
            said = None
        return f"the daemon refused the handshake: {said}"
    start = frames.index(DELIMITER) + 1
    if len(frames) < start + 5:
        return "the handshake reply is malformed"
    signature, parts = frames[start], frames[start + 1 : start + 5]
    if key and not hmac.compare_digest(signature, sign(key, parts)):
        return "the handshake reply is not signed with the kernel's key"
    try:
        msg_type = json.loads(parts[0]).get("msg_type")
        status = json.loads(parts[3]).get("status")
    except (ValueError, AttributeError):
        return "the handshake reply is not JSON objects"
    if msg_type != "handshake_reply" or status != "ok":
        return f"the daemon answered {msg_type} with status {status}"
    return None


def reachable_address(registration: str) -> str:
    """The address of this host that the daemon can reach: the source address a UDP socket
    connected to the registration host would use (connect sends no packet)."""
    host, _, port = registration.rpartition("://")[2].rpartition(":")
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_DGRAM
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])


def free_ports(ip: str, names: tuple[str, ...]) -> dict[str, int]:
    """A TCP port free on `ip` now for each name, all different (all held until all are picked)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    probes = {name: socket.socket(family, socket.SOCK_STREAM) for name in names}
    try:
        for probe in probes.values():
            probe.bind((ip, 0))
        return {name: int(probe.getsockname()[1]) for name, probe in probes.items()}
    finally:
        for probe in probes.values():
            probe.close()


def exit_status(returncode: int) -> int:
    """A shell's exit status for a process that ended with `returncode` (Popen's sign rule)."""
    return 128 - returncode if returncode < 0 else returncode


def event_line(**fields: Any) -> bytes:
    return EVENT_PREFIX_BYTES + json.dumps(fields).encode() + b"\n"


class Shim:
    """The kernel, its relay and its controller, driven by `run`'s poll loop."""

    def __init__(self, order: Order, controller: Controller, commands: list[bytes]) -> None:
        self.order = order
        self.outbox = Outbox()
        self.controller: Controller | None = controller
        self.pending_commands = commands
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.registration: zmq.Socket[bytes] | None = None
        self.handshake_deadline = 0.0
        self.failure: str | None = None
        self.kernel: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.pipes: dict[int, tuple[int, Lines]] = {}  # fd: stream, lines
        self.kernel_dir = tempfile.mkdtemp(prefix="kallichore-kernel-")
        # The kernel's HMAC key, made here (see `start`).
        self.key = secrets.token_hex(16)
        self.attach_dir: str | None = None
        self.listener: socket.socket | None = None
        self.detached_deadline: float | None = None
        self.terminating = False
        self.wake_fd = self._catch_signals()

    def _catch_signals(self) -> int:
        """Route signals through a wake-up pipe to the loop. A Python handler that does nothing,
        not SIG_IGN, for SIGINT and SIGHUP: an ignored disposition would pass to the kernel
        across exec; a handled one is reset to the default there."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, _ignore)
        return read_fd

    def start(self) -> None:
        """Prepare the connection file and the attach socket, start the kernel, send the
        handshake. Raises OSError or ValueError if the kernel cannot be started."""
        order = self.order
        ip = reachable_address(order.registration)
        ports = free_ports(ip, PORT_NAMES)
        # The kernel's secrets are made here and go to the daemon only over the encrypted
        # registration: the launch order crossed the network as the launcher carried it
        # (srun forwards stdin unencrypted).
        curve_publickey, curve_secretkey = (k.decode("ascii") for k in zmq.curve_keypair())
        kernel_secrets = {
            "key": self.key,
            "curve_publickey": curve_publickey,
            "curve_secretkey": curve_secretkey,
        }
        info: dict[str, Any] = {
            **ports,
            "ip": ip,
            "transport": "tcp",
            "signature_scheme": order.signature_scheme,
            **kernel_secrets,
        }
        path = os.path.join(self.kernel_dir, "kernel.json")
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            json.dump(info, file)
        attach_path = self._listen() if order.reconnect_seconds > 0 else None
        # ipykernel exits when its parent, the shim, is gone, even by SIGKILL: nothing orphaned.
        env = {**os.environ, **order.env, "JPY_PARENT_PID": str(os.getpid())}
        self.kernel = subprocess.Popen(
            [arg.replace("{connection_file}", path) for arg in order.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=order.cwd,
            env=env,
            start_new_session=order.own_session,
        )
        for stream, pipe in ((STDOUT, self.kernel.stdout), (STDERR, self.kernel.stderr)):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            self.pipes[pipe.fileno()] = (stream, Lines())
        pid = self.kernel.pid
        self.outbox.put(
            STDOUT, event_line(event="started", pid=pid, attach=attach_path), droppable=False
        )
        content = {
            **ports,
            "ip": ip,
            **kernel_secrets,
            "kallichore": {
                "pid": pid,
                "host": socket.gethostname(),
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "attach": attach_path,
            },
        }
        request = handshake_request(self.key, content)
        # Vouches for the request on the channel the daemon knows is ours: anybody can reach
        # the registration socket, nobody else can put a line in our output.
        self.outbox.put(
            STDOUT, event_line(event="registering", digest=request_digest(request)), droppable=False
        )
        self.registration = self.context.socket(zmq.REQ)
        self.registration.setsockopt(zmq.LINGER, 0)
        client_publickey, client_secretkey = zmq.curve_keypair()
        self.registration.curve_serverkey = order.registration_publickey.encode("ascii")
        self.registration.curve_publickey = client_publickey
        self.registration.curve_secretkey = client_secretkey
        self.registration.connect(order.registration)
        self.registration.send_multipart(request, zmq.NOBLOCK)
        self.handshake_deadline = time.monotonic() + order.handshake_seconds

    def _listen(self) -> str:
        self.attach_dir = tempfile.mkdtemp(prefix="kallichore-attach-")
        path = os.path.join(self.attach_dir, "attach")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.setblocking(False)
        return path

    def run(self) -> int:
        """Relay and obey until the kernel has exited and been reported; the exit status."""
        self.obey(self.pending_commands)
        while not self.finished():
            poller = zmq.Poller()
            for fd, flags in self._interest().items():
                poller.register(fd, flags)
            if self.registration is not None:
                poller.register(self.registration, zmq.POLLIN)
            deadline = self._deadline()
            timeout = (
                None
                if deadline is None
                else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            )
            for which, events in poller.poll(timeout):
                self._ready(which, events)
            self._check_kernel()
            self._check_deadlines()
        return FAILED if self.failure else exit_status(self.returncode or 0)

    def _interest(self) -> dict[int, int]:
        """The file descriptors to poll, with what to wait for on each."""
        interest: dict[int, int] = dict.fromkeys([self.wake_fd, *self.pipes], zmq.POLLIN)
        if self.listener is not None:
            interest[self.listener.fileno()] = zmq.POLLIN
        if self.controller is not None:
            interest[self.controller.read_fd] = zmq.POLLIN
            if self.outbox:
                fd = self.controller.fds[self.outbox.first()[0]]
                interest[fd] = interest.get(fd, 0) | zmq.POLLOUT
        return interest

    def _deadline(self) -> float | None:
        deadlines = [self.detached_deadline] if self.detached_deadline is not None else []
        if self.registration is not None:
            deadlines.append(self.handshake_deadline)
        return min(deadlines, default=None)

    def _ready(self, which: Any, events: int) -> None:
        """Handle what the poll reported on one socket or descriptor; an error or a hang-up
        shows as POLLERR, and reading or writing then says what it is."""
        if which is self.registration:
            self._answered(self.registration.recv_multipart(zmq.NOBLOCK))
        elif which == self.wake_fd:
            if signal.SIGTERM in _drain(self.wake_fd):
                self.terminating = True
                self.signal_kernel(signal.SIGKILL)
        elif which in self.pipes:
            self._relay(which)
        elif self.listener is not None and which == self.listener.fileno():
            self._accept()
        elif self.controller is not None:
            controller = self.controller
            if which == controller.read_fd and events & (zmq.POLLIN | zmq.POLLERR):
                self._command_input(controller)
            writes_to = which in controller.fds.values()
            if controller is self.controller and writes_to and events & (zmq.POLLOUT | zmq.POLLERR):
                self._write(controller)

    def _answered(self, frames: list[bytes]) -> None:
        assert self.registration is not None
        self.registration.close()
        self.registration = None
        why = refusal(self.key, frames)
        if why is not None:
            self.fail(why)

    def fail(self, why: str) -> None:
        self.failure = why
        self.note(f"kallichore-shim: {why}")
        self.signal_kernel(signal.SIGKILL)

    def _relay(self, fd: int) -> int:
        """Pass on what the kernel wrote to pipe `fd`; how many bytes (0: none now, or its end)."""
        stream, lines = self.pipes[fd]
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return 0
        for line in lines.feed(data) if data else lines.end():
            self._put_output(stream, line)
        if not data:
            del self.pipes[fd]
        return len(data)

    def _put_output(self, stream: int, line: bytes) -> None:
        if line.startswith(EVENT_PREFIX_BYTES):
            line = ESCAPED_PREFIX + line[len(EVENT_PREFIX_BYTES) :]
        self.outbox.put(stream, line)

    def _accept(self) -> None:
        """A new attach takes over from the current controller, whichever it is: the daemon
        may see a connection die before this end does."""
        assert self.listener is not None
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.controller is not None:
            self.controller.close()
        self.controller = Controller(connection)
        self.outbox.restart(event_line(event="attached"), tagged=True)
        self.detached_deadline = None

    def _command_input(self, controller: Controller) -> None:
        try:
            data = os.read(controller.read_fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.obey(controller.commands.feed(data))
        else:
            self._lose_controller()

    def _write(self, controller: Controller) -> None:
        stream, rest = self.outbox.first()
        try:
            self.outbox.advance(os.write(controller.fds[stream], rest))
        except BlockingIOError:
            pass
        except OSError:
            self._lose_controller()

    def _lose_controller(self) -> None:
        """The controller is gone: wait for an attach if there can be one, else kill."""
        assert self.controller is not None
        self.controller.close()
        self.controller = None
        if self.listener is None:
            self.signal_kernel(signal.SIGKILL)
        else:
            self.detached_deadline = time.monotonic() + self.order.reconnect_seconds

    def obey(self, commands: list[bytes]) -> None:
        for command in commands:
            words = command.decode(errors="replace").split()
            if words == ["kill"]:
                self.signal_kernel(signal.SIGKILL)
            elif len(words) == 2 and words[0] == "signal" and words[1].isdigit():
                self.signal_kernel(int(words[1]))
            elif words:
                self.note(f"kallichore-shim: unknown command {' '.join(words)!r}")

    def note(self, text: str) -> None:
        self.outbox.put(STDERR, text.encode() + b"\n", droppable=False)

    def signal_kernel(self, signum: int) -> None:
        """Signal the kernel's process group (own session) or the kernel, while it has not been
        reaped: until then its pid cannot belong to another process."""
        if self.kernel is None or self.returncode is not None:
            return
        try:
            if self.order.own_session:
                os.killpg(self.kernel.pid, signum)
            else:
                os.kill(self.kernel.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
        except (ValueError, OSError) as error:
            self.note(f"kallichore-shim: cannot send signal {signum}: {error}")

    def _check_kernel(self) -> None:
        """If the kernel has exited: take the rest of its output, end what it left behind in
        its process group, remove the connection file, report."""
        if self.kernel is None or self.returncode is not None:
            return
        returncode = self.kernel.poll()
        if returncode is None:
            return
        self.returncode = returncode
        for fd in list(self.pipes):
            # What is left in the pipe, but not forever: the kernel's children may hold it open.
            taken = 0
            while fd in self.pipes and taken <= OUTBOX_BYTES:
                count = self._relay(fd)
                if not count:
                    break
                taken += count
        for stream, lines in self.pipes.values():
            for line in lines.end():
                self._put_output(stream, line)
        self.pipes.clear()
        for pipe in (self.kernel.stdout, self.kernel.stderr):
            assert pipe is not None
            pipe.close()
        if self.order.own_session:
            # The group outlives its reaped leader while a member lives, and its id cannot be
            # reused until then.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.kernel.pid, signal.SIGKILL)
        shutil.rmtree(self.kernel_dir, ignore_errors=True)
        if self.registration is not None:
            self.registration.close()
            self.registration = None
        self.outbox.put(STDOUT, event_line(event="exited", returncode=returncode), droppable=False)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self.registration is not None and now >= self.handshake_deadline:
            self.registration.close()
            self.registration = None
            self.fail(f"no handshake reply within {self.order.handshake_seconds} s")
        if self.detached_deadline is not None and now >= self.detached_deadline:
            self.detached_deadline = None
            self.terminating = True
            self.signal_kernel(signal.SIGKILL)

    def finished(self) -> bool:
        """The kernel is reported, or nobody is left to report it to."""
        if self.returncode is None:
            return False
        if self.controller is not None:
            return not self.outbox
        return self.listener is None or self.terminating

    def close(self) -> None:
        if self.registration is not None:
            self.registration.close()
        self.context.term()
        if self.listener is not None:
            self.listener.close()
        for directory in (self.kernel_dir, self.attach_dir):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)


def _ignore(signum: int, frame: Any) -> None:
    """A handler that does nothing: the wake-up pipe tells the loop."""


def _drain(fd: int) -> set[int]:
    """The signal numbers waiting in the wake-up pipe."""
    numbers: set[int] = set()
    while True:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return numbers
        if not data:
            return numbers
        numbers.update(data)


def read_order(commands: Lines) -> tuple[Order, list[bytes]]:
    """The launch order (the first line of stdin) and any command lines that came with it;
    a command cut short stays in `commands`."""
    lines: list[bytes] = []
    while not lines:
        data = os.read(0, READ_BYTES)
        if not data:
            raise ValueError("stdin ended before the launch order")
        lines = commands.feed(data)
    return Order(json.loads(lines[0])), lines[1:]


def launch() -> int:
    controller = Controller()
    try:
        order, commands = read_order(controller.commands)
    except ValueError as error:
        print(f"kallichore-shim: invalid launch order: {error}", file=sys.stderr)
        return FAILED
    shim = Shim(order, controller, commands)
    try:
        try:
            shim.start()
        except (OSError, ValueError, zmq.ZMQError) as error:
            if shim.kernel is None:
                print(f"kallichore-shim: cannot start the kernel: {error}", file=sys.stderr)
                return FAILED
            shim.fail(f"cannot register the kernel: {error}")
        return shim.run()
    finally:
        shim.close()


def attach(path: str) -> int:
    """Relay our stdin to the attach socket at `path` and its tagged lines to our stdout and
    stderr; exit as the shim would, with the kernel's status once it has been reported."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError as error:
        print(f"kallichore-shim: cannot attach to {path}: {error}", file=sys.stderr)
        return FAILED
    status = FAILED
    lines = Lines()
    poller = zmq.Poller()
    poller.register(0, zmq.POLLIN)
    poller.register(connection.fileno(), zmq.POLLIN)
    # The relay ends when either side does, whether by an end of file or a failed write.
    with connection, contextlib.suppress(OSError):
        while True:
            ready = dict(poller.poll())
            if connection.fileno() in ready:
                data = connection.recv(READ_BYTES)
                if not data:
                    break
                for line in lines.feed(data):
                    stream, text = int(line[:1]), line[1:]
                    _write_all(stream, text)
                    if text.startswith(EVENT_PREFIX_BYTES):
                        event = json.loads(text[len(EVENT_PREFIX_BYTES) :])
                        if event.get("event") == "exited":
                            status = exit_status(event["returncode"])
            if 0 in ready:
                data = os.read(0, READ_BYTES)
                if not data:
                    break
                connection.sendall(data)
    return status


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "attach":
        return attach(argv[1])
    if argv:
        print("usage: remote_shim.py [attach PATH] (launch order on stdin)", file=sys.stderr)
        return FAILED
    return launch()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# The script's own text, for the launchers to send as `python3 -c SOURCE`.
with open(__file__, encoding="utf-8") as _file:
    SOURCE: str = _file.read()
