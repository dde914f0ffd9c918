"""The feature store interface: collections, and the reads and writes the sync logic needs.

Two implementations speak it: the embedded Qdrant Edge engine (`edge.py`, the default, a folder
at QDRANT_PATH) and a Qdrant server (`server.py`, QDRANT_URL). Callers see only the
store-neutral types below, so nothing outside this package depends on a backend's client.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings

#: Per-document version and tombstones; payload only. Kept apart from the cleaned snapshots so
#: training pipelines that scroll `cleaned_*` never see deleted documents.
SYNC_STATE_COLLECTION = "feature_sync_state"

#: Payload fields indexed (keyword) in every collection: what searches, `points` and `export`
#: filter by. A chunk is found by its point id, which is derived from its content hash, so the
#: hash itself is not indexed: one more unique key per point, its index took ~1.4 s of a
#: 100,000-point segment's ~7.5 s build in the embedded store (and the build holds the GIL).
INDEXED_FIELDS = ("type", "entry_id", "author_id", "platform")

#: Equality conditions on payload fields, all of which must hold (e.g. {"type": "posts"}).
Match = Mapping[str, str]


class StoreLocked(RuntimeError):
    """The embedded store is open in another process."""


class UnknownCollection(ValueError):
    """A collection the store does not have."""


@dataclass(frozen=True)
class Point:
    """A point to write: `vector` is None in the payload-only collections."""

    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None


@dataclass(frozen=True)
class Record:
    """A stored point; `vector` is None unless asked for (and in payload-only collections)."""

    id: str
    payload: dict[str, Any]
    vector: list[float] | None = None


#: A stored chunk, as the sync reads it back to reuse its vector.
StoredChunk = Record


@dataclass(frozen=True)
class Hit:
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class PendingWrite:
    """A versioned change being written: its version, how many of its chunks (in document order)
    are written, and a digest of its chunk ids in order. A replay of the same change (same
    version, same chunks) resumes after `written`; anything else starts over."""

    version: int
    written: int
    digest: str

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any] | None) -> PendingWrite | None:
        if not isinstance(payload, Mapping):
            return None
        return cls(
            version=int(payload["version"]),
            written=int(payload["written"]),
            digest=str(payload["digest"]),
        )

    def payload(self) -> dict[str, Any]:
        return {"version": self.version, "written": self.written, "digest": self.digest}


@dataclass(frozen=True)
class SyncState:
    """The newest change applied to a document (a tombstone when `deleted`), the ids of every
    chunk point the document may have in the store, and the change being written, if any."""

    version: int | None
    deleted: bool
    chunk_ids: frozenset[str] = frozenset()
    pending: PendingWrite | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SyncState:
        return cls(
            version=payload.get("version"),
            deleted=payload["deleted"],
            chunk_ids=frozenset(payload.get("chunk_ids", ())),
            pending=PendingWrite.from_payload(payload.get("pending")),
        )

    def payload(self, data_type: DataType, entry_id: str) -> dict[str, Any]:
        return {
            "type": data_type.value,
            "entry_id": entry_id,
            "version": self.version,
            "deleted": self.deleted,
            "chunk_ids": sorted(self.chunk_ids),
            "pending": None if self.pending is None else self.pending.payload(),
        }


def record_of(point_id: object, payload: Mapping[str, Any] | None, vector: object) -> Record:
    """A store-neutral record from an engine's point: payload-only collections give their
    vector as {} (no named vectors) or None, which both become None."""
    return Record(
        id=str(point_id),
        payload=dict(payload or {}),
        vector=list(vector) if isinstance(vector, list) else None,  # type: ignore[arg-type]
    )


def page_offset(next_offset: object) -> str | None:
    """The next page's offset as the interface gives it (engines return ids of their own type)."""
    return None if next_offset is None else str(next_offset)


def check_vector_size(collection: str, existing: int | None, size: int) -> None:
    """Refuse to write `size`-d vectors into a collection made for another size."""
    if existing != size:
        raise ValueError(
            f"collection {collection!r} holds {existing}-d vectors but the configured model makes "
            f"{size}-d ones: use a new store (QDRANT_PATH/QDRANT_URL) or the old model"
        )


