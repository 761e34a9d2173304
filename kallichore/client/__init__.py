"""A trio client of the Kallichore API: sessions over HTTP, their channels over WebSocket.

    async with KallichoreClient.from_connection_file("kallichore.json") as client:
        await client.create_session("py", [sys.executable, "-m", "ipykernel_launcher",
                                           "-f", "{connection_file}"])
        await client.start("py")
        async with client.channels("py") as channels:
            result = await channels.execute("print(6*7)")
        outcome = await client.execute("py", "6 * 7")  # the agent API: one request

It talks only the API (httpx, trio-websocket), never the server's internals.
"""

from kallichore.client.channels import Channels, open_channels
from kallichore.client.client import ExecuteOptions, KallichoreClient
from kallichore.client.errors import ApiError, StartupFailed
from kallichore.client.events import (
    ChannelEvent,
    ClientDisconnected,
    EventsDropped,
    ExecutionQueued,
    ExecutionRequested,
    HandshakeCompleted,
    KernelExited,
    KernelMessage,
    KernelOutput,
    MessageRefused,
    ResourceUsage,
    StatusChanged,
    SupervisorEvent,
    UnknownEvent,
    WorkingDirChanged,
    decode_frame,
    execute_request,
    message,
)
from kallichore.client.execution import ExecuteResult, ExecutionError, ExecutionTracker

__all__ = [
    "ApiError",
    "ChannelEvent",
    "Channels",
    "ClientDisconnected",
    "EventsDropped",
    "ExecuteOptions",
    "ExecuteResult",
    "ExecutionError",
    "ExecutionQueued",
    "ExecutionRequested",
    "ExecutionTracker",
    "HandshakeCompleted",
    "KallichoreClient",
    "KernelExited",
    "KernelMessage",
    "KernelOutput",
    "MessageRefused",
    "ResourceUsage",
    "StartupFailed",
    "StatusChanged",
    "SupervisorEvent",
    "UnknownEvent",
    "WorkingDirChanged",
    "decode_frame",
    "execute_request",
    "message",
    "open_channels",
]
