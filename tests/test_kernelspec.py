"""Kernelspec discovery against throwaway Jupyter data directories."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from kallichore.jupyter import kernelspec
from kallichore.jupyter.kernelspec import (
    KernelSpec,
    KernelSpecError,
    find_kernelspecs,
    get_kernelspec,
    kernelspec_dirs,
    python_kernelspec,
)

LOGGER = "kallichore.jupyter.kernelspec"


class Dirs:
    """Two JUPYTER_PATH entries (high before low priority) and the user data directory."""

    def __init__(self, root: Path) -> None:
        self.high = root / "high" / "kernels"
        self.low = root / "low" / "kernels"
        self.data = root / "data" / "kernels"


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dirs:
    result = Dirs(tmp_path)
    monkeypatch.setenv(
        "JUPYTER_PATH", os.pathsep.join([str(result.high.parent), str(result.low.parent)])
    )
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(result.data.parent))
    monkeypatch.delenv("JUPYTER_PREFER_ENV_PATH", raising=False)
    return result


def install(kernels_dir: Path, name: str, spec: Any) -> Path:
    """Write a kernel.json (raw bytes as given, anything else as JSON); returns its directory."""
    directory = kernels_dir / name
    directory.mkdir(parents=True)
    raw = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
    (directory / "kernel.json").write_bytes(raw)
    return directory


def spec_json(display_name: Any = "Echo", **extra: Any) -> dict[str, Any]:
    return {
        "argv": ["echo-kernel", "-f", "{connection_file}"],
        "display_name": display_name,
    } | extra


def test_dirs_follow_jupyter_path_then_data_dir(dirs: Dirs) -> None:
    found = kernelspec_dirs()
    assert found[:2] == [dirs.high, dirs.low]
    assert dirs.data in found


def test_discovers_full_spec(dirs: Dirs) -> None:
    resource_dir = install(
        dirs.low,
        "echo",
        spec_json(
            language="echo-lang",
            env={"ECHO_MODE": "loud"},
            interrupt_mode="message",
            kernel_protocol_version="5.4",
            metadata={"debugger": True},
        ),
    )
    spec = find_kernelspecs()["echo"]
    assert spec == KernelSpec(
        name="echo",
        argv=("echo-kernel", "-f", "{connection_file}"),
        display_name="Echo",
        language="echo-lang",
        resource_dir=resource_dir,
        env={"ECHO_MODE": "loud"},
        interrupt_mode="message",
        protocol_version="5.4",
        metadata={"debugger": True},
    )
    assert get_kernelspec("echo") == spec


def test_optional_fields_default(dirs: Dirs) -> None:
    install(dirs.high, "minimal", spec_json())
    spec = get_kernelspec("minimal")
    assert spec.language == ""
    assert spec.env == {}
    assert spec.interrupt_mode == "signal"
    assert spec.protocol_version is None
    assert spec.metadata == {}


def test_first_directory_wins(dirs: Dirs) -> None:
    install(dirs.low, "dup", spec_json("low"))
    install(dirs.data, "dup", spec_json("data"))
    install(dirs.high, "dup", spec_json("high"))
    install(dirs.data, "other", spec_json("data"))
    install(dirs.low, "other", spec_json("low"))

    specs = find_kernelspecs()
    assert specs["dup"].display_name == "high"
    assert specs["dup"].resource_dir == dirs.high / "dup"
    assert specs["other"].display_name == "low"
    assert get_kernelspec("dup").display_name == "high"
    assert get_kernelspec("other").display_name == "low"


def test_our_python3_shadows_installed_ones(dirs: Dirs) -> None:
    install(dirs.high, "python3", spec_json("Shadow Python", language="python"))
    assert find_kernelspecs()["python3"].display_name == "Shadow Python"
    assert python_kernelspec().display_name == "Shadow Python"


def test_names_are_lowercased(dirs: Dirs) -> None:
    install(dirs.high, "MyKernel", spec_json())
    assert "mykernel" in find_kernelspecs()
    assert get_kernelspec("MYKERNEL").name == "mykernel"


def test_entries_without_kernel_json_are_ignored(dirs: Dirs) -> None:
    (dirs.high / "empty").mkdir(parents=True)
    (dirs.high / "stray-file").write_text("not a kernelspec")
    install(dirs.high / "nested", "deeper", spec_json())
    specs = find_kernelspecs()
    assert not {"empty", "stray-file", "nested", "deeper"} & specs.keys()


def test_invalid_name_is_skipped_with_warning(dirs: Dirs, caplog: pytest.LogCaptureFixture) -> None:
    install(dirs.high, "has space", spec_json())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        specs = find_kernelspecs()
    assert "has space" not in specs
    assert "invalid kernel name" in caplog.text


INVALID = [
    pytest.param(b"{not json", "cannot read", id="not-json"),
    pytest.param(b"\xff\xfe\xfa", "cannot read", id="not-utf8"),
    pytest.param([], "not a JSON object", id="list"),
    pytest.param({"display_name": "x"}, "argv", id="no-argv"),
    pytest.param(spec_json(argv=[]), "argv", id="empty-argv"),
    pytest.param(spec_json(argv="echo -f {connection_file}"), "argv", id="argv-string"),
    pytest.param(spec_json(argv=["echo", 1]), "argv", id="argv-int"),
    pytest.param({"argv": ["echo"]}, "display_name", id="no-display-name"),
    pytest.param(spec_json(display_name=3), "display_name", id="display-name-int"),
    pytest.param(spec_json(language=None), "language", id="language-null"),
    pytest.param(spec_json(env=["A=1"]), "env", id="env-list"),
    pytest.param(spec_json(env={"A": 1}), "env", id="env-int-value"),
    pytest.param(spec_json(interrupt_mode="kill"), "interrupt_mode", id="interrupt-mode"),
    pytest.param(spec_json(kernel_protocol_version=5.3), "kernel_protocol_version", id="proto"),
    pytest.param(spec_json(metadata=[]), "metadata", id="metadata-list"),
]


@pytest.mark.parametrize(("content", "problem"), INVALID)
def test_invalid_spec_is_skipped_with_warning(
    dirs: Dirs, caplog: pytest.LogCaptureFixture, content: Any, problem: str
) -> None:
    path = install(dirs.high, "broken", content) / "kernel.json"
    install(dirs.high, "fine", spec_json())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        specs = find_kernelspecs()
    assert "broken" not in specs
    assert "fine" in specs
    [record] = [r for r in caplog.records if str(path) in r.getMessage()]
    assert record.name == LOGGER
    assert record.levelno == logging.WARNING
    assert problem in record.getMessage()


@pytest.mark.parametrize(("content", "problem"), INVALID)
def test_get_invalid_spec_names_file_and_problem(dirs: Dirs, content: Any, problem: str) -> None:
    path = install(dirs.high, "broken", content) / "kernel.json"
    with pytest.raises(KernelSpecError, match=problem) as caught:
        get_kernelspec("broken")
    assert str(path) in str(caught.value)


def test_invalid_spec_falls_back_to_lower_priority(
    dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    install(dirs.high, "dup", b"{")
    install(dirs.low, "dup", spec_json("low"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert find_kernelspecs()["dup"].display_name == "low"
    assert str(dirs.high / "dup" / "kernel.json") in caplog.text
    assert get_kernelspec("dup").display_name == "low"


def test_unknown_name(dirs: Dirs) -> None:
    with pytest.raises(KernelSpecError, match="no kernelspec named 'nonesuch'"):
        get_kernelspec("nonesuch")
    assert issubclass(KernelSpecError, LookupError)


def test_python_fallback_uses_running_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernelspec, "kernelspec_dirs", lambda: [tmp_path / "empty"])
    spec = python_kernelspec()
    assert spec.name == "python3"
    assert spec.argv == (sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}")
    assert spec.language == "python"
    assert spec.display_name == "Python 3 (ipykernel)"
    assert spec.resource_dir is None
    assert spec.interrupt_mode == "signal"


def test_python_fallback_when_installed_spec_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path, "python3", {"argv": []})
    monkeypatch.setattr(kernelspec, "kernelspec_dirs", lambda: [tmp_path])
    assert python_kernelspec().argv[0] == sys.executable


def test_spec_mappings_are_read_only(dirs: Dirs) -> None:
    install(dirs.high, "echo", spec_json(env={"A": "1"}, metadata={"m": 1}))
    spec = get_kernelspec("echo")
    with pytest.raises(TypeError):
        spec.env["A"] = "2"  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.metadata["m"] = 2  # type: ignore[index]
