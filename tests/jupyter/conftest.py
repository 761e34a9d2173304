"""The target of the real clients' scenarios: one parameter, Kernel Gateway or our daemon."""

from __future__ import annotations

import pytest

from tests.jupyter.servers import OURS_CHANNELS, OURS_NO_CHANNELS, SERVERS


@pytest.fixture(scope="module", params=SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """Which server of the kernels API the module's scenarios run against ("kg" or "ours")."""
    kind: str = request.param
    return kind


@pytest.fixture
def needs_channels(server_kind: str) -> None:
    """Skips a scenario that needs the channels WebSocket against our daemon until it has one."""
    if server_kind == "ours" and not OURS_CHANNELS:
        pytest.skip(OURS_NO_CHANNELS)
