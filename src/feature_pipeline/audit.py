"""The drift audit: does the store equal what the warehouse holds now? And the events that fix it.

Three passes per data type, each a page at a time (memory bounded by a page):

1. warehouse -> store: every warehouse document is processed exactly as the pipeline would
   (parse, clean, chunk; no model) and compared with its sync state and cleaned snapshot, read
   by id: `missing`, `outdated` (snapshot or chunk list differ), `chunks_missing` (the state
   lists chunks that are not stored), `unprocessable` (the pipeline would dead-letter it);
2. store -> warehouse: every cleaned snapshot whose document the warehouse no longer has:
   `extra`;
3. chunks: every stored chunk that its document's sync state does not list: `orphan_chunk`.

The warehouse has no per-row version, so "older than the warehouse" is judged by content: the
stored snapshot and chunk list must be exactly what the warehouse's document makes now.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from feature_pipeline.connectors.qdrant.store import (
    SYNC_STATE_COLLECTION,
    PointReader,
    Record,
    SyncState,
    sync_states_of,
)
from feature_pipeline.connectors.warehouse import WarehouseReader
from feature_pipeline.domain.changes import (
    DocumentChange,
    InboundMessage,
    chunk_point_ids,
    document_point_id,
)
from feature_pipeline.domain.events import ChangeEvent, Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor

#: Documents (or points) read per page.
PAGE_SIZE = 500


class Drift(StrEnum):
    MISSING = "missing"
    EXTRA = "extra"
    OUTDATED = "outdated"
    CHUNKS_MISSING = "chunks_missing"
    ORPHAN_CHUNK = "orphan_chunk"
    UNPROCESSABLE = "unprocessable"


@dataclass(frozen=True)
class Finding:
    """One difference between the warehouse and the store."""

    drift: Drift
    type: DataType
    entry_id: str
    detail: str = ""
    #: The chunk's point id (orphan chunks).
    point_id: str | None = None
    #: The warehouse's document (what a repair republishes), when it has one.
    document: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("document")
        return {**row, "drift": self.drift.value, "type": self.type.value}

    def repair_event(self) -> ChangeEvent | None:
        """The event that makes the pipeline fix this, if an event can: the warehouse's
        document again, or a delete. Unversioned, so it applies whatever version is stored and
        keeps that version for later events."""
        if self.drift is Drift.EXTRA:
            return ChangeEvent(op=Op.DELETE, type=self.type, entry_id=self.entry_id)
        if self.drift in (Drift.MISSING, Drift.OUTDATED, Drift.CHUNKS_MISSING):
            return ChangeEvent(
                op=Op.REPLACE, type=self.type, entry_id=self.entry_id, document=self.document
            )
        return None


class Auditor:
    """Compares one warehouse with one store (or the running pipeline's view of it)."""

    def __init__(
        self,
        store: PointReader,
        processor: DocumentProcessor,
        model_for: Callable[[DataType], str],
        collections: Collection[str],
        page_size: int = PAGE_SIZE,
    ) -> None:
        """`collections`: those the store has (a collection not made yet holds nothing)."""
        self._store = store
        self._collections = frozenset(collections)
        self._processor = processor
        self._model_for = model_for
        self._page_size = page_size

    def findings(self, warehouse: WarehouseReader) -> Iterator[Finding]:
        for data_type in warehouse.data_types():
            yield from self._warehouse_to_store(warehouse, data_type)
            yield from self._store_to_warehouse(warehouse, data_type)
            yield from self._orphan_chunks(data_type)

    # -- pass 1 ------------------------------------------------------------------------------
    def _warehouse_to_store(
        self, warehouse: WarehouseReader, data_type: DataType
    ) -> Iterator[Finding]:
        model = self._model_for(data_type)
        for page in warehouse.pages(data_type, self._page_size):
            expected: dict[str, tuple[DocumentChange, dict[str, Any]]] = {}
            for entry_id, document in page:
                outcome = self._process(data_type, entry_id, document)
                if isinstance(outcome, str):
                    yield Finding(Drift.UNPROCESSABLE, data_type, entry_id, detail=outcome)
                else:
                    expected[document_point_id(data_type, entry_id)] = (outcome, document)
            ids = list(expected)
            states = self._states(ids)
            snapshots = {p.id: p.payload for p in self._retrieve(data_type.cleaned_collection, ids)}
            listed: dict[str, tuple[DocumentChange, dict[str, Any]]] = {}
            for point_id, (change, document) in expected.items():
                state, snapshot = states.get(point_id), snapshots.get(point_id)
                finding = _compare(change, document, state, snapshot, model)
                if finding is not None:
                    yield finding
                else:
                    listed[point_id] = (change, document)
            yield from self._missing_chunks(data_type, listed, states)

    def _process(self, data_type: DataType, entry_id: str, document: Any) -> DocumentChange | str:
        """What the pipeline makes of the document, or why it would dead-letter it."""
        body = {"op": Op.REPLACE.value, "type": data_type.value, "entry_id": entry_id}
        body["document"] = document
        outcome = self._processor.process(
            InboundMessage(source="audit", body=json.dumps(body).encode())
        )
        if isinstance(outcome, DocumentChange):
            return outcome
        return f"{outcome.error_type}: {outcome.reason}"

    def _missing_chunks(
        self,
        data_type: DataType,
        listed: dict[str, tuple[DocumentChange, dict[str, Any]]],
        states: dict[str, SyncState],
    ) -> Iterator[Finding]:
        chunk_ids = [c for point_id in listed for c in sorted(states[point_id].chunk_ids)]
        stored = {
            p.id
            for start in range(0, len(chunk_ids), self._page_size)
            for p in self._retrieve(
                data_type.vector_collection, chunk_ids[start : start + self._page_size]
            )
        }
        for point_id, (change, document) in listed.items():
            absent = states[point_id].chunk_ids - stored
            if absent:
                yield Finding(
                    Drift.CHUNKS_MISSING,
                    data_type,
                    change.entry_id,
                    detail=f"{len(absent)} of {len(states[point_id].chunk_ids)} chunks not stored",
                    document=document,
                )

    # -- pass 2 ------------------------------------------------------------------------------
    def _store_to_warehouse(
        self, warehouse: WarehouseReader, data_type: DataType
    ) -> Iterator[Finding]:
        for page in self._pages(data_type.cleaned_collection):
            entry_ids = [str(p.payload.get("entry_id")) for p in page]
            present = warehouse.existing(data_type, entry_ids)
            for entry_id in entry_ids:
                if entry_id not in present:
                    yield Finding(Drift.EXTRA, data_type, entry_id, detail="not in the warehouse")

    # -- pass 3 ------------------------------------------------------------------------------
    def _orphan_chunks(self, data_type: DataType) -> Iterator[Finding]:
        for page in self._pages(data_type.vector_collection):
            owners = {
                p.id: document_point_id(data_type, str(p.payload.get("entry_id"))) for p in page
            }
            states = self._states(sorted(set(owners.values())))
            for point in page:
                state = states.get(owners[point.id])
                if state is None or point.id not in state.chunk_ids:
                    yield Finding(
                        Drift.ORPHAN_CHUNK,
                        data_type,
                        str(point.payload.get("entry_id")),
                        detail="stored chunk listed in no sync state",
                        point_id=point.id,
                    )

    def _states(self, ids: list[str]) -> dict[str, SyncState]:
        if SYNC_STATE_COLLECTION not in self._collections:
            return {}
        return sync_states_of(self._store, ids)

    def _retrieve(self, collection: str, ids: list[str]) -> list[Record]:
        return self._store.retrieve(collection, ids) if collection in self._collections else []

    def _pages(self, collection: str) -> Iterator[list[Record]]:
        if collection not in self._collections:
            return
        offset: str | None = None
        while True:
            page, offset = self._store.scroll_page(collection, offset=offset, limit=self._page_size)
            yield page
            if offset is None:
                return


def _compare(
    change: DocumentChange,
    document: dict[str, Any],
    state: SyncState | None,
    snapshot: dict[str, Any] | None,
    model: str,
) -> Finding | None:
    """The document-level difference between what the warehouse makes and what is stored."""
    if state is None or state.deleted or snapshot is None:
        return Finding(
            Drift.MISSING,
            change.type,
            change.entry_id,
            detail="not in the store",
            document=document,
        )
    assert change.cleaned is not None
    if snapshot != change.cleaned.model_dump(mode="json"):
        return Finding(
            Drift.OUTDATED,
            change.type,
            change.entry_id,
            detail="cleaned snapshot differs from the warehouse's document",
            document=document,
        )
    if state.chunk_ids != frozenset(chunk_point_ids(change, model)):
        return Finding(
            Drift.OUTDATED,
            change.type,
            change.entry_id,
            detail="chunks differ from the warehouse's document",
            document=document,
        )
    return None
