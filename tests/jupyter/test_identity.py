"""How the Jupyter Server kernels API names a session and checks a client's token (no kernels)."""

from __future__ import annotations

import json
import uuid

import pytest

from kallichore.api.routes import jupyter_token_matches
from kallichore.errors import KallichoreError
from kallichore.session.model import SessionSpec, Status
from kallichore.session.record import SessionRecord, decode, encode


def test_every_session_gets_its_own_canonical_uuid() -> None:
    first = SessionSpec(session_id="a", argv=["k"])
    second = SessionSpec(session_id="b", argv=["k"])
    assert str(uuid.UUID(first.kernel_id)) == first.kernel_id
    assert first.kernel_id != second.kernel_id


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "6CD3DD09-5B4C-4841-9474-ADB38BC3F7F9", "6cd3dd095b4c48419474adb38bc3f7f9"],
)
def test_a_kernel_id_that_is_not_a_canonical_uuid_is_refused(bad: str) -> None:
    with pytest.raises(KallichoreError, match="invalid kernel id"):
        SessionSpec(session_id="a", argv=["k"], kernel_id=bad)


def test_the_kernel_id_survives_the_record() -> None:
    spec = SessionSpec(session_id="a", argv=["k"])
    record = SessionRecord(
        spec=spec, key="k", created=1.0, status=Status.IDLE, working_directory="/"
    )
    assert decode(json.dumps(encode(record)).encode()).spec.kernel_id == spec.kernel_id


@pytest.mark.parametrize(
    ("authorization", "query", "accepted"),
    [
        ("token T", None, True),
        ("Bearer T", None, True),
        ("bearer  T", None, True),
        (None, "T", True),
        (None, None, False),
        ("token U", None, False),
        ("Basic T", None, False),
        ("token ", None, False),
        (None, "", False),
        ("token T", "U", False),
    ],
)
def test_the_token_as_jupyter_clients_send_it(
    authorization: str | None, query: str | None, accepted: bool
) -> None:
    assert jupyter_token_matches("T", authorization, query) is accepted


def test_without_a_token_any_header_is_let_through() -> None:
    assert jupyter_token_matches(None, "token ", None)
    assert jupyter_token_matches(None, None, None)
