"""Read-side queries of the feature store: semantic search, collection counts and points."""

from __future__ import annotations

from typing import Any

from feature_pipeline.connectors.qdrant.store import FeatureStore, Match
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.embedding import embedder_for
from feature_pipeline.settings import Settings


def search(
    settings: Settings, store: FeatureStore, text: str, data_type: DataType, limit: int
) -> list[dict[str, Any]]:
    """Embed the query with the data type's own model and return hits, best first."""
    if not text.strip():
        raise ValueError("the search text is empty")
    if limit < 1:
        raise ValueError(f"-k must be at least 1, got {limit}")
    vector = embedder_for(settings, data_type).encode([text])[0]
    return [{"score": hit.score, **hit.payload} for hit in store.search(data_type, vector, limit)]


def counts(store: FeatureStore) -> dict[str, int]:
    return store.counts()


def points(
    store: FeatureStore,
    collection: str,
    where: Match,
    *,
    with_vectors: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A collection's points (matching `where`) as JSON objects: id, payload, vector if asked."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    records = store.scroll(collection, with_vectors=with_vectors, where=where or None, limit=limit)
    return [
        {"id": r.id, "payload": r.payload, **({"vector": r.vector} if with_vectors else {})}
        for r in records
    ]
