"""Session records and the state directory, without kernels."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from kallichore.jupyter.connection import ConnectionInfo
from kallichore.session.model import InterruptMode, SessionSpec, Status, VarAction, VarActionType
from kallichore.session.record import (
    FORMAT,
    ProcessIdentity,
    RecordError,
    SessionRecord,
    decode,
    encode,
)
from kallichore.state_dir import StateDir, saved_token

RECORD = SessionRecord(
    spec=SessionSpec(
        session_id="python-1",
        argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        env=[VarAction(VarActionType.APPEND, "PATH", ":/opt/bin")],
        interrupt_mode=InterruptMode.SIGNAL,
        notebook_uri="file:///n.ipynb",
    ),
    key="0123abcd",
    created=1_700_000_000.25,
    status=Status.BUSY,
    working_directory="/home/u",
    connection=ConnectionInfo.on_ports([9001, 9002, 9003, 9004, 9005], "0123abcd"),
    process=ProcessIdentity(4242, 1_700_000_001.5),
)


def as_bytes(record: SessionRecord) -> bytes:
    return json.dumps(encode(record)).encode()


@pytest.mark.parametrize(
    "record",
    [RECORD, SessionRecord(RECORD.spec, "k", 0.0, Status.UNINITIALIZED, "")],
    ids=["running", "never started"],
)
def test_round_trip(record: SessionRecord) -> None:
    assert decode(as_bytes(record)) == record


def test_the_format_is_written() -> None:
    assert encode(RECORD)["format"] == FORMAT


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not JSON"),
        (as_bytes(RECORD)[:-20], "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"format": 99}', "record format 99"),
        (as_bytes(RECORD).replace(b'"key": "0123abcd", ', b""), "record.key"),
        (as_bytes(RECORD).replace(b'"pid": 4242', b'"pid": "pid"'), "record.process.pid"),
        (as_bytes(RECORD).replace(b'"busy"', b'"sleepy"'), "record.status"),
        (as_bytes(RECORD).replace(b'"hb_port": 9004', b'"hb_port": 0'), "hb_port"),
        (as_bytes(RECORD).replace(b'"python-1"', b'"../escape"'), "invalid session id"),
        (as_bytes(RECORD).replace(b'"format": 1', b'"format": 1, "extra": 1'), "extra"),
    ],
    ids=[
        "empty",
        "cut short",
        "not UTF-8",
        "array",
        "other format",
        "no key",
        "pid not a number",
        "unknown status",
        "bad port",
        "bad session id",
        "unknown field",
    ],
)
def test_a_corrupt_record_says_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(RecordError, match=problem):
        decode(data)


def test_records_are_private_and_removed(tmp_path: Path) -> None:
    state_dir = StateDir.open(tmp_path / "state")
    state_dir.save(RECORD)
    path = tmp_path / "state" / "sessions" / "python-1.json"
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert state_dir.load() == [RECORD]
    state_dir.remove("python-1")
    assert state_dir.load() == []
    state_dir.close()


def test_an_open_directory_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o755)
    StateDir.open(tmp_path / "state").close()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_bad_records_are_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = StateDir.open(tmp_path)
    state_dir.save(RECORD)
    sessions = tmp_path / "sessions"
    (sessions / "cut.json").write_bytes(as_bytes(RECORD)[:40])
    (sessions / "other-name.json").write_bytes(as_bytes(RECORD))
    with caplog.at_level(logging.ERROR):
        assert state_dir.load() == [RECORD]
    messages = [r.getMessage() for r in caplog.records]
    assert any("cut.json: not JSON" in m for m in messages)
    assert any("other-name.json: it is the record of python-1" in m for m in messages)
    # Never a key in the log.
    assert not any(RECORD.key in m for m in messages)
    state_dir.close()


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    StateDir.open(tmp_path).close()
    leftover = tmp_path / "sessions" / ".python-1.json.abc123.tmp"
    leftover.write_text("{")
    StateDir.open(tmp_path).close()
    assert not leftover.exists()


def test_the_token_is_kept_for_the_next_daemon(tmp_path: Path) -> None:
    assert saved_token(tmp_path) is None
    state_dir = StateDir.open(tmp_path)
    state_dir.save_token("secret-1")
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert saved_token(tmp_path) == "secret-1"
    state_dir.save_token(None)
    assert saved_token(tmp_path) is None
    (tmp_path / "token").write_text("{")
    assert saved_token(tmp_path) is None
    state_dir.close()
