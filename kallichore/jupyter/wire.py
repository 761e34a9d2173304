"""The Jupyter wire protocol as pure functions: multipart frames <-> `Message`.

A message on a ZeroMQ socket is::

    [identities...] b"<IDS|MSG>" signature header parent_header metadata content [buffers...]

The signature is the hex HMAC-SHA256 (keyed with the connection file's ``key``) over the four
JSON frames. Only the two headers are parsed on the way in: metadata and content stay as the
bytes the kernel sent until somebody asks for them, because re-parsing every message's content
is the main cost of a proxy that only forwards it.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol

import attrs
import orjson


class _Mac(Protocol):
    """A keyed HMAC: what signing needs of it."""

    def copy(self) -> _Mac: ...

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def _keyed_hmac(key: bytes) -> _Mac:
    """OpenSSL's HMAC object itself where there is one, not the hmac module's Python wrapper
    around it: copy, update and hexdigest are then C calls only (half the cost of signing a
    small message); the hmac module in a Python built without OpenSSL."""
    try:
        from _hashlib import hmac_new  # noqa: PLC0415 (private, and may be missing)
    except ImportError:
        return hmac.new(key, digestmod="sha256")
    return hmac_new(key, digestmod="sha256")


DELIMITER = b"<IDS|MSG>"
SIGNATURE_SCHEME = "hmac-sha256"
PROTOCOL_VERSION = "5.3"

JSONObject = dict[str, Any]


class WireError(ValueError):
    """Frames that are not a valid (or not a correctly signed) Jupyter message."""


class Channel(StrEnum):
    """The kernel's ZeroMQ channels, named as in the connection file and the messaging spec."""

    SHELL = "shell"
    CONTROL = "control"
    STDIN = "stdin"
    IOPUB = "iopub"
    HEARTBEAT = "hb"


def dumps(value: Any) -> bytes:
    """Compact JSON, as kernels and jupyter_client write it.

    orjson on the hot path (a tenth of the standard library's cost per header); the standard
    library for what orjson refuses: integers past 64 bits, keys that are not strings, and lone
    surrogates.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # A lone surrogate (valid in JSON as an escape like \ud800) has no UTF-8 form: keep it
        # escaped rather than fail, since a peer may send one and expect it back.
        return json.dumps(value, separators=(",", ":")).encode()


# Every digit made "0", every other byte a space: a run of 19 digits is then a plain substring,
# which `bytes.translate` and a substring search find at C speed (a regular expression costs
# ~20 ns a byte: 2 us a header, 1.4 ms for 64 KiB of output).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_NINETEEN_DIGITS = b"0" * 19


def _has_long_number(data: bytes) -> bool:
    """Whether `data` holds a run of 19 ASCII digits."""
    return _NINETEEN_DIGITS in data.translate(_DIGITS_AS_ZEROS)


def loads(data: bytes | str) -> Any:
    """Parse JSON: orjson, or the standard library for what orjson refuses but a peer may send
    (integers past 64 bits, lone surrogates, NaN, deep nesting, UTF-16), or to report the
    error."""
    # orjson reads an integer past 64 bits as a float, silently: text with a run of 19 digits
    # (every such integer has one) goes to the standard library, which keeps it exact.
    encoded = data if isinstance(data, bytes) else data.encode(errors="surrogatepass")
    if not _has_long_number(encoded):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def utc_now() -> str:
    """The current time as the messaging spec's ISO 8601 date, in UTC with millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_msg_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen
class Signer:
    """Signs and verifies messages with one connection's key.

    An empty key means signing is off (the messaging spec allows it): messages are sent with an
    empty signature and no signature is checked. With a key, a missing or wrong signature is an
    error; the comparison is constant-time.
    """

    key: bytes
    scheme: str = SIGNATURE_SCHEME
    # Keyed once; every message copies it, which is cheaper than keying HMAC anew.
    _keyed: _Mac = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.scheme != SIGNATURE_SCHEME:
            raise WireError(f"unsupported signature scheme {self.scheme!r}")
        object.__setattr__(self, "_keyed", _keyed_hmac(self.key))

    def sign(self, parts: Sequence[bytes]) -> bytes:
        if not self.key:
            return b""
        mac = self._keyed.copy()
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def verify(self, signature: bytes, parts: Sequence[bytes]) -> None:
        if not self.key:
            return
        if not signature:
            raise WireError("message is not signed")
        if not hmac.compare_digest(signature, self.sign(parts)):
            raise WireError("message signature does not match")


