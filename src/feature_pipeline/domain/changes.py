"""What flows through the dataflow: inbound messages, processed document changes, dead letters."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from feature_pipeline.domain.events import Op
from feature_pipeline.domain.features import Chunk, CleanedDocument
from feature_pipeline.domain.types import DataType

#: Namespace of every point id; changing it would orphan every stored point.
POINT_NAMESPACE = uuid.UUID("6f1c5a54-8d7e-4c55-9a2b-3f4c1e0d2b7a")


def document_point_id(data_type: DataType, entry_id: str) -> str:
    """Id of a document's cleaned snapshot and of its sync state."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{data_type.value}:{entry_id}"))


def chunk_point_id(
    data_type: DataType, entry_id: str, model: str, content_hash: str, occurrence: int
) -> str:
    """Id of a chunk: the same text of the same document embedded by the same model keeps its id,
    whatever its position, so an edit elsewhere in the document does not re-embed it.
    `occurrence` tells apart identical chunks within one document."""
    key = f"{data_type.value}:{entry_id}:{model}:{content_hash}:{occurrence}"
    return str(uuid.uuid5(POINT_NAMESPACE, key))


@dataclass(frozen=True)
class InboundMessage:
    """A message body as read from a source, with where it came from (for dead letters) and,
    when the producer stamped it, when it was published (Unix seconds: freshness)."""

    source: str
    body: bytes
    published_at: float | None = None
    #: The producer's own stamp of this message (message-id, else its publish time), if any.
    stamp: str | None = None
    #: The broker delivered it before (a crash or a lost connection put it back).
    redelivered: bool = False
    #: A long document's event queued again by the pipeline for its next turn.
    continued: bool = False


@dataclass(frozen=True)
class DeadLetter:
    """A message that can never be processed, with the reason; it goes to the dead-letter queue."""

    source: str
    body: bytes
    reason: str
    error_type: str
    stamp: str | None = None
    redelivered: bool = False


class DocumentChange(BaseModel):
    """A change event after cleaning and chunking: what the feature store must end up holding."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    op: Op
    type: DataType
    entry_id: str
    ts: int | None = None
    cleaned: CleanedDocument | None = None
    chunks: tuple[Chunk, ...] = ()
    source: str = ""
    #: When its message was published (Unix seconds), if the producer said.
    published_at: float | None = None
    #: Its message's producer stamp (`InboundMessage.stamp`), kept when its event is queued again.
    stamp: str | None = None
    #: Its message's body, unchanged: a change the store refuses is dead-lettered as it came, so
    #: that `dlq replay` can send it again once the cause is fixed.
    body: bytes = Field(default=b"", repr=False)

    @model_validator(mode="after")
    def _consistent(self) -> DocumentChange:
        if (self.op is Op.DELETE) != (self.cleaned is None):
            raise ValueError("a delete has no cleaned document; every other op has one")
        for chunk in self.chunks:
            if chunk.entry_id != self.entry_id or chunk.type is not self.type:
                raise ValueError(f"chunk {chunk.chunk_index} belongs to another document")
        return self

    @property
    def key(self) -> str:
        return f"{self.type.value}:{self.entry_id}"


def chunk_point_ids(change: DocumentChange, model: str) -> list[str]:
    """The point id of each of a change's chunks, in order, as embedded by `model`."""
    seen: Counter[str] = Counter()
    ids = []
    for chunk in change.chunks:
        occurrence = seen[chunk.content_hash]
        seen[chunk.content_hash] += 1
        ids.append(
            chunk_point_id(change.type, change.entry_id, model, chunk.content_hash, occurrence)
        )
    return ids
