"""The TCP traffic on the loopback interface while a block runs, to check that a kernel's
ZeroMQ traffic is encrypted: the text of the code a test executes must not be in it.

An AF_PACKET socket (root only) bound to `lo` gets a copy of every packet sent there, at the
moment it is sent; a thread empties it while the block runs, and what is left is read after.
The socket takes only the arriving copy of each packet, not the leaving one as well.
Packets the socket had to drop (its buffer full) would make the check blind, so a capture that
lost any raises instead of answering.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Collection, Iterator

import attrs

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
# A bound on the packets queued for the thread, not memory taken: room for a burst of 200 MB,
# which loopback sends faster than the thread reads.
BUFFER_BYTES = 256 << 20
# Loopback's MTU is 64 KiB; a segmentation-offloaded packet is no larger on `lo`.
READ_BYTES = 1 << 18
POLL_SECONDS = 0.05


@attrs.frozen
class Segment:
    """The payload of one TCP segment, and where it went."""

    source: tuple[str, int]
    destination: tuple[str, int]
    payload: bytes


class PacketsLost(RuntimeError):
    """The capture missed packets, so it cannot say what was not sent."""


@attrs.define
class LoopbackCapture:
    """What a `capture_loopback` block saw: its TCP segments with a payload, in order."""

    segments: list[Segment] = attrs.Factory(list)

    def payload(self, *, ports: Collection[int] = (), excluding: Collection[int] = ()) -> bytes:
        """The bytes of the segments to or from any of `ports` (all ports when empty), leaving
        out those to or from any of `excluding` (say, the daemon's HTTP port, where a client
        sends code in plaintext by design)."""

        def chosen(segment: Segment) -> bool:
            mine = {segment.source[1], segment.destination[1]}
            return (not ports or bool(mine & set(ports))) and not mine & set(excluding)

        return b"".join(segment.payload for segment in self.segments if chosen(segment))


def tcp_segment(protocol: int, packet: bytes) -> Segment | None:
    """The TCP segment in an IPv4 or IPv6 packet; None for anything else."""
    if protocol == ETH_P_IP and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0] or len(packet)
        if packet[9] != IPPROTO_TCP:
            return None
        addresses = packet[12:16], packet[16:20]
    elif protocol == ETH_P_IPV6 and len(packet) >= 40:
        header = 40
        total = header + struct.unpack_from("!H", packet, 4)[0]
        if packet[6] != IPPROTO_TCP:  # extension headers do not occur on loopback's TCP
            return None
        addresses = packet[8:24], packet[24:40]
    else:
        return None
    source_port, destination_port = struct.unpack_from("!HH", packet, header)
    data = header + (packet[header + 12] >> 4) * 4
    source, destination = (str(ipaddress.ip_address(address)) for address in addresses)
    return Segment((source, source_port), (destination, destination_port), packet[data:total])


def _read(sock: socket.socket, capture: LoopbackCapture) -> bool:
    """One packet from `sock` into `capture`; False when none came within its timeout."""
    try:
        packet, (interface, protocol, *_) = sock.recvfrom(READ_BYTES)
    except (TimeoutError, BlockingIOError):
        return False
    if interface == "lo":  # not a packet of another interface, queued before the bind
        segment = tcp_segment(protocol, packet)
        if segment is not None and segment.payload:
            capture.segments.append(segment)
    return True


@contextlib.contextmanager
def capture_loopback() -> Iterator[LoopbackCapture]:
    """Capture loopback's TCP traffic for the duration of the block; the capture is complete
    once the block has ended. PermissionError without root; `PacketsLost` if packets were
    dropped."""
    capture = LoopbackCapture()
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFFER_BYTES)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.bind(("lo", ETH_P_ALL))
        sock.settimeout(POLL_SECONDS)
        done = threading.Event()

        def read_until_done() -> None:
            while not done.is_set():
                _read(sock, capture)

        reader = threading.Thread(target=read_until_done, name="loopback capture", daemon=True)
        reader.start()
        try:
            yield capture
        finally:
            done.set()
            reader.join()
        # Every packet sent during the block is in the socket's queue by now.
        sock.setblocking(False)
        while _read(sock, capture):
            pass
        _received, dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    if dropped:
        raise PacketsLost(f"the loopback capture dropped {dropped} packets")