@attrs.frozen
class Message:
    """One Jupyter message. Headers are parsed; metadata and content are kept as JSON bytes."""

    header: JSONObject
    parent_header: JSONObject
    metadata_json: bytes = b"{}"
    content_json: bytes = b"{}"
    buffers: Sequence[bytes] = ()
    # The headers as the kernel sent them (None for a message built here): the Jupyter
    # channels forward these bytes instead of dumping the parsed headers again per client.
    header_json: bytes | None = attrs.field(default=None, eq=False, repr=False)
    parent_json: bytes | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def msg_id(self) -> str:
        return str(self.header["msg_id"])

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])

    @property
    def parent_msg_id(self) -> str | None:
        value = self.parent_header.get("msg_id")
        return str(value) if value is not None else None

    @property
    def parent_msg_type(self) -> str | None:
        value = self.parent_header.get("msg_type")
        return str(value) if value is not None else None

    @cached_property
    def content(self) -> JSONObject:
        """The content, parsed on first use. Raises `WireError` if it is not a JSON object."""
        return _json_object(self.content_json, "content")

    @cached_property
    def metadata(self) -> JSONObject:
        return _json_object(self.metadata_json, "metadata")

    @classmethod
    def build(
        cls,
        msg_type: str,
        content: Mapping[str, Any] | bytes | None = None,
        *,
        session: str,
        username: str = "kallichore",
        version: str = PROTOCOL_VERSION,
        msg_id: str | None = None,
        parent: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | bytes | None = None,
        buffers: Sequence[bytes] = (),
    ) -> Message:
        """A new message with a fresh header; content and metadata may be given pre-serialised."""
        header = {
            "msg_id": msg_id or new_msg_id(),
            "msg_type": msg_type,
            "session": session,
            "username": username,
            "date": utc_now(),
            "version": version,
        }
        return cls(
            header=header,
            parent_header=dict(parent) if parent else {},
            metadata_json=_as_json(metadata),
            content_json=_as_json(content),
            buffers=tuple(buffers),
        )


def serialize(message: Message, signer: Signer, identities: Sequence[bytes] = ()) -> list[bytes]:
    """The multipart frames of `message`, signed, preceded by ZeroMQ routing identities."""
    parts = [
        dumps(message.header),
        dumps(message.parent_header),
        message.metadata_json,
        message.content_json,
    ]
    return [*identities, DELIMITER, signer.sign(parts), *parts, *message.buffers]


def deserialize(frames: Sequence[bytes], signer: Signer) -> tuple[list[bytes], Message]:
    """Split, verify and parse received frames into (identities, message).

    Raises `WireError` for anything that is not a well-formed message signed with our key.
    """
    try:
        split = list(frames).index(DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    if len(frames) < split + 6:
        raise WireError(
            f"expected at least 5 frames after the delimiter, got {len(frames) - split - 1}"
        )
    # map(bytes, ...) rather than a generator: no Python frame per part (six per message).
    signature, header, parent, metadata, content = map(bytes, frames[split + 1 : split + 6])
    signer.verify(signature, (header, parent, metadata, content))
    parsed_header = _json_object(header, "header")
    for key in ("msg_id", "msg_type"):
        if not isinstance(parsed_header.get(key), str):
            raise WireError(f"header has no string {key!r}")
    # Kernels send an empty object, or occasionally nothing at all, for "no parent".
    parsed_parent = _json_object(parent, "parent_header") if len(parent) > 2 else {}
    return (
        list(map(bytes, frames[:split])),
        Message(
            header=parsed_header,
            parent_header=parsed_parent,
            metadata_json=metadata,
            content_json=content,
            buffers=tuple(map(bytes, frames[split + 6 :])),
            header_json=header,
            parent_json=parent,
        ),
    )


def _as_json(value: Mapping[str, Any] | bytes | None) -> bytes:
    if value is None:
        return b"{}"
    if isinstance(value, bytes):
        return value
    return dumps(value)


def check_spliceable(message: Message) -> None:
    """Raise `WireError` unless the message's metadata and content are JSON objects.

    For what is forwarded to clients: those bytes are spliced, unparsed, into every client's
    frame, where anything else would break the frame (and the client reading it). The parse is
    thrown away; `deserialize` itself stays lazy for those who never look.
    """
    _check_json_object(message.metadata_json, "metadata")
    _check_json_object(message.content_json, "content")


def _check_json_object(data: bytes, what: str) -> None:
    """Raise `WireError` unless `data` reads as a JSON object once invalid UTF-8 is replaced,
    as the client's text frame replaces it. Only validity counts here, so orjson's reading of
    huge integers does not matter, and the standard library sees only what orjson refuses."""
    if data == b"{}":
        return
    if not _is_json_object(data):
        replaced = data.decode(errors="replace").encode()
        if replaced == data or not _is_json_object(replaced):
            raise WireError(f"{what} is not a JSON object")


def _is_json_object(data: bytes) -> bool:
    try:
        return type(orjson.loads(data)) is dict
    except orjson.JSONDecodeError:
        pass
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


def _json_object(data: bytes, what: str) -> JSONObject:
    try:
        value = loads(data)
    except ValueError as exc:
        # Also covers integers too long for Python to convert, which are not JSONDecodeErrors.
        raise WireError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise WireError(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} is not a JSON object")
    return value
