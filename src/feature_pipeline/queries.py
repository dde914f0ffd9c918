"""Read-side queries of the feature store: semantic search and collection counts."""

from __future__ import annotations

from typing import Any

from feature_pipeline.connectors.qdrant.store import FeatureStore
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
