"""The Jupyter channels: many clients per kernel, each seeing what jupyter_server would show it.

jupyter_server gives each channels connection a ZeroMQ socket of its own, so iopub reaches every
client and a reply reaches only the client whose request it answers. We keep one set of sockets
per kernel (the session's), and route instead: a client's request's msg_id is recorded with the
client's `session_id` when it is sent, and a shell, control or stdin message goes to the client
that sent its parent (or, for a request we did not see, the client named by the parent's
`session`). Supervisor events become what jupyter_server sends in their place (an iopub `status`
`restarting` or `dead`), or nothing.

Every connection is an *observer* of the session's event log: it never moves the acknowledged
point the Kallichore channel's client relies on. When a client's last connection goes, an
observer is left *parked* at what the client provably read (one per kernel, as jupyter_server
buffers one `session_id`); a connection with the same `session_id` takes it up and gets what it
missed, a connection with another discards it. The log's byte bound bounds the parked buffer;
what overflowed is shown to the client as a loss notice.

A frame is encoded once per framing however many clients get it (`_FrameCache`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import OrderedDict
from functools import partial
from weakref import WeakKeyDictionary

import trio
from wsproto.frame_protocol import CloseReason

from kallichore.channels.jupyter_framing import (
    Frame,
    JupyterFrameError,
    Protocol,
    decode,
    encode,
    loss_notice,
    status_message,
)
from kallichore.channels.websocket import PING_INTERVAL_SECONDS, ConnectionClosed, WebSocket
from kallichore.errors import KallichoreError
from kallichore.jupyter.wire import Channel, Message
from kallichore.session.events import (
    Event,
    EventLog,
    EventsDropped,
    ExitedEvent,
    JupyterEvent,
    Subscription,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import RestartOrigin

logger = logging.getLogger(__name__)

# How many request msg_ids are remembered for routing their replies (oldest forgotten first).
MAX_REQUESTS = 10_000
# How many bytes of encoded frames of one framing are kept for the other clients of a kernel.
FRAME_CACHE_BYTES = 8 * 2**20
# How long a client we close gets to answer our Close.
CLOSE_ANSWER_SECONDS = 1.0


class _FrameCache:
    """Recent frames of one framing by seq, bounded by bytes: N clients cost one encode."""

    def __init__(self, protocol: Protocol, max_bytes: int = FRAME_CACHE_BYTES) -> None:
        self._protocol = protocol
        self._frames: OrderedDict[int, Frame] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes

    def get(self, seq: int, message: Message, channel: Channel) -> Frame:
        frame = self._frames.get(seq)
        if frame is None:
            frame = self._frames[seq] = encode(message, channel, self._protocol)
            self._bytes += len(frame)
            while self._bytes > self._max_bytes and len(self._frames) > 1:
                self._bytes -= len(self._frames.popitem(last=False)[1])
        return frame


class KernelHub:
    """One kernel's Jupyter connections, its parked buffer and its request routing."""

    def __init__(self, session_id: str, log: EventLog) -> None:
        # The kernel's session (its Kallichore id): held by id, so that the hub never keeps a
        # deleted session alive.
        self._session_id = session_id
        self._log = log
        self.connections: dict[str, JupyterConnection] = {}
        self._parked: tuple[str, Subscription] | None = None
        self.requests: OrderedDict[str, str] = OrderedDict()
        self.frames = {protocol: _FrameCache(protocol) for protocol in Protocol}

    def request_sent(self, msg_id: str, client_session: str) -> None:
        requests = self.requests
        requests[msg_id] = client_session
        if len(requests) > MAX_REQUESTS:
            requests.popitem(last=False)

    def take_parked(self, client_session: str) -> Subscription | None:
        """The parked observer if it is `client_session`'s; any other is discarded."""
        parked, self._parked = self._parked, None
        if parked is None:
            return None
        if parked[0] == client_session:
            logger.info("session %s: replaying to a Jupyter client", self._session_id)
            return parked[1]
        parked[1].close()
        return None

    def park(self, client_session: str, after: int) -> None:
        """Keep what `client_session` has not read, from after `after`, for its return."""
        self.discard_parked()
        if not self._log.closed:
            self._parked = (client_session, self._log.subscribe(after=after))

    def discard_parked(self) -> None:
        if self._parked is not None:
            self._parked[1].close()
            self._parked = None


