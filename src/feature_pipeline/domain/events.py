"""Change events: the two accepted message shapes, parsed into one `ChangeEvent`.

1. The course's flat shape: the warehouse document itself (``_id`` removed) plus ``type`` and
   ``entry_id``. It means "upsert this document" and carries no version.
2. Our envelope: ``{"op", "type", "entry_id", "document", "ts"}``.

Parsing is strict where leniency would hurt: `ts` must be a JSON integer, JSON nested deeper than
`MAX_JSON_DEPTH` or with an integer beyond Python's digit limit is an invalid event (never a
handler crash), and lone surrogates (``"\\ud800"``, valid JSON but not encodable as UTF-8) are
replaced by U+FFFD so that nothing downstream (store payloads, the server's JSON) chokes on them.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feature_pipeline.domain.types import DataType


class Op(StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"


class InvalidEvent(ValueError):
    """The message can never be processed as it is (poison): it goes to the dead-letter queue."""


class DocumentTooLarge(ValueError):
    """The message is beyond a size limit (MAX_DOCUMENT_BYTES, MAX_CHUNKS_PER_DOCUMENT): it is
    dead-lettered as `too_large`, with the sizes, instead of holding the worker for hours."""


def event_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """What an event carries of a warehouse document: every field but `_id`, which travels as
    the event's `entry_id`."""
    return {k: v for k, v in document.items() if k != "_id"}


class ChangeEvent(BaseModel):
    """One change of one warehouse document. `document` is the whole new document (not a diff)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Op
    type: DataType
    entry_id: str = Field(min_length=1)
    document: dict[str, Any] | None = None
    #: Producer version, monotonic per document (MongoDB clusterTime, PostgreSQL LSN, ...).
    #: At most a signed 64-bit integer: the feature store keeps it as an integer payload.
    #: Strict: "123", true and 1.0 are refused rather than coerced (a producer bug to surface).
    ts: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)

    @model_validator(mode="after")
    def _document_matches_op(self) -> ChangeEvent:
        if self.op is Op.DELETE and self.document is not None:
            raise ValueError("a delete event carries no 'document'")
        if self.op is not Op.DELETE and self.document is None:
            raise ValueError(f"an {self.op.value} event needs a 'document' object")
        return self

    @property
    def is_delete(self) -> bool:
        return self.op is Op.DELETE

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


ENVELOPE_KEYS = frozenset({"op", "type", "entry_id", "document", "ts"})

#: Deepest JSON nesting accepted (the message object itself is level 1); real documents stay
#: far below it, and deeper input would only serve to exhaust the stack of some consumer.
MAX_JSON_DEPTH = 64

_SURROGATES = re.compile("[\ud800-\udfff]")


class _TooDeep(Exception):
    pass


def parse_event(body: bytes | str, max_bytes: int | None = None) -> ChangeEvent:
    """Parse a message body in either accepted shape; raise `InvalidEvent` saying what is wrong,
    or `DocumentTooLarge` for a body over `max_bytes` (checked before the JSON is read)."""
    if max_bytes is not None:
        size = len(body) if isinstance(body, bytes) else len(body.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise DocumentTooLarge(
                f"message body is {size:,} bytes, over MAX_DOCUMENT_BYTES ({max_bytes:,})"
            )
    text = decode_body(body)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"body is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder recurses per level: ~1,000 levels exhaust the stack
        raise InvalidEvent(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # an integer literal beyond Python's digit limit, or similar
        if "integer string conversion" in str(exc):
            limit = sys.get_int_max_str_digits()
            raise InvalidEvent(f"body has an integer longer than {limit} digits") from None
        raise InvalidEvent(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"body must be a JSON object, got {type(data).__name__}")
    if isinstance(data.get("entry_id"), str) and _SURROGATES.search(data["entry_id"]):
        # Replacing it could merge two documents' identities: refuse instead.
        raise InvalidEvent("entry_id contains a lone surrogate (not encodable as UTF-8)")
    try:
        data = _sanitised(data, 1)
    except _TooDeep:
        raise InvalidEvent(f"body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    if "op" in data:
        unknown = set(data) - ENVELOPE_KEYS
        if unknown:
            raise InvalidEvent(f"envelope has unknown keys {sorted(unknown)}")
        fields = data
    else:
        document = {k: v for k, v in data.items() if k not in ("type", "entry_id", "_id")}
        fields = {
            "op": Op.INSERT.value,
            "type": data.get("type"),
            "entry_id": data.get("entry_id"),
            "document": document,
        }
    try:
        return ChangeEvent.model_validate(fields)
    except ValidationError as exc:
        raise InvalidEvent(describe_validation_error(exc)) from None


def decode_body(body: bytes | str) -> str:
    """A body's text, strictly UTF-8, or `InvalidEvent` saying which byte is wrong.

    Decoded here rather than by `json.loads`, which guesses UTF-16 or UTF-32 from NUL bytes and
    then reports that codec's error instead of the real problem.
    """
    if isinstance(body, str):
        return body
    nul = body.find(b"\x00")
    if nul >= 0:
        raise InvalidEvent(f"body has a NUL byte at byte {nul}: not JSON text")
    try:
        return body.decode("utf-8-sig")  # a leading BOM is not an error (json.loads allows it)
    except UnicodeDecodeError as exc:
        raise InvalidEvent(
            f"body is not UTF-8 at byte {exc.start} (0x{body[exc.start]:02x})"
        ) from None


def replace_surrogates(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD: encodable as UTF-8 and JSON."""
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return text
    return _SURROGATES.sub("\ufffd", text)


def _sanitised(value: Any, depth: int) -> Any:
    """`value` with lone surrogates replaced in every string (keys too); `_TooDeep` past
    `MAX_JSON_DEPTH` (checked before recursing, so the recursion itself stays shallow)."""
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, dict | list):
        if depth > MAX_JSON_DEPTH:
            raise _TooDeep
        if isinstance(value, list):
            return [_sanitised(item, depth + 1) for item in value]
        return {replace_surrogates(k): _sanitised(v, depth + 1) for k, v in value.items()}
    return value


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path: 'document.content.text: ...'."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
