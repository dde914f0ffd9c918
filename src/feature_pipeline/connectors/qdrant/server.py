"""The feature store on a Qdrant server (QDRANT_URL), through qdrant-client.

The same class also wraps qdrant-client's local and in-memory modes, which imitate the server's
API: the contract tests and the engine comparison use them where no server runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from qdrant_client import QdrantClient, models

from feature_pipeline.connectors.qdrant.store import (
    INDEXED_FIELDS,
    SYNC_STATE_COLLECTION,
    FeatureStore,
    Hit,
    Match,
    Point,
    Record,
    UnknownCollection,
    check_vector_size,
    page_offset,
    record_of,
)
from feature_pipeline.domain.types import DataType


class ServerStore(FeatureStore):
    engine = "qdrant-server"

    def __init__(self, client: QdrantClient, *, is_local: bool = False) -> None:
        self._client = client
        # Local mode scans payloads: it ignores payload indexes and warns about them.
        self._is_local = is_local
        # Local mode allows one client per folder and is not thread-safe: calls are serialised.
        self._lock = threading.RLock()
        if is_local:
            self.engine = "qdrant-client-local"

    @classmethod
    def connect(cls, url: str, api_key: str | None = None) -> ServerStore:
        return cls(QdrantClient(url=url, api_key=api_key, timeout=60))

    def close(self) -> None:
        with self._lock:
            self._client.close()

    # -- schema -----------------------------------------------------------------------------
    def ensure_collections(self, dimensions: dict[DataType, int]) -> None:
        with self._lock:
            self._ensure_payload_collection(SYNC_STATE_COLLECTION)
            for data_type, size in dimensions.items():
                self._ensure_payload_collection(data_type.cleaned_collection)
                self._ensure_vector_collection(data_type.vector_collection, size)

    def _ensure_payload_collection(self, name: str) -> None:
        if not self._client.collection_exists(name):
            self._client.create_collection(name, vectors_config={})
            self._index(name)

    def _ensure_vector_collection(self, name: str, size: int) -> None:
        if self._client.collection_exists(name):
            params = self._client.get_collection(name).config.params.vectors
            check_vector_size(name, getattr(params, "size", None), size)
            return
        # The server builds the HNSW index itself (its optimizer runs in the background).
        self._client.create_collection(
            name, vectors_config=models.VectorParams(size=size, distance=models.Distance.COSINE)
        )
        self._index(name)

    def _index(self, collection: str) -> None:
        if self._is_local:
            return
        for field in INDEXED_FIELDS:
            self._client.create_payload_index(collection, field, models.PayloadSchemaType.KEYWORD)

    def collections(self) -> list[str]:
        with self._lock:
            return sorted(c.name for c in self._client.get_collections().collections)

    def _check(self, collection: str) -> None:
        if not self._client.collection_exists(collection):
            raise UnknownCollection(f"no collection {collection!r} in the store")

    # -- reads ------------------------------------------------------------------------------
    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[Record]:
        if not ids:
            return []
        with self._lock:
            records = self._client.retrieve(
                collection, list(ids), with_vectors=with_vectors, with_payload=True
            )
        return [record_of(r.id, r.payload, r.vector) for r in records]

    def count(self, collection: str, where: Match | None = None) -> int:
        with self._lock:
            self._check(collection)
            return self._client.count(collection, count_filter=_filter(where), exact=True).count

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None,
        limit: int,
        where: Match | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[Record], str | None]:
        with self._lock:
            self._check(collection)
            page, next_offset = self._client.scroll(
                collection,
                scroll_filter=_filter(where),
                limit=limit,
                offset=offset,
                with_vectors=with_vectors,
                with_payload=True,
            )
        return [record_of(r.id, r.payload, r.vector) for r in page], page_offset(next_offset)

    def search(
        self,
        data_type: DataType,
        vector: Sequence[float],
        limit: int,
        where: Match | None = None,
    ) -> list[Hit]:
        with self._lock:
            response = self._client.query_points(
                data_type.vector_collection,
                query=list(vector),
                query_filter=_filter(where),
                limit=limit,
                with_payload=True,
            )
        return [Hit(score=p.score, payload=p.payload or {}) for p in response.points]

    # -- writes (all wait until the server has applied them) ---------------------------------
    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        structs = [
            models.PointStruct(
                id=p.id, vector=p.vector if p.vector is not None else {}, payload=p.payload
            )
            for p in points
        ]
        with self._lock:
            self._client.upsert(collection, points=structs, wait=True)

    def delete_ids(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            with self._lock:
                self._client.delete(
                    collection, points_selector=models.PointIdsList(points=list(ids)), wait=True
                )


def _filter(where: Match | None) -> models.Filter | None:
    if not where:
        return None
    return models.Filter(
        must=[
            models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in where.items()
        ]
    )