class JupyterConnection:
    """One Jupyter client's WebSocket on one kernel."""

    def __init__(
        self,
        hub: KernelHub,
        session: KernelSession,
        websocket: WebSocket,
        client_session: str,
        protocol: Protocol,
        *,
        asked: int,
    ) -> None:
        self._hub = hub
        # When the client asked for this connection (`JupyterHubs.ask`): the later one wins.
        self.asked = asked
        self._session = session
        self._websocket = websocket
        self.client_session = client_session
        self._protocol = protocol
        self._cache = hub.frames[protocol]
        self._acknowledged = 0
        self._replaced = False
        self._scope = trio.CancelScope()
        self._finished = trio.Event()

    async def run(self, events: Subscription, stopping: trio.Event, ping_interval: float) -> None:
        """Serve the client until it leaves, is replaced, stops answering, or the server
        stops; then park what it has not provably read."""
        websocket = self._websocket
        self._acknowledged = events.cursor
        websocket.on_acknowledged = self._acknowledge
        try:
            with self._scope:
                await self._serve(events, stopping, ping_interval)
        finally:
            read = websocket.sent_through if websocket.closed_cleanly else self._acknowledged
            self._hub.park(self.client_session, max(read, self._acknowledged))
            events.close()
            self._finished.set()

    async def _serve(
        self, events: Subscription, stopping: trio.Event, ping_interval: float
    ) -> None:
        async with trio.open_nursery() as nursery:
            events.sink = partial(self._send_now, nursery, events)
            nursery.start_soon(self._forward_events, events, nursery.cancel_scope)
            nursery.start_soon(self._forward_client_messages, nursery.cancel_scope)
            nursery.start_soon(self._close_when, stopping, nursery.cancel_scope)
            nursery.start_soon(self._drop_if_unresponsive, ping_interval, nursery.cancel_scope)

    def _acknowledge(self, seq: int) -> None:
        self._acknowledged = max(self._acknowledged, seq)

    async def replace(self) -> None:
        """Close this connection for a newer one of the same client; wait until it is gone."""
        self._replaced = True
        with (
            trio.move_on_after(CLOSE_ANSWER_SECONDS),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self._websocket.close(
                CloseReason.NORMAL_CLOSURE, "replaced by a newer connection"
            )
            await self._finished.wait()
        self._scope.cancel()
        await self._finished.wait()

    # -- to the client ---------------------------------------------------------------------

    def _frames(self, events: list[Event], last_seq: int) -> list[Frame]:
        """This client's frames of `events`, whose last has seq `last_seq`."""
        frames: list[Frame] = []
        cache = self._cache
        # An `EventsDropped` (only ever first) is no event of the log: it takes no seq.
        seq = last_seq - len(events) + (bool(events) and type(events[0]) is EventsDropped)
        for event in events:
            if type(event) is JupyterEvent:
                seq += 1
                channel = event.channel
                if channel is Channel.IOPUB or self._is_ours(event.message):
                    frames.append(cache.get(seq, event.message, channel))
            elif type(event) is EventsDropped:
                notice = loss_notice(event.count, self._session.session_id)
                frames.append(encode(notice, Channel.IOPUB, self._protocol))
            else:
                seq += 1
                if type(event) is ExitedEvent and event.restart is not RestartOrigin.JUPYTER:
                    # A restart the client asked for is not announced: it reconnects by itself.
                    state = "dead" if event.restart is None else "restarting"
                    status = status_message(state, self._session.session_id)
                    frames.append(cache.get(seq, status, Channel.IOPUB))
        return frames

    def _is_ours(self, message: Message) -> bool:
        """A reply (or input request) whose parent this client sent."""
        parent = message.parent_header
        msg_id = parent.get("msg_id")
        owner = self._hub.requests.get(msg_id) if isinstance(msg_id, str) else None
        if owner is None:
            owner = parent.get("session")
        return owner == self.client_session

    def _send_now(
        self, nursery: trio.Nursery, subscription: Subscription, events: list[Event]
    ) -> bool:
        """The event log's fast path, as the Kallichore channel's (`broker.ChannelClient`)."""
        websocket = self._websocket
        if self._replaced or not websocket.free:
            return False
        through = subscription.cursor + len(events)
        frames = self._frames(events, through)
        if not frames:
            return True
        if not websocket.send_now(frames, through):
            return False
        if websocket.owes:
            nursery.start_soon(websocket.flush)
        return True

    async def _forward_events(self, events: Subscription, done: trio.CancelScope) -> None:
        try:
            while True:
                batch = await events.receive()
                frames = self._frames(batch, events.cursor)
                await self._websocket.send_batch(frames, events.cursor)
        except trio.EndOfChannel:
            await self._websocket.close(CloseReason.GOING_AWAY, "the kernel was deleted")
            await trio.sleep(CLOSE_ANSWER_SECONDS)
        except ConnectionClosed:
            pass
        done.cancel()

    # -- from the client -------------------------------------------------------------------

    async def _forward_client_messages(self, done: trio.CancelScope) -> None:
        while (frame := await self._websocket.receive_message()) is not None:
            await self._forward(frame)
        done.cancel()

    async def _forward(self, frame: str | bytes) -> None:
        session = self._session
        try:
            message = decode(frame, self._protocol)
        except JupyterFrameError as error:
            logger.info(
                "session %s: dropped a Jupyter client's frame: %s", session.session_id, error
            )
            return
        if message is None:
            return
        self._hub.request_sent(message.header["msg_id"], self.client_session)
        try:
            await session.send_client_message(
                message.channel,
                message.header,
                message.parent_header,
                metadata_json=message.metadata_json,
                content_json=message.content_json,
                buffers=message.buffers,
            )
        except KallichoreError as error:
            logger.info(
                "session %s: a Jupyter client's %s was not sent: %s",
                session.session_id,
                message.header["msg_type"],
                error.message,
            )

    # -- the end ---------------------------------------------------------------------------

    async def _close_when(self, stopping: trio.Event, done: trio.CancelScope) -> None:
        await stopping.wait()
        await self._websocket.close(CloseReason.GOING_AWAY, "the server is shutting down")
        done.cancel()

    async def _drop_if_unresponsive(self, interval: float, done: trio.CancelScope) -> None:
        await self._websocket.ping_until_unanswered(interval)
        logger.info(
            "session %s: dropping a Jupyter client that stopped answering pings",
            self._session.session_id,
        )
        done.cancel()


class JupyterHubs:
    """Every kernel's Jupyter connections; made with the server, read by the REST API."""

    def __init__(self) -> None:
        self._hubs: WeakKeyDictionary[KernelSession, KernelHub] = WeakKeyDictionary()
        self.stopping = trio.Event()
        self._live = 0
        self._detached = trio.Event()
        self._detached.set()
        self._asked = itertools.count()

    def ask(self) -> int:
        """A ticket for a connection being asked for (its upgrade request has arrived); which
        of two connections of one client is the newer goes by these, not by which is served
        first once the kernel is ready."""
        return next(self._asked)

    def connections(self, session: KernelSession) -> int:
        """How many Jupyter clients are connected to `session`'s kernel now."""
        hub = self._hubs.get(session)
        return 0 if hub is None else len(hub.connections)

    async def wait_detached(self) -> None:
        """Wait until no Jupyter client is connected to any kernel."""
        await self._detached.wait()

    async def serve(
        self,
        session: KernelSession,
        websocket: WebSocket,
        client_session: str,
        protocol: Protocol,
        *,
        asked: int | None = None,
        ping_interval: float = PING_INTERVAL_SECONDS,
    ) -> None:
        """Serve one Jupyter connection of `client_session` (its `session_id`) until it ends;
        an older connection of the same client is closed first, and this one is closed at once
        if the client asked for the one it has now after it (`asked`: its `ask()` ticket).
        Closes `websocket`."""
        hub = self._hubs.get(session)
        if hub is None:
            hub = self._hubs[session] = KernelHub(session.session_id, session.events)
        asked = self.ask() if asked is None else asked
        connection = JupyterConnection(
            hub, session, websocket, client_session, protocol, asked=asked
        )
        if not self._live:
            self._detached = trio.Event()
        self._live += 1
        try:
            previous = hub.connections.get(client_session)
            if previous is not None and previous.asked > asked:
                # jupyter_server leaves a channels connection it gave up on open while the
                # kernel starts and asks again: the abandoned one must not replace the retry.
                logger.info("session %s: a superseded Jupyter connection", session.session_id)
                return
            hub.connections[client_session] = connection
            if previous is not None:
                logger.info("session %s: a Jupyter client reconnected", session.session_id)
                await previous.replace()
            events = hub.take_parked(client_session) or session.events.subscribe(backlog=False)
            logger.info("session %s: a Jupyter client connected", session.session_id)
            await connection.run(events, self.stopping, ping_interval)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if hub.connections.get(client_session) is connection:
                del hub.connections[client_session]
            logger.info("session %s: a Jupyter client disconnected", session.session_id)
            self._live -= 1
            if not self._live:
                self._detached.set()
            await websocket.aclose()
