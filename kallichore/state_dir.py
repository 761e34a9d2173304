"""The state directory (`--state-dir`): what lets a restarted daemon take up where it left off.

    DIR/            0700, ours alone
      lock          held (flock) by the one daemon using DIR
      token         the bearer token, so that a restarted daemon keeps it (0600)
      sessions/     one record per session, `<session id>.json` (0600; they hold keys)
      runtime/      the kernels' connection files (kept out of the temp directory, where a
                    sweep of what dead daemons left would take them for orphans)

Records are written atomically (temp file, fsync, rename): after a crash at any point a record
is the old one or the new one, never a mix. A record that cannot be read is logged and skipped,
never fatal: one bad file must not keep the daemon or the other sessions from coming back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from kallichore.jupyter.connection import write_json_file
from kallichore.session.record import RecordError, SessionRecord, decode, encode

logger = logging.getLogger(__name__)

TOKEN_FILE = "token"
LOCK_FILE = "lock"
SESSIONS_DIR = "sessions"
RUNTIME_DIR = "runtime"


class StateDirError(Exception):
    """The state directory cannot be used (another user's, or in use by another daemon)."""


class StateDir:
    """An open state directory; see the module docstring. Use `StateDir.open()`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._sessions = path / SESSIONS_DIR
        self.runtime_dir = path / RUNTIME_DIR
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: Path) -> StateDir:
        """Create (0700) or take over `path`, locked against a second daemon."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid != os.getuid():
            raise StateDirError(f"the state directory {path} belongs to another user")
        path.chmod(0o700)
        for directory in (SESSIONS_DIR, RUNTIME_DIR):
            (path / directory).mkdir(mode=0o700, exist_ok=True)
        lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StateDirError(
                f"the state directory {path} is in use by another kallichore"
            ) from None
        state_dir = cls(path, lock_fd)
        state_dir._remove_leftovers()
        return state_dir

    def close(self) -> None:
        """Let another daemon use the directory."""
        os.close(self._lock_fd)

    def save(self, record: SessionRecord) -> None:
        write_json_file(self._record_path(record.spec.session_id), encode(record))

    def remove(self, session_id: str) -> None:
        self._record_path(session_id).unlink(missing_ok=True)

    def load(self) -> list[SessionRecord]:
        """Every readable record, in the order of their file names."""
        records = []
        for path in sorted(self._sessions.glob("*.json")):
            try:
                record = decode(path.read_bytes())
            except (OSError, RecordError) as exc:
                logger.error("state dir: skipping the session record %s: %s", path, exc)
                continue
            if f"{record.spec.session_id}.json" != path.name:
                logger.error(
                    "state dir: skipping the session record %s: it is the record of %s",
                    path,
                    record.spec.session_id,
                )
                continue
            records.append(record)
        return records

    def save_token(self, token: str | None) -> None:
        """Keep `token` for the next daemon (None: it runs without one)."""
        path = self.path / TOKEN_FILE
        if token is None:
            path.unlink(missing_ok=True)
        else:
            write_json_file(path, {"bearer_token": token})

    def _record_path(self, session_id: str) -> Path:
        # Session ids are validated to a file-name alphabet (`validate_session_id`).
        return self._sessions / f"{session_id}.json"

    def _remove_leftovers(self) -> None:
        """Temp files of writes a crash interrupted (their target is intact)."""
        for directory in (self.path, self._sessions):
            for leftover in directory.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)


def saved_token(path: Path) -> str | None:
    """The token the last daemon with state directory `path` served, if any."""
    try:
        document = json.loads((path / TOKEN_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.error("state dir: cannot read the saved token: %s", exc)
        return None
    token = document.get("bearer_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        logger.error("state dir: no bearer_token in %s", path / TOKEN_FILE)
        return None
    return token
