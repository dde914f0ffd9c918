"""The feature store in Qdrant: collections, and the reads and writes the sync logic needs.

Embedded (qdrant-client local mode, a folder) by default, a server when QDRANT_URL is set; the
same calls either way. Embedded mode lets only one client per folder exist, so the client is
shared by the whole process and calls are serialised.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qdrant_client import QdrantClient, models

from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings

#: Per-document version and tombstones; payload only. Kept apart from the cleaned snapshots so
#: training pipelines that scroll `cleaned_*` never see deleted documents.
SYNC_STATE_COLLECTION = "feature_sync_state"


class StoreLocked(RuntimeError):
    """The embedded store is open in another process."""


@dataclass(frozen=True)
class SyncState:
    """The newest change applied to a document (a tombstone when `deleted`), and the ids of every
    chunk point the document may have in the store."""

    version: int | None
    deleted: bool
    chunk_ids: frozenset[str] = frozenset()

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SyncState:
        return cls(
            version=payload.get("version"),
            deleted=payload["deleted"],
            chunk_ids=frozenset(payload.get("chunk_ids", ())),
        )

    def payload(self, data_type: DataType, entry_id: str) -> dict[str, Any]:
        return {
            "type": data_type.value,
            "entry_id": entry_id,
            "version": self.version,
            "deleted": self.deleted,
            "chunk_ids": sorted(self.chunk_ids),
        }


@dataclass(frozen=True)
class StoredChunk:
    id: str
    vector: list[float]
    payload: dict[str, Any]


@dataclass(frozen=True)
class StoredPoint:
    """A point's id and payload, as the read-only views (export, audit) see it."""

    id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    score: float
    payload: dict[str, Any]


class PointReader(Protocol):
    """The read-only views of the store that export and audit need; the store itself, or the
    running pipeline that holds the embedded store (`query_server.RunningPipelineReader`)."""

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None = None,
        limit: int = 1_000,
        match_any: Mapping[str, str] | None = None,
    ) -> tuple[list[StoredPoint], str | None]: ...

    def retrieve(self, collection: str, ids: Sequence[str]) -> list[StoredPoint]: ...


def sync_states_of(reader: PointReader, ids: Sequence[str]) -> dict[str, SyncState]:
    """The sync states of these document point ids that exist."""
    return {
        point.id: SyncState.from_payload(point.payload)
        for point in reader.retrieve(SYNC_STATE_COLLECTION, ids)
    }


_stores: dict[str, FeatureStore] = {}
_stores_lock = threading.Lock()


def close_stores() -> None:
    """Release every open store (the embedded folder's lock included)."""
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def _connect(settings: Settings) -> QdrantClient:
    if settings.qdrant_url:
        return QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key, timeout=60)
    settings.qdrant_path.mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(settings.qdrant_path))
    except RuntimeError as exc:
        if "already accessed" not in str(exc):
            raise
        raise StoreLocked(
            f"the embedded Qdrant store at {settings.qdrant_path} (QDRANT_PATH) is open in another "
            "process, most likely a running `feature-pipeline run`. Ask that process instead "
            "(the CLI does so on its query port), stop it, or run a Qdrant server and set QDRANT_URL."
        ) from None


