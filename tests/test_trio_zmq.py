"""Tests for kallichore.trio_zmq against real ZeroMQ sockets.

Timeouts here only turn a hang into a failure; nothing asserts on speed.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import pytest
import trio
import trio.testing
import zmq

from kallichore.trio_zmq import TrioSocket

Context = zmq.Context[zmq.Socket[bytes]]

HANG_GUARD = 60  # seconds
PEER_TIMEOUT_MS = 30_000  # lets a peer thread fail instead of blocking forever


@pytest.fixture
def ctx() -> Iterator[Context]:
    context: Context = zmq.Context()
    context.setsockopt(zmq.LINGER, 0)
    yield context
    context.destroy(linger=0)


def make_pair(
    ctx: Context, kind_a: int = zmq.PAIR, kind_b: int = zmq.PAIR, hwm: int | None = None
) -> tuple[TrioSocket, TrioSocket]:
    """Two TrioSockets connected over inproc; ``hwm`` caps both directions."""
    address = f"inproc://{uuid.uuid4().hex}"
    a, b = ctx.socket(kind_a), ctx.socket(kind_b)
    if hwm is not None:
        for sock in (a, b):
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
    a.bind(address)
    b.connect(address)
    return TrioSocket(a), TrioSocket(b)


def fill_outbound(sock: zmq.Socket[bytes]) -> None:
    """Send until the high-water mark refuses more, so the next send would block."""
    try:
        while True:
            sock.send(b"filler", zmq.NOBLOCK)
    except zmq.Again:
        pass


def message(i: int) -> list[bytes]:
    return [b"%d" % i]


def peer_socket(ctx: Context, kind: int, address: str) -> zmq.Socket[bytes]:
    """A blocking socket for a peer thread, created in that thread."""
    sock = ctx.socket(kind)
    # Unlike the context default of 0, deliver the last messages before closing.
    sock.setsockopt(zmq.LINGER, PEER_TIMEOUT_MS)
    sock.setsockopt(zmq.RCVTIMEO, PEER_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDTIMEO, PEER_TIMEOUT_MS)
    sock.connect(address)
    return sock


def echo_peer(ctx: Context, address: str, count: int) -> None:
    """Echo ``count`` messages from a ROUTER that blocks rather than drops when full."""
    with peer_socket(ctx, zmq.ROUTER, address) as router:
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for _ in range(count):
            router.send_multipart(router.recv_multipart())


def paced_push_peer(ctx: Context, address: str, count: int, seed: int) -> None:
    """Send ``count`` numbered messages in small bursts with short pauses."""
    rng = random.Random(seed)
    with peer_socket(ctx, zmq.PUSH, address) as push:
        for i in range(count):
            push.send_multipart(message(i))
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 0.002))


def paced_pull_peer(ctx: Context, address: str, count: int, seed: int) -> list[list[bytes]]:
    """Receive ``count`` messages slowly enough to keep the sender at its HWM."""
    rng = random.Random(seed)
    with peer_socket(ctx, zmq.PULL, address) as pull:
        pull.setsockopt(zmq.RCVHWM, 5)
        received = []
        for _ in range(count):
            received.append(pull.recv_multipart())
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 0.002))
        return received


def noise_echo_peer(ctx: Context, address: str, pings: int) -> None:
    """Echo messages whose first frame is b"ping"; swallow everything else."""
    with peer_socket(ctx, zmq.ROUTER, address) as router:
        echoed = 0
        while echoed < pings:
            identity, *frames = router.recv_multipart()
            if frames[0] == b"ping":
                router.send_multipart([identity, *frames])
                echoed += 1


async def test_concurrent_send_and_recv_on_one_socket(ctx: Context) -> None:
    """One task sends while another receives on the same socket: no missed FD edge."""
    count = 20_000
    received: list[list[bytes]] = []

    async def send_all(dealer: TrioSocket) -> None:
        for i in range(count):
            await dealer.send_multipart(message(i))

    async def receive_all(dealer: TrioSocket) -> None:
        for _ in range(count):
            received.append(await dealer.recv_multipart())

    with TrioSocket(ctx.socket(zmq.DEALER)) as dealer, trio.fail_after(HANG_GUARD):
        # A small HWM makes the sender wait for POLLOUT while the receiver waits
        # for POLLIN, both on the one FD.
        dealer.socket.setsockopt(zmq.SNDHWM, 50)
        dealer.socket.setsockopt(zmq.RCVHWM, 50)
        port = dealer.socket.bind_to_random_port("tcp://127.0.0.1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trio.to_thread.run_sync, echo_peer, ctx, f"tcp://127.0.0.1:{port}", count
            )
            nursery.start_soon(send_all, dealer)
            nursery.start_soon(receive_all, dealer)
    assert received == [message(i) for i in range(count)]


async def test_sends_do_not_steal_a_receivers_wakeup(ctx: Context) -> None:
    """A task waiting for a reply is woken even if another task's send ate the FD signal."""
    rounds = 2000

    async def noise(dealer: TrioSocket) -> None:
        while True:
            await dealer.send_multipart([b"noise"])
            await trio.lowlevel.checkpoint()

    async def ping_pong(dealer: TrioSocket) -> None:
        for i in range(rounds):
            await dealer.send_multipart([b"ping", b"%d" % i])
            assert await dealer.recv_multipart() == [b"ping", b"%d" % i]

    with TrioSocket(ctx.socket(zmq.DEALER)) as dealer, trio.fail_after(HANG_GUARD):
        dealer.socket.setsockopt(zmq.SNDHWM, 0)
        port = dealer.socket.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, noise_echo_peer, ctx, address, rounds)
            async with trio.open_nursery() as noisy:
                noisy.start_soon(noise, dealer)
                await ping_pong(dealer)
                # Stop before the peer leaves: with no peer, sends would block.
                noisy.cancel_scope.cancel()