class PointReader(Protocol):
    """The reads that export and audit need: the store itself, or the running pipeline that
    holds the embedded store (`query_server.RunningPipelineReader`)."""

    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[Record]: ...

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None,
        limit: int,
        where: Match | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[Record], str | None]: ...


def sync_states_of(reader: PointReader, ids: Sequence[str]) -> dict[str, SyncState]:
    """The sync states of these document point ids that exist."""
    if not ids:
        return {}
    return {
        r.id: SyncState.from_payload(r.payload) for r in reader.retrieve(SYNC_STATE_COLLECTION, ids)
    }


class FeatureStore(ABC):
    """The cleaned, vector and sync-state collections. Writes return once the store has applied
    them durably (the sink acks the broker right after)."""

    #: Which engine this is, for logs and the benchmark.
    engine: str

    @classmethod
    def open(cls, settings: Settings) -> FeatureStore:
        """The process-wide store for the configured location: a server when QDRANT_URL is set,
        else the embedded store at QDRANT_PATH (one opener per folder, so shared here)."""
        location = settings.qdrant_url or str(settings.qdrant_path.resolve())
        with _stores_lock:
            store = _stores.get(location)
            if store is None:
                store = _connect(settings)
                _stores[location] = store
            return store

    # -- schema -----------------------------------------------------------------------------
    @abstractmethod
    def ensure_collections(self, dimensions: dict[DataType, int]) -> None:
        """Create missing collections; fail if an existing vector collection has another size."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of the collections, sorted."""

    # -- reads ------------------------------------------------------------------------------
    @abstractmethod
    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[Record]:
        """The points with these ids that exist (in no particular order)."""

    @abstractmethod
    def count(self, collection: str, where: Match | None = None) -> int:
        """Exact number of points (matching `where`)."""

    @abstractmethod
    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None,
        limit: int,
        where: Match | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[Record], str | None]:
        """One page of points in id order, and the offset of the next page (None at the end)."""

    @abstractmethod
    def search(
        self,
        data_type: DataType,
        vector: Sequence[float],
        limit: int,
        where: Match | None = None,
    ) -> list[Hit]:
        """The nearest chunks by cosine similarity, best first."""

    # -- writes -----------------------------------------------------------------------------
    @abstractmethod
    def upsert(self, collection: str, points: Sequence[Point]) -> None: ...

    @abstractmethod
    def delete_ids(self, collection: str, ids: Sequence[str]) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Release the store (the embedded folder's lock included)."""

    # -- built on the above -----------------------------------------------------------------
    def sync_states(self, ids: Sequence[str]) -> dict[str, SyncState]:
        return sync_states_of(self, ids)

    def chunks(self, data_type: DataType, ids: Sequence[str]) -> dict[str, StoredChunk]:
        if not ids:
            return {}
        return {r.id: r for r in self.retrieve(data_type.vector_collection, ids, with_vectors=True)}

    def counts(self) -> dict[str, int]:
        return {name: self.count(name) for name in self.collections()}

    def scroll(
        self,
        collection: str,
        *,
        with_vectors: bool = False,
        where: Match | None = None,
        limit: int | None = None,
    ) -> list[Record]:
        """Every point of a collection (matching `where`, at most `limit`), in id order: for
        tests, audits, `feature-pipeline points` and small exports."""
        points: list[Record] = []
        offset: str | None = None
        while limit is None or len(points) < limit:
            page_size = 1_000 if limit is None else min(1_000, limit - len(points))
            page, offset = self.scroll_page(
                collection, offset=offset, limit=page_size, where=where, with_vectors=with_vectors
            )
            points.extend(page)
            if offset is None:
                break
        return points


_stores: dict[str, FeatureStore] = {}
_stores_lock = threading.Lock()


def _connect(settings: Settings) -> FeatureStore:
    # Imported here: each backend imports this module for the types.
    if settings.qdrant_url:
        from feature_pipeline.connectors.qdrant.server import ServerStore

        return ServerStore.connect(settings.qdrant_url, settings.qdrant_api_key)
    from feature_pipeline.connectors.qdrant.edge import EdgeStore

    return EdgeStore(settings.qdrant_path)


def close_stores() -> None:
    """Release every open store (the embedded folder's lock included)."""
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()
