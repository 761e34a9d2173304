"""kallichore: a headless Jupyter kernel supervisor built on trio.

The embeddable API in one import::

    from kallichore import open_supervisor, SessionSpec, python_kernelspec
"""

from kallichore.errors import ErrorCode, KallichoreError, StartupError
from kallichore.jupyter.kernelspec import KernelSpec, get_kernelspec, python_kernelspec
from kallichore.jupyter.wire import Channel, Message
from kallichore.session.events import (
    Event,
    EventsDropped,
    ExecutionQueuedEvent,
    ExecutionRequestedEvent,
    ExitedEvent,
    HandshakeCompletedEvent,
    JupyterEvent,
    OutputEvent,
    ResourceUsageEvent,
    StatusEvent,
    Subscription,
    WorkingDirChangedEvent,
)
from kallichore.session.kernel_session import KernelSession
from kallichore.session.model import (
    InterruptMode,
    SessionConfig,
    SessionSpec,
    Status,
    VarAction,
    VarActionType,
)
from kallichore.session.outputs import ExecutionOutcome
from kallichore.supervisor import Supervisor, SupervisorConfig, open_supervisor

__version__ = "0.1.0"

__all__ = [
    "Channel",
    "ErrorCode",
    "Event",
    "EventsDropped",
    "ExecutionOutcome",
    "ExecutionQueuedEvent",
    "ExecutionRequestedEvent",
    "ExitedEvent",
    "HandshakeCompletedEvent",
    "InterruptMode",
    "JupyterEvent",
    "KallichoreError",
    "KernelSession",
    "KernelSpec",
    "Message",
    "OutputEvent",
    "ResourceUsageEvent",
    "SessionConfig",
    "SessionSpec",
    "StartupError",
    "Status",
    "StatusEvent",
    "Subscription",
    "Supervisor",
    "SupervisorConfig",
    "VarAction",
    "VarActionType",
    "WorkingDirChangedEvent",
    "get_kernelspec",
    "open_supervisor",
    "python_kernelspec",
]