async def test_many_sockets_ping_pong(ctx: Context) -> None:
    """Several sockets with waiters at once, all served by one trio ROUTER."""
    clients, rounds = 8, 2000

    async def echo(router: TrioSocket) -> None:
        while True:
            for msg in await router.recv_batch():
                await router.send_multipart(msg)

    async def ping_pong(dealer: TrioSocket, client: int) -> None:
        for i in range(rounds):
            msg = [b"%d" % client, b"%d" % i]
            await dealer.send_multipart(msg)
            assert await dealer.recv_multipart() == msg

    with TrioSocket(ctx.socket(zmq.ROUTER)) as router, trio.fail_after(HANG_GUARD):
        router.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = router.socket.bind_to_random_port("tcp://127.0.0.1")
        dealers = [TrioSocket(ctx.socket(zmq.DEALER)) for _ in range(clients)]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo, router)
                async with trio.open_nursery() as pingers:
                    for client, dealer in enumerate(dealers):
                        dealer.socket.connect(f"tcp://127.0.0.1:{port}")
                        pingers.start_soon(ping_pong, dealer, client)
                nursery.cancel_scope.cancel()
        finally:
            for dealer in dealers:
                dealer.close()


@pytest.mark.parametrize("batched", [False, True])
async def test_cancelled_receives_lose_nothing(ctx: Context, batched: bool) -> None:
    """Receives cancelled at random moments neither drop nor duplicate messages."""
    count = 3000
    rng = random.Random(1234)
    received: list[list[bytes]] = []
    cancelled = 0

    async def receive_all(pull: TrioSocket) -> None:
        nonlocal cancelled
        while len(received) < count:
            timeout = rng.choice([0.0, rng.uniform(0, 0.003)])
            with trio.move_on_after(timeout) as scope:
                if batched:
                    received.extend(await pull.recv_batch(rng.randint(1, 50)))
                else:
                    received.append(await pull.recv_multipart())
            cancelled += scope.cancelled_caught

    with TrioSocket(ctx.socket(zmq.PULL)) as pull, trio.fail_after(HANG_GUARD):
        port = pull.socket.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, paced_push_peer, ctx, address, count, 5)
            nursery.start_soon(receive_all, pull)
    assert received == [message(i) for i in range(count)]
    assert cancelled > 0


