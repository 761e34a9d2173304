"""Drive pyzmq sockets from trio without threads, background tasks or polling.

The ZeroMQ file descriptor (``socket.FD``) does not mean "readable": it is
signalled when the socket's internal command mailbox receives something, i.e.
when ``EVENTS`` *may* have changed, and every zmq call on the socket (including
``getsockopt(EVENTS)`` and a failed non-blocking send/recv) drains it.  So the
only safe loop is: try the operation with ``NOBLOCK``; on ``EAGAIN`` re-read
``EVENTS``; only if the wanted flag is still clear, wait on the FD.

Because any task's zmq call can swallow the FD signal another task is waiting
for, waiters are "kicked" (told to re-read ``EVENTS``) whenever the socket's
state may have moved under them.  trio allows one ``wait_readable`` per fd, so a
single task owns the FD wait and the others park in a ``ParkingLot``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NoReturn, TypeVar, cast

import trio
import zmq

__all__ = ["TrioSocket"]

_T = TypeVar("_T")
# Plain ints: the hot path tests these flags on every operation, and zmq's enum Flags cost a
# Python-level __and__ each time.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)
# pyzmq's compiled send and receive, called with the ints above: zmq.Socket's send_multipart
# checks every frame's type and combines enum flags in Python, and its recv_multipart asks
# RCVMORE after every frame (each getsockopt looks its option up in an enum). A frame received
# without copying says itself whether more follow: a small message's receive costs about a
# third less (a Jupyter message is seven frames or more).
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv


def _raise_as_trio(exc: zmq.ZMQError) -> NoReturn:
    """Report a closed socket or terminated context the way trio streams do."""
    if isinstance(exc, zmq.ContextTerminated):
        raise trio.ClosedResourceError("the zmq context was terminated") from exc
    if exc.errno == zmq.ENOTSOCK:
        raise trio.ClosedResourceError("the zmq socket is closed") from exc
    raise exc


class TrioSocket:
    """Wraps one zmq.Socket (non-blocking ops) for use from any number of trio tasks.

    Every operation is cancellation-safe: a cancelled receive has not taken a
    message off the socket, and a cancelled send has not queued its message.
    """

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._socket = socket
        self._fd: int = socket.FD
        self._closed = False
        # Cancelling this scope kicks the one task blocked in wait_readable(fd).
        self._fd_owner: trio.CancelScope | None = None
        # All other waiting tasks park here until kicked.
        self._lot = trio.lowlevel.ParkingLot()
        # How many tasks are inside an operation waiting for each EVENTS flag;
        # used to kick only when someone can act on a flag we saw.
        self._interest = {_POLLIN: 0, _POLLOUT: 0}

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The wrapped socket, for setsockopt/bind/connect (not for send/recv)."""
        return self._socket

    async def send_multipart(self, frames: Sequence[bytes]) -> None:
        """Send one message; a cancelled send did not send any of it.

        zmq accepts or refuses a whole multipart message at once under NOBLOCK
        (the high-water mark is only checked on the first frame).
        """
        await self._run(lambda: self._send_multipart(frames), _POLLOUT)

    async def recv_multipart(self) -> list[bytes]:
        """Receive one message; a cancelled receive did not consume any message."""
        return await self._run(self._recv_multipart, _POLLIN)

    async def recv_batch(self, max_messages: int = 1000) -> list[list[bytes]]:
        """Wait for at least one message, then take up to ``max_messages`` that are ready.

        Amortises the trio schedule point over a burst of messages.  Cancellation
        is as safe as for recv_multipart: the drain never yields.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        return await self._run(lambda: self._drain(max_messages), _POLLIN)

    def close(self) -> None:
        """Close the socket, waking blocked tasks with trio.ClosedResourceError.

        Idempotent.  Also safe to call outside trio.run (nobody can be waiting then).
        """
        if self._closed:
            return
        self._closed = True
        # If the zmq socket was closed behind our back its fd number may be
        # reused already, so it must not be handed to trio any more.
        if not self._socket.closed:
            # This raises ClosedResourceError in the task owning the FD wait,
            # which on its way out releases the parked tasks to see _closed.
            # Outside a trio run nobody can be waiting on the fd.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._fd)
            self._socket.close(linger=0)

    def __enter__(self) -> TrioSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send_multipart(self, frames: Sequence[bytes]) -> None:
        socket = self._socket
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            _send(socket, frame, _NOBLOCK_SNDMORE if i < last else _NOBLOCK)

    def _recv_multipart(self) -> list[bytes]:
        """One whole message (raises Again if none is ready: the first frame decides)."""
        socket = self._socket
        frame = _recv(socket, _NOBLOCK, False)
        frames = [frame.bytes]
        while frame.more:
            # The rest of a message that has begun is there: ZeroMQ delivers it whole.
            frame = _recv(socket, _NOBLOCK, False)
            frames.append(frame.bytes)
        return frames

    def _drain(self, max_messages: int) -> list[list[bytes]]:
        """Take the first message (may raise Again), then whatever else is ready."""
        batch = [self._recv_multipart()]
        try:
            # Asking EVENTS is cheaper than the Again a failed receive raises.
            while len(batch) < max_messages and self._events() & _POLLIN:
                batch.append(self._recv_multipart())
        except zmq.ZMQError:
            # Any real error resurfaces on the next call; messages already taken
            # must not be lost to it.
            pass
        return batch

    async def _run(self, op: Callable[[], _T], flag: int) -> _T:
        """Run a NOBLOCK ``op`` until it succeeds, waiting for ``flag`` in EVENTS."""
        self._interest[flag] += 1
        waited = False
        try:
            while True:
                # Never start the op while cancelled: after it succeeds we may
                # not raise Cancelled, or the message would be lost.
                await trio.lowlevel.checkpoint_if_cancelled()
                if self._closed:
                    raise trio.ClosedResourceError("the TrioSocket is closed")
                try:
                    result = op()
                    break
                except zmq.Again:
                    pass
                except zmq.ZMQError as exc:
                    _raise_as_trio(exc)
                try:
                    events = self._events()
                except zmq.ZMQError as exc:
                    _raise_as_trio(exc)
                if events & flag:
                    continue
                # Reading EVENTS may have drained the FD signal that a waiter
                # for the other direction was relying on.
                self._kick_if_ready(events)
                await self._wait()
                waited = True
        finally:
            self._interest[flag] -= 1
        self._wake_after_op()
        if not waited:
            # Every trio operation yields at least once; one that waited already did.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _events(self) -> int:
        """Read EVENTS, which also drains the FD signal: callers must wake whoever it was for."""
        return cast(int, self._socket.getsockopt(zmq.EVENTS))

    def _wake_after_op(self) -> None:
        """Wake waiters that may proceed; our op may have drained the FD signal meant for them."""
        if not (self._interest[_POLLIN] or self._interest[_POLLOUT]):
            return
        try:
            events = self._events()
        except zmq.ZMQError:
            # Closed or terminated: the waiters will meet the error themselves.
            self._kick()
        else:
            self._kick_if_ready(events)

    def _kick_if_ready(self, events: int) -> None:
        """Wake the waiters if ``events`` holds a flag one of them is waiting for.

        Kicking unconditionally would livelock: POLLOUT is nearly always set, so
        two receivers would keep waking each other.
        """
        if (events & _POLLIN and self._interest[_POLLIN]) or (
            events & _POLLOUT and self._interest[_POLLOUT]
        ):
            self._kick()

    async def _wait(self) -> None:
        """Block until the FD is signalled or another task kicks us; the caller re-checks."""
        if self._fd_owner is not None:
            await self._lot.park()
            return
        scope = trio.CancelScope()
        self._fd_owner = scope
        try:
            with scope:
                await trio.lowlevel.wait_readable(self._fd)
        finally:
            self._fd_owner = None
            # Whatever woke us (signal, kick, cancellation, close), the parked
            # tasks must re-check EVENTS, and one of them must take over the FD.
            self._lot.unpark_all()

    def _kick(self) -> None:
        """Make every waiting task re-check EVENTS."""
        if self._fd_owner is not None:
            self._fd_owner.cancel()
        self._lot.unpark_all()