class FeatureStore:
    """Typed access to the cleaned, vector and sync-state collections."""

    def __init__(self, client: QdrantClient, *, is_local: bool) -> None:
        self._client = client
        self._is_local = is_local
        self._lock = threading.RLock()

    @classmethod
    def open(cls, settings: Settings) -> FeatureStore:
        """The process-wide store for the configured location (one client per embedded folder)."""
        location = settings.qdrant_url or str(settings.qdrant_path.resolve())
        with _stores_lock:
            store = _stores.get(location)
            if store is None:
                store = cls(_connect(settings), is_local=settings.qdrant_url is None)
                _stores[location] = store
            return store

    def close(self) -> None:
        with self._lock:
            self._client.close()

    # -- schema -----------------------------------------------------------------------------
    def ensure_collections(self, dimensions: dict[DataType, int]) -> None:
        """Create missing collections; fail if an existing vector collection has another size."""
        with self._lock:
            self._ensure_payload_collection(SYNC_STATE_COLLECTION)
            for data_type, size in dimensions.items():
                self._ensure_payload_collection(data_type.cleaned_collection)
                self._ensure_vector_collection(data_type.vector_collection, size)

    def _ensure_payload_collection(self, name: str) -> None:
        if not self._client.collection_exists(name):
            self._client.create_collection(name, vectors_config={})
            self._index(name, ["entry_id", "type"])

    def _ensure_vector_collection(self, name: str, size: int) -> None:
        if self._client.collection_exists(name):
            params = self._client.get_collection(name).config.params.vectors
            existing = getattr(params, "size", None)
            if existing != size:
                raise ValueError(
                    f"collection {name!r} holds {existing}-d vectors but the configured model makes "
                    f"{size}-d ones: use a new store (QDRANT_PATH/QDRANT_URL) or the old model"
                )
            return
        self._client.create_collection(
            name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE)
        )
        self._index(name, ["entry_id", "type", "content_hash"])

    def _index(self, collection: str, fields: Iterable[str]) -> None:
        if self._is_local:  # local mode scans payloads; it ignores indexes and warns about them
            return
        for field in fields:
            self._client.create_payload_index(collection, field, models.PayloadSchemaType.KEYWORD)

    # -- reads ------------------------------------------------------------------------------
    def sync_states(self, ids: Sequence[str]) -> dict[str, SyncState]:
        return sync_states_of(self, ids)

    def chunks(self, data_type: DataType, ids: Sequence[str]) -> dict[str, StoredChunk]:
        if not ids:
            return {}
        with self._lock:
            records = self._client.retrieve(
                data_type.vector_collection, list(ids), with_vectors=True, with_payload=True
            )
        return {
            str(r.id): StoredChunk(id=str(r.id), vector=list(r.vector), payload=r.payload or {})  # type: ignore[arg-type]
            for r in records
        }

    def count(self, collection: str) -> int:
        with self._lock:
            return self._client.count(collection, exact=True).count

    def counts(self) -> dict[str, int]:
        with self._lock:
            names = sorted(c.name for c in self._client.get_collections().collections)
        return {name: self.count(name) for name in names}

    def scroll(self, collection: str, *, with_vectors: bool = False) -> list[models.Record]:
        """Every point of a collection (for tests, audits and small exports)."""
        points: list[models.Record] = []
        offset = None
        while True:
            with self._lock:
                page, offset = self._client.scroll(
                    collection, limit=1_000, offset=offset, with_vectors=with_vectors
                )
            points.extend(page)
            if offset is None:
                return points

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None = None,
        limit: int = 1_000,
        match_any: Mapping[str, str] | None = None,
    ) -> tuple[list[StoredPoint], str | None]:
        """One page of a collection's points from `offset` (None: the start), and the offset of
        the next page (None: this was the last). With `match_any`, only the points where at
        least one of those payload fields has its value."""
        query_filter = None
        if match_any:
            query_filter = models.Filter(
                should=[
                    models.FieldCondition(key=key, match=models.MatchValue(value=value))
                    for key, value in match_any.items()
                ]
            )
        with self._lock:
            page, next_offset = self._client.scroll(
                collection, limit=limit, offset=offset, scroll_filter=query_filter
            )
        points = [StoredPoint(id=str(r.id), payload=r.payload or {}) for r in page]
        return points, None if next_offset is None else str(next_offset)

    def retrieve(self, collection: str, ids: Sequence[str]) -> list[StoredPoint]:
        """The points of these ids that exist (payloads only)."""
        if not ids:
            return []
        with self._lock:
            records = self._client.retrieve(collection, list(ids), with_vectors=False)
        return [StoredPoint(id=str(r.id), payload=r.payload or {}) for r in records]

    def search(self, data_type: DataType, vector: Sequence[float], limit: int) -> list[Hit]:
        with self._lock:
            response = self._client.query_points(
                data_type.vector_collection, query=list(vector), limit=limit, with_payload=True
            )
        return [Hit(score=p.score, payload=p.payload or {}) for p in response.points]

    # -- writes (all wait until the store has applied them) ----------------------------------
    def upsert(self, collection: str, points: list[models.PointStruct]) -> None:
        if points:
            with self._lock:
                self._client.upsert(collection, points=points, wait=True)

    def delete_ids(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            with self._lock:
                self._client.delete(
                    collection, points_selector=models.PointIdsList(points=list(ids)), wait=True
                )
