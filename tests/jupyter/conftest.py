"""The target of the real clients' scenarios: one parameter, Kernel Gateway or our daemon."""

from __future__ import annotations

import pytest

from tests.jupyter.servers import SERVERS


@pytest.fixture(scope="module", params=SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """Which server of the kernels API the module's scenarios run against ("kg" or "ours")."""
    kind: str = request.param
    return kind