async def test_cancelled_sends_are_all_or_nothing(ctx: Context) -> None:
    """A cancelled multipart send was not sent; a completed one was sent exactly once."""
    count = 2000
    rng = random.Random(99)
    address = f"inproc://{uuid.uuid4().hex}"
    expected = [[b"%d" % i, b"second", b"third"] for i in range(count)]
    cancelled = 0

    async def send_all(push: TrioSocket) -> None:
        nonlocal cancelled
        i = 0
        while i < count:
            with trio.move_on_after(rng.choice([0.0, rng.uniform(0, 0.003)])) as scope:
                await push.send_multipart(expected[i])
                i += 1
            cancelled += scope.cancelled_caught

    with TrioSocket(ctx.socket(zmq.PUSH)) as push, trio.fail_after(HANG_GUARD):
        push.socket.setsockopt(zmq.SNDHWM, 5)
        push.socket.bind(address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, push)
            received = await trio.to_thread.run_sync(paced_pull_peer, ctx, address, count, 7)
    assert received == expected
    assert cancelled > 0


async def test_cancelling_idle_receive(ctx: Context) -> None:
    """Cancelled waiters (FD owner and parked) leave the socket fully usable."""
    a, b = make_pair(ctx)
    with a, b, trio.fail_after(HANG_GUARD):
        with trio.move_on_after(0.05) as scope:
            await a.recv_multipart()
        assert scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.recv_multipart)
            nursery.start_soon(a.recv_batch)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

        await b.send_multipart([b"hello"])
        assert await a.recv_multipart() == [b"hello"]
        await b.send_multipart([b"again"])
        assert await a.recv_batch() == [[b"again"]]


async def test_cancelling_the_fd_owner_hands_over_to_a_parked_waiter(ctx: Context) -> None:
    """When the task in wait_readable leaves, a parked task must take over the FD."""
    a, b = make_pair(ctx)
    received: list[list[bytes]] = []

    async def receive(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            received.append(await a.recv_multipart())

    with a, b, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            # The first receiver owns wait_readable(fd); the second parks behind it.
            owner = await nursery.start(receive)
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(receive)
            await trio.testing.wait_all_tasks_blocked()
            owner.cancel()
            await trio.testing.wait_all_tasks_blocked()
            await b.send_multipart([b"hello"])
    assert received == [[b"hello"]]


async def test_cancelled_call_does_nothing_even_when_ready(ctx: Context) -> None:
    """Every call is a checkpoint: if already cancelled it neither receives nor sends."""
    a, b = make_pair(ctx)
    with a, b, trio.fail_after(HANG_GUARD):
        await b.send_multipart([b"first"])
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.recv_multipart()
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await a.recv_batch()
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await b.send_multipart([b"cancelled"])
        assert scope.cancelled_caught
        await b.send_multipart([b"second"])
        assert await a.recv_multipart() == [b"first"]
        assert await a.recv_multipart() == [b"second"]


async def test_blocked_send_does_not_swallow_a_receivers_wakeup(ctx: Context) -> None:
    """A send that finds the socket full reads EVENTS, draining the FD signal of an
    arriving message; the waiting receiver must still be woken."""
    a, b = make_pair(ctx, hwm=1)
    fill_outbound(a.socket)
    received: list[list[bytes]] = []

    with a, b, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as sender_scope:

                async def receive() -> None:
                    received.append(await a.recv_multipart())
                    sender_scope.cancel()

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                # Over inproc this signals a's FD synchronously; the send below
                # then runs before trio polls the FD again.
                b.socket.send(b"reply")
                await a.send_multipart([b"blocked"])
    assert received == [[b"reply"]]


async def test_sender_blocked_by_hwm_resumes_when_peer_drains(ctx: Context) -> None:
    """POLLOUT waits end when the peer reads: the wakeup is a command on our FD."""
    total = 200
    sent = 0

    async def send_all(push: TrioSocket) -> None:
        nonlocal sent
        for i in range(total):
            await push.send_multipart(message(i))
            sent += 1

    push, pull = make_pair(ctx, zmq.PUSH, zmq.PULL, hwm=5)
    with push, pull, trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, push)
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < sent < total
            received = [await pull.recv_multipart() for _ in range(total)]
    assert received == [message(i) for i in range(total)]
    assert sent == total


