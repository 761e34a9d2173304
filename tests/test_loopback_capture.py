"""The loopback capture can fail a test: it sees plaintext sent over TCP, on IPv4 and IPv6, on
the ports asked for only, and only during its block; and it does not see the plaintext of a
ZeroMQ exchange with CurveZMQ, while it does without it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest
import zmq

from kallichore.jupyter.connection import PortAllocator
from tests.loopback_capture import capture_loopback
from tests.remote_hosts import unavailable

SECRET = b"print('the code under test', 6*7)"


@pytest.fixture(autouse=True)
def root() -> None:
    if os.geteuid() != 0:
        unavailable("capturing packets needs root")


@contextlib.contextmanager
def connected_pair(host: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with (
        socket.create_server((host, 0), family=family) as server,
        socket.create_connection(server.getsockname()[:2]) as client,
    ):
        peer, _ = server.accept()
        with peer:
            yield client, peer


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_plaintext_over_tcp_is_seen_on_its_port_during_the_block(host: str) -> None:
    with connected_pair(host) as (client, peer):
        port = peer.getsockname()[1]
        with capture_loopback() as capture:
            client.sendall(SECRET)
            assert peer.recv(1024) == SECRET
        client.sendall(b"after the block")
        assert peer.recv(1024) == b"after the block"
    assert SECRET in capture.payload()
    assert capture.payload(ports=[port]) == SECRET
    assert not capture.payload(ports=[port], excluding=[port])
    assert SECRET not in capture.payload(ports=[port + 1])
    # Other tests' loopback traffic may be in the capture too (xdist): only this pair's.
    ours = [s for s in capture.segments if port in (s.source[1], s.destination[1])]
    assert ours[-1].destination == (host, port)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_curvezmq_hides_the_text_that_plain_zeromq_shows(curve: bool) -> None:
    (port,) = PortAllocator().allocate(1)
    with zmq.Context() as context:
        server, client = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        with server, client:
            if curve:
                server_public, server_secret = zmq.curve_keypair()
                client.curve_publickey, client.curve_secretkey = zmq.curve_keypair()
                client.curve_serverkey = server_public
                server.curve_server = True
                server.curve_secretkey = server_secret
            for sock in (server, client):
                sock.linger = 0
                sock.rcvtimeo = 30_000
            server.bind(f"tcp://127.0.0.1:{port}")
            with capture_loopback() as capture:
                client.connect(f"tcp://127.0.0.1:{port}")
                client.send(SECRET)
                assert server.recv() == SECRET
    assert capture.payload(ports=[port]), "the exchange was not captured"
    assert (SECRET in capture.payload(ports=[port])) is not curve
