"""`kallichore attach`: a line console on a session that its other clients go on using.

On TCP the console is one more client of the kernel's Jupyter channels, which fan out: the
session's Kallichore channels client (a person's Positron) is never displaced, and what any
client runs shows here as it runs, under `In [n] (another client):`. A statement goes to the
kernel once the kernel says it is complete (`is_complete_request`; a blank line ends a block
anyway); the code's `input()` reads the next line typed. Where the Jupyter channels are not
served (the API on a Unix socket), statements run through `POST /execute` instead.

Ctrl-C interrupts the kernel (at the prompt, it drops the statement being typed); end of input
(Ctrl-D), `exit` or `quit` detaches, leaving the session running.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import attrs
import trio
import trio_websocket

from kallichore.client import Channels, KallichoreClient, execute_request, message
from kallichore.client.events import JSON
from kallichore.commands.errors import CommandError
from kallichore.commands.sessions import NOT_RUNNING, choose_session
from kallichore.commands.terminal import Terminal

# How long the console waits for the kernel to say whether a statement is complete (a kernel
# busy with another client's code answers late): after that, the line is sent as it is.
IS_COMPLETE_SECONDS = 2.0
# Typed alone, these detach: sent to an IPython kernel, they would shut it down for everyone.
DETACH = ("exit", "quit", "exit()", "quit()")
OUTPUTS = ("stream", "display_data", "update_display_data", "execute_result", "error")

Lines = trio.MemoryReceiveChannel[str | None]
Answers = trio.MemoryReceiveChannel[tuple[str, JSON]]


async def attach(client: KallichoreClient, args: argparse.Namespace, terminal: Terminal) -> int:
    """Run the console on stdin until the input ends (0) or the daemon goes away (1)."""
    stdin = sys.stdin
    session = await choose_session(client, args.session, terminal)
    session_id = session["session_id"]
    if session["status"] in NOT_RUNNING:
        raise CommandError(f"session {session_id} is {session['status']}: no kernel runs there")
    send_line, lines = trio.open_memory_channel[str | None](math.inf)
    prompts = stdin.isatty()
    terminal.note(
        f"attached to {session_id} ({session['display_name']}): Ctrl-C interrupts the "
        "kernel, Ctrl-D detaches (the session goes on)"
    )
    if client.socket_path is not None:
        console: Console = ExecuteConsole(client, session_id, terminal, lines, prompts)
        return await console.run(stdin, send_line)
    async with client.jupyter_channels(session["kernel_id"]) as channels:
        console = ChannelsConsole(client, session_id, terminal, lines, prompts, channels=channels)
        return await console.run(stdin, send_line)


@attrs.define
class Console:
    """The user's side of a console: statements typed, prompts, Ctrl-C. How a statement runs,
    and what else the kernel shows, is the subclass's."""

    client: KallichoreClient
    session_id: str
    terminal: Terminal
    lines: Lines
    prompts: bool
    executing: bool = attrs.field(init=False, default=False)
    # Cancelled by Ctrl-C: reading a statement at the prompt, or an answer to `input()`.
    typing: trio.CancelScope | None = attrs.field(init=False, default=None)
    asking: trio.CancelScope | None = attrs.field(init=False, default=None)
    next_count: int | None = attrs.field(init=False, default=None)

    async def run(self, stdin: TextIO, send_line: trio.MemorySendChannel[str | None]) -> int:
        """Until the input ends or `exit` (0), or the daemon ends the connection (1)."""
        status = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_lines, stdin, send_line)
            nursery.start_soon(self._interrupt_on_ctrl_c)

            async def follow() -> None:
                nonlocal status
                await self.follow()
                self.terminal.note("the daemon closed the connection")
                status = 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(follow)
            await self._converse()
            nursery.cancel_scope.cancel()
        return status

    async def follow(self) -> None:
        """Show what the kernel sends besides answers; return when the connection ends."""
        await trio.sleep_forever()

    async def completeness(self, code: str) -> str:
        """`complete`, `incomplete` (a block goes on), `invalid` or `unknown`."""
        raise NotImplementedError

    async def execute(self, code: str) -> str:
        """Run `code`, its outputs shown as they come; `exit` if the kernel asks to detach."""
        raise NotImplementedError

    def counted(self, count: object) -> None:
        """An execution got this number: the next prompt's is one more."""
        if isinstance(count, int):
            self.next_count = count + 1

    async def _interrupt_on_ctrl_c(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                if self.executing:
                    if self.asking is not None:
                        self.asking.cancel()
                    await self.client.interrupt(self.session_id)
                elif self.typing is not None:
                    self.typing.cancel()

    async def _converse(self) -> None:
        """Statements, read and run one after the other, until the input ends or `exit`."""
        while True:
            code: str | None = ""
            with trio.CancelScope() as self.typing:
                code = await self._statement()
            if (self.typing.cancelled_caught or code is None) and self.prompts:
                self.terminal.out.write("\n")  # Ctrl-C at a prompt (a fresh one), or Ctrl-D
            self.typing = None
            if code is None or code.strip() in DETACH:
                return
            if code.strip():
                self.executing = True
                try:
                    if await self.execute(code) == "exit":
                        return
                finally:
                    self.executing = False

    async def _statement(self) -> str | None:
        """The next complete statement typed (None at the end of the input)."""
        typed: list[str] = []
        while True:
            line = await self._line(self._prompt(continuing=bool(typed)))
            if line is None:
                return None
            typed.append(line)
            code = "\n".join(typed)
            if not code.strip() or (len(typed) > 1 and not line.strip()):
                return code
            if await self.completeness(code) != "incomplete":
                return code

    def _prompt(self, *, continuing: bool) -> str:
        count = " " if self.next_count is None else str(self.next_count)
        prompt = f"In [{count}]: "
        return " " * (len(prompt) - 5) + "...: " if continuing else prompt

    async def _line(self, prompt: str) -> str | None:
        if self.prompts:
            self.terminal.out.write(prompt)
            self.terminal.out.flush()
        line = await self.lines.receive()
        return None if line is None else line.rstrip("\n")


@attrs.define
class ChannelsConsole(Console):
    """A console on the kernel's Jupyter channels (the daemon's API on TCP)."""

    channels: Channels = attrs.field(kw_only=True)
    # Our requests' msg_ids -> where the messages answering them go.
    _waiting: dict[str, trio.MemorySendChannel[tuple[str, JSON]]] = attrs.field(
        init=False, factory=dict
    )

    async def follow(self) -> None:
        """Show what the kernel sends, and pass our requests' answers on, until the end."""
        while True:
            try:
                frame = await self.channels.receive_frame()
            except trio_websocket.ConnectionClosed:
                return
            except ValueError:
                continue  # a message with binary buffers (a widget's): nothing a console shows
            self._take(frame)

    def _take(self, frame: JSON) -> None:
        msg_type = frame["header"]["msg_type"]
        content = frame["content"]
        parent = (frame.get("parent_header") or {}).get("msg_id")
        waiting = self._waiting.get(parent) if parent else None
        if frame.get("channel") != "iopub":
            if waiting is not None:
                waiting.send_nowait((msg_type, frame))
        elif msg_type == "status":
            state = content.get("execution_state")
            if state == "idle" and waiting is not None:
                waiting.send_nowait(("idle", frame))
            elif state in ("restarting", "dead"):
                self.terminal.note(f"[the kernel is {state}]")
                for each in self._waiting.values():
                    each.send_nowait(("lost", frame))
        elif msg_type == "execute_input":
            self.counted(content.get("execution_count"))
            if waiting is None:
                code = content.get("code", "")
                self.terminal.note(
                    f"In [{content.get('execution_count')}] (another client): {code}"
                )
        elif msg_type in OUTPUTS:
            self.terminal.show(output_item(msg_type, content), numbered=True)

    async def completeness(self, code: str) -> str:
        """The kernel's `is_complete` status for `code` (`unknown` if it does not say soon)."""
        request = message("is_complete_request", {"code": code})
        with trio.move_on_after(IS_COMPLETE_SECONDS):
            async with self._answers(request) as answers:
                async for msg_type, frame in answers:
                    if msg_type == "is_complete_reply":
                        return str(frame["content"].get("status"))
        return "unknown"

    async def execute(self, code: str) -> str:
        reply: JSON | None = None
        idle = False
        async with self._answers(execute_request(code, allow_stdin=True)) as answers:
            async for msg_type, frame in answers:
                if msg_type == "execute_reply":
                    reply = frame["content"]
                elif msg_type == "idle":
                    idle = True
                elif msg_type == "input_request":
                    await self._answer_input(frame)
                elif msg_type == "lost":
                    return "lost"
                if reply is not None and idle:
                    break
        assert reply is not None
        self.counted(reply.get("execution_count"))
        payloads = reply.get("payload") or []
        return "exit" if any(p.get("source") == "ask_exit" for p in payloads) else "done"

    async def _answer_input(self, request: JSON) -> None:
        """The code called `input()`: the next line typed is its answer."""
        self.terminal.out.write(request["content"].get("prompt", ""))
        self.terminal.out.flush()
        with trio.CancelScope() as self.asking:
            line = await self.lines.receive()
            reply = message(
                "input_reply",
                {"value": (line or "").rstrip("\n")},
                "stdin",
                parent_header=request["header"],
            )
            await self.channels.send(reply)
        self.asking = None

    @asynccontextmanager
    async def _answers(self, request: JSON) -> AsyncIterator[Answers]:
        """Send `request`; what answers it (as `(msg_type, frame)`, `idle` for its iopub idle,
        `lost` if the kernel restarts or dies meanwhile) comes out of the channel yielded."""
        send, receive = trio.open_memory_channel[tuple[str, JSON]](math.inf)
        msg_id = request["header"]["msg_id"]
        self._waiting[msg_id] = send
        try:
            await self.channels.send(request)
            yield receive
        finally:
            del self._waiting[msg_id]


class ExecuteConsole(Console):
    """A console where the Jupyter channels are not served (the daemon's API on a Unix socket):
    each statement runs through the streamed `POST /execute`, and only the console's own
    executions show. With no kernel to ask, a line ending in `:` or `\\` opens a block that a
    blank line ends."""

    async def completeness(self, code: str) -> str:
        opens = any(line.rstrip().endswith((":", "\\")) for line in code.splitlines())
        return "incomplete" if opens else "complete"

    async def execute(self, code: str) -> str:
        async with self.client.execute_stream(self.session_id, code) as items:
            async for item in items:
                if item.get("type") == "result":
                    self.counted(item.get("execution_count"))
                else:
                    self.terminal.show(item, numbered=True)
        return "done"


def output_item(msg_type: str, content: JSON) -> JSON:
    """An iopub output message as the API's output item (an update as a new display)."""
    if msg_type == "stream":
        return {"type": "stream", "stream_name": content.get("name"), "text": content.get("text")}
    if msg_type == "error":
        return {
            "type": "error",
            "error_name": content.get("ename"),
            "error_message": content.get("evalue"),
            "error_traceback": content.get("traceback"),
        }
    kind = "display_data" if msg_type == "update_display_data" else msg_type
    return {"type": kind, **content}


async def read_lines(stdin: TextIO, lines: trio.MemorySendChannel[str | None]) -> None:
    """Lines typed, into `lines` (None at the end of the input), read by a thread of their own
    so that the console waits on the user and the kernel at once, and no line is lost to a
    cancelled read. The thread is abandoned, blocked in its read, when the console ends."""

    def pump() -> None:
        try:
            while line := stdin.readline():
                trio.from_thread.run(lines.send, line)
            trio.from_thread.run(lines.send, None)
        except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    await trio.to_thread.run_sync(pump, abandon_on_cancel=True)
