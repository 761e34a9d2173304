"""The examples the README points to keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_embed_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert "42" in lines
    assert "ZeroDivisionError: division by zero" in lines
    assert any(line.startswith("KeyboardInterrupt") for line in lines)
    assert "NameError: name 'secret' is not defined" in lines
    assert lines[-1] == "supervisor closed: no kernel left running"
