"""Change events: the two accepted message shapes, parsed into one `ChangeEvent`.

1. The course's flat shape: the warehouse document itself (``_id`` removed) plus ``type`` and
   ``entry_id``. It means "upsert this document" and carries no version.
2. Our envelope: ``{"op", "type", "entry_id", "document", "ts"}``.
"""

from __future__ import annotations

import json
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


class ChangeEvent(BaseModel):
    """One change of one warehouse document. `document` is the whole new document (not a diff)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Op
    type: DataType
    entry_id: str = Field(min_length=1)
    document: dict[str, Any] | None = None
    #: Producer version, monotonic per document (MongoDB clusterTime, PostgreSQL LSN, ...).
    #: At most a signed 64-bit integer: the feature store keeps it as an integer payload.
    ts: int | None = Field(default=None, ge=0, le=2**63 - 1)

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


def parse_event(body: bytes | str, max_bytes: int | None = None) -> ChangeEvent:
    """Parse a message body in either accepted shape; raise `InvalidEvent` saying what is wrong,
    or `DocumentTooLarge` for a body over `max_bytes` (checked before the JSON is read)."""
    if max_bytes is not None:
        size = len(body) if isinstance(body, bytes) else len(body.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise DocumentTooLarge(
                f"message body is {size:,} bytes, over MAX_DOCUMENT_BYTES ({max_bytes:,})"
            )
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"body must be a JSON object, got {type(data).__name__}")
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


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field path: 'document.content.text: ...'."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