async def test_close_wakes_blocked_tasks(ctx: Context) -> None:
    """close() raises ClosedResourceError in the FD owner and in parked waiters."""
    # A DEALER with no peer blocks both sending and receiving.
    dealer = TrioSocket(ctx.socket(zmq.DEALER))
    dealer.socket.bind(f"inproc://{uuid.uuid4().hex}")
    woken = 0

    async def expect_closed(op: Callable[[], Awaitable[object]]) -> None:
        nonlocal woken
        with pytest.raises(trio.ClosedResourceError):
            await op()
        woken += 1

    ops: list[Callable[[], Awaitable[object]]] = [
        dealer.recv_multipart,
        dealer.recv_multipart,
        dealer.recv_batch,
        partial(dealer.send_multipart, [b"x"]),
    ]
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for op in ops:
                nursery.start_soon(expect_closed, op)
            await trio.testing.wait_all_tasks_blocked()
            dealer.close()
    assert woken == 4
    assert dealer.socket.closed

    with pytest.raises(trio.ClosedResourceError):
        await dealer.recv_multipart()
    with pytest.raises(trio.ClosedResourceError):
        await dealer.recv_batch()
    with pytest.raises(trio.ClosedResourceError):
        await dealer.send_multipart([b"x"])
    dealer.close()  # idempotent


async def test_context_manager_closes(ctx: Context) -> None:
    with TrioSocket(ctx.socket(zmq.PAIR)) as sock:
        pass
    assert sock.socket.closed
    with pytest.raises(trio.ClosedResourceError):
        await sock.recv_multipart()


def test_close_outside_trio(ctx: Context) -> None:
    """Cleanup code may close a socket after trio.run has returned."""
    sock = TrioSocket(ctx.socket(zmq.PAIR))
    sock.close()
    assert sock.socket.closed


async def test_socket_closed_underneath_raises_closed(ctx: Context) -> None:
    """ENOTSOCK from a zmq socket closed directly is reported as ClosedResourceError."""
    sock = TrioSocket(ctx.socket(zmq.PAIR))
    sock.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        await sock.recv_multipart()
    with pytest.raises(trio.ClosedResourceError):
        await sock.send_multipart([b"x"])
    sock.close()


async def test_context_term_wakes_blocked_receive() -> None:
    """Terminating the context wakes a blocked receive with ClosedResourceError."""
    context: Context = zmq.Context()
    sock = TrioSocket(context.socket(zmq.PULL))
    sock.socket.bind(f"inproc://{uuid.uuid4().hex}")

    async def receive() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await sock.recv_multipart()
        sock.close()  # lets term() finish

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await trio.to_thread.run_sync(context.term)


async def test_idle_waiters_do_not_spin(ctx: Context) -> None:
    """Blocked tasks cost no CPU, including senders stuck at HWM while input is unread."""
    a, b = make_pair(ctx)
    push, pull = make_pair(ctx, zmq.PAIR, zmq.PAIR, hwm=2)
    with a, b, push, pull, trio.fail_after(HANG_GUARD):
        # Leave a message unread on `push` so its EVENTS keeps POLLIN set while
        # two senders wait for POLLOUT.
        await pull.send_multipart([b"unread"])

        async def flood() -> None:
            while True:
                await push.send_multipart([b"x"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.recv_multipart)
            nursery.start_soon(a.recv_multipart)
            nursery.start_soon(flood)
            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            before = time.process_time()
            await trio.sleep(1)
            used = time.process_time() - before
            nursery.cancel_scope.cancel()
    assert used < 0.2
