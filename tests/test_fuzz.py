"""The fuzz suite: whatever a client or a kernel sends, the daemon answers a clear error (never
an undocumented 5xx), logs no traceback and goes on serving everybody else.

- schemathesis over the daemon's own `/openapi.json`, with and without the token;
- hypothesis over the JSON bodies of the routes, over channels frames (the Kallichore framing's
  parse path, through a real WebSocket) and over what a hostile kernel sends on its ZeroMQ
  sockets (through the session's real receive path).

Quick with the other tests; `nox -s fuzz` runs it in full (see tests/suites.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from kallichore.jupyter.wire import DELIMITER, Channel, Signer, dumps
from tests.conftest import TIMEOUT, TOKEN, daemon, is_reply, new_session_body, served_client
from tests.hostile_kernel import HostileKernel, served_hostile_kernel
from tests.raw_channels import RawChannels
from tests.suites import (
    FULL,
    assert_no_logged_exception,
    assert_no_traceback,
    budget,
    fuzz_settings,
    refusal_status,
)

# A full run's examples can take longer than the default timeout of one test.
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(budget(180, 3600))]

ROOT = Path(__file__).resolve().parent.parent

# -- schemathesis over /openapi.json ---------------------------------------------------------


def schemathesis_command() -> list[str]:
    st_path = shutil.which("st", path=str(Path(sys.executable).parent))
    if st_path is None:
        pytest.skip("schemathesis is not installed (it is in the test extras)")
    return [st_path]


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "anonymous"])
async def test_schemathesis_finds_no_undocumented_server_error(
    tmp_path: Path, with_token: bool
) -> None:
    command = schemathesis_command()
    async with daemon(tmp_path, "--transport", "tcp", "--port", "0") as d:
        args = [
            *command,
            "run",
            f"{d.connection['base_path']}/openapi.json",
            "--checks",
            "no_undocumented_server_error",
            # Shutting the daemon down is what /shutdown is for.
            "--exclude-path",
            "/shutdown",
            "--max-examples",
            str(budget(3, 100)),
            "--request-timeout",
            "30",
            "--no-color",
            "--workers",
            "2",
        ]
        if not FULL:
            # The coverage phase alone: deterministic values at and past every boundary.
            args += ["--seed", "10", "--phases", "coverage"]
        if with_token:
            args += ["--header", f"Authorization: Bearer {d.token}"]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        run = await trio.run_process(
            args, capture_stdout=True, stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=False
        )
        async with d.client() as client:
            assert (await client.status())["sessions"] is not None
    assert run.returncode == 0, run.stdout.decode(errors="replace")[-6000:]
    assert_no_traceback(d.log)


@pytest.fixture(autouse=True)
def no_logged_exception(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """In-process servers log a crash with its exception: none may be logged, in any example."""
    caplog.set_level(logging.WARNING)
    yield
    assert_no_logged_exception(caplog.records)


# -- JSON bodies -----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """A body for one of the routes: its own fields with hostile values, or plain garbage."""
    fields = draw(
        st.sampled_from(
            [
                new_session_body("fuzzed"),
                # Not log_level: it is the test process's own (schemathesis tries it).
                {"resource_sample_interval_ms": 1000},
                {"process_id": 1},
                {
                    "control_port": 1,
                    "shell_port": 2,
                    "stdin_port": 3,
                    "hb_port": 4,
                    "iopub_port": 5,
                    "key": "k",
                    "signature_scheme": "hmac-sha256",
                    "transport": "tcp",
                    "ip": "127.0.0.1",
                },
                {"env": [], "working_directory": ""},
            ]
        )
    )
    kind = draw(st.sampled_from(["field", "garbage", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "garbage":
        return dumps(draw(json_values))
    name = draw(st.sampled_from(sorted(fields)))
    value = draw(json_values | st.sampled_from(["\x00", "\ud800", 10**30, -(2**63), 1e308]))
    body = dumps({**fields, name: value})
    # Integers past Python's 4,300-digit limit can only be written as text.
    if draw(st.booleans()) and isinstance(value, int) and not isinstance(value, bool):
        body = body.replace(str(value).encode(), b"9" * 5000)
    return body


ROUTES_WITH_BODIES = [
    ("PUT", "/sessions"),
    ("POST", "/sessions/fuzzed/restart"),
    ("PUT", "/sessions/fuzzed/adopt"),
    ("POST", "/server_configuration"),
    ("POST", "/client_heartbeat"),
]


@fuzz_settings
@given(route=st.sampled_from(ROUTES_WITH_BODIES), body=hostile_bodies())
@example(route=("PUT", "/sessions"), body=b'{"session_id": ' + b"9" * 5000 + b"}")
async def test_json_bodies_get_clear_answers(
    tmp_path: Path, route: tuple[str, str], body: bytes
) -> None:
    async with served_client(tmp_path / "runtime") as (client, _):
        await client.create_session(**new_session_body("fuzzed", connection_timeout=1))
        await refusal_status(client.http, *route, body)
        assert (await client.http.get("/status")).status_code == 200


# -- channels frames -------------------------------------------------------------------------


def message_frame(**changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "header": {"msg_id": "m1", "msg_type": "kernel_info_request"},
        "parent_header": None,
        "channel": "shell",
        "content": {},
        "metadata": {},
        "buffers": [],
    }
    frame.update(changes)
    return frame


@st.composite
def channel_texts(draw: st.DrawFn) -> str:
    """A text frame from a client: a message with one hostile field, or any text at all."""
    if draw(st.booleans()):
        return draw(st.text(max_size=300))
    name = draw(st.sampled_from(sorted(message_frame())))
    return json.dumps(message_frame(**{name: draw(json_values)}))


async def assert_still_answered(channels: RawChannels) -> None:
    """The connection still carries a request to the kernel and its reply."""
    await channels.send_message(
        message_frame(header={"msg_id": "probe", "msg_type": "kernel_info_request"})
    )
    with trio.fail_after(TIMEOUT):
        while True:
            frame = await channels.receive()
            assert frame is not None, "the server closed the connection"
            if is_reply(frame, "probe", "kernel_info_reply"):
                return


@fuzz_settings
@given(text=channel_texts())
@example(text="")
@example(
    text='{"header": {"msg_id": "a", "msg_type": "x"}, "channel": "shell", "content": {"n": '
    + "9" * 5000
    + "}}"
)
async def test_channels_frames_are_refused_without_harm(tmp_path: Path, text: str) -> None:
    async with served_hostile_kernel(tmp_path / "runtime") as (_, port, _):
        channels = await RawChannels.connect(port, "hostile", TOKEN)
        try:
            await channels.send_text(text)
            await assert_still_answered(channels)
        finally:
            await channels.close()


@fuzz_settings
@given(payload=st.binary(min_size=1, max_size=300).filter(lambda b: not _is_utf8(b)))
async def test_a_text_frame_that_is_not_utf8_leaves_the_session_usable(
    tmp_path: Path, payload: bytes
) -> None:
    async with served_hostile_kernel(tmp_path / "runtime") as (_, port, _):
        channels = await RawChannels.connect(port, "hostile", TOKEN)
        await channels.send_bytes_as_text(payload)
        # The WebSocket protocol closes such a connection (1007); the session is unharmed.
        with trio.fail_after(TIMEOUT):
            while await channels.receive() is not None:
                pass
        await channels.close()
        channels = await RawChannels.connect(port, "hostile", TOKEN)
        try:
            await assert_still_answered(channels)
        finally:
            await channels.close()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# -- ZeroMQ frames from a hostile kernel -----------------------------------------------------

MSG_TYPES = [
    "status",
    "stream",
    "execute_reply",
    "execute_input",
    "kernel_info_reply",
    "input_request",
    "comm_open",
    "shutdown_reply",
    "display_data",
    "error",
]


@st.composite
def kernel_frames(draw: st.DrawFn, kernel_key: bytes) -> list[bytes]:
    """A multipart message as a hostile kernel might send it: correctly signed garbage
    (the parser's own work starts past the signature), a bad signature, huge or non-UTF-8
    frames, too few frames or no delimiter."""
    raw = st.binary(max_size=64)
    json_bytes = json_values.map(dumps)
    header = st.fixed_dictionaries(
        {"msg_id": st.text(max_size=8) | json_values, "msg_type": st.sampled_from(MSG_TYPES)}
    ).map(dumps)
    parts = [
        draw(header | json_bytes | raw),
        draw(st.just(b"{}") | header | json_bytes | raw),
        draw(st.just(b"{}") | json_bytes | raw),
        draw(json_bytes | raw | st.just(b'{"execution_state": "idle"}')),
    ]
    signature = draw(
        st.just(Signer(kernel_key).sign(parts)) | st.sampled_from([b"", b"0" * 64]) | raw
    )
    frames = [DELIMITER, signature, *parts, *draw(st.lists(raw, max_size=2))]
    cut = draw(st.sampled_from([None, 0, 1, 3]))
    return frames if cut is None else frames[cut:]


@fuzz_settings
@given(data=st.data())
@example(data=None)
async def test_a_hostile_kernel_cannot_break_its_session(
    tmp_path: Path, data: st.DataObject | None
) -> None:
    async with (
        served_hostile_kernel(tmp_path / "runtime") as (client, _, kernel),
        client.channels("hostile") as channels,
    ):
        assert await kernel.published(channels, "ready")
        if data is None:
            # Huge and non-UTF-8 frames, correctly signed.
            batches = [huge_non_utf8_message(kernel)]
        else:
            batches = data.draw(st.lists(kernel_frames(kernel.signer.key), min_size=1, max_size=4))
        for frames in batches:
            await kernel.send_raw(Channel.IOPUB, frames)
            if kernel.peer is not None:
                await kernel.send_raw(Channel.SHELL, [kernel.peer, *frames])
        assert await kernel.published(channels, "still here")
        assert (await client.http.get("/status")).status_code == 200


def huge_non_utf8_message(kernel: HostileKernel) -> list[bytes]:
    parts = [
        dumps({"msg_id": "huge", "msg_type": "stream"}),
        b"{}",
        b"{}",
        b'{"name": "stdout", "text": "' + b"\xff\xfe" * budget(2**20, 2**23) + b'"}',
    ]
    return [DELIMITER, kernel.signer.sign(parts), *parts, b"\x80" * 2**20]
