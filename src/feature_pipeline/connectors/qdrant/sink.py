"""Bytewax sink writing document changes to the feature store, partitioned by document.

Every change of a document is routed (by its key) to the same partition, which alone writes
that document: its version check and its writes cannot race another partition's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from feature_pipeline.connectors.qdrant.store import FeatureStore, StoredChunk, SyncState
from feature_pipeline.connectors.retry import retry_with_backoff
from feature_pipeline.domain.changes import DocumentChange
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics, metrics
from feature_pipeline.processing.chunking import load_tokenizer
from feature_pipeline.processing.embedding import (
    EmbedderFactory,
    EmbeddingModel,
    embedder_for,
    resolve_device,
)
from feature_pipeline.settings import Settings, SettingsError
from feature_pipeline.sync import FeatureSync

log = logging.getLogger(__name__)

#: Store failures worth retrying: the server is down, slow or restarting.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    ResponseHandlingException,
    UnexpectedResponse,
    ConnectionError,
    TimeoutError,
)


def build_sync(
    settings: Settings, counters: Metrics = metrics, embedders: EmbedderFactory = embedder_for
) -> FeatureSync:
    """The process's sync logic: shared store, each data type's model loaded once.

    `embedders` gives the model of a data type: the configured one, or (the benchmark's ceiling
    pass) a stand-in.
    """
    store = cast(FeatureStore, TimedStore(FeatureStore.open(settings), counters))

    def model_for(data_type: DataType) -> EmbeddingModel:
        return embedders(settings, data_type)

    for data_type in DataType:
        check_chunk_size(settings, data_type, model_for(data_type))
    store.ensure_collections({t: model_for(t).dimension for t in DataType})
    batch_size = settings.embedding_batch_size_for(resolve_device(settings.embedding_device))
    return FeatureSync(store, model_for, counters, batch_size)


class TimedStore:
    """The store, counting the seconds spent reading and writing it (where a change's time goes:
    `/metrics` and the benchmark's split); everything else passes through."""

    def __init__(self, store: FeatureStore, counters: Metrics) -> None:
        self._store = store
        self._counters = counters

    def sync_states(self, ids: Sequence[str]) -> dict[str, SyncState]:
        with self._counters.timed("store_read_seconds"):
            return self._store.sync_states(ids)

    def chunks(self, data_type: DataType, ids: Sequence[str]) -> dict[str, StoredChunk]:
        with self._counters.timed("store_read_seconds"):
            return self._store.chunks(data_type, ids)

    def upsert(self, collection: str, points: list[Any]) -> None:
        with self._counters.timed("store_write_seconds"):
            self._store.upsert(collection, points)

    def delete_ids(self, collection: str, ids: Sequence[str]) -> None:
        with self._counters.timed("store_write_seconds"):
            self._store.delete_ids(collection, ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def check_chunk_size(settings: Settings, data_type: DataType, embedder: EmbeddingModel) -> None:
    """Fail at start when chunks could exceed the model's window: it would truncate them silently."""
    special = load_tokenizer(embedder.path).post_processor.num_special_tokens_to_add(False)
    limit = embedder.max_seq_length - special
    size = settings.chunk_size_for(data_type)
    if size > limit:
        raise SettingsError(
            f"CHUNK_SIZE_{data_type.value.upper()}={size} exceeds what {embedder.name} reads: "
            f"{embedder.max_seq_length} word pieces including {special} special tokens, so at "
            f"most {limit}"
        )


class _FeatureStorePartition(StatefulSinkPartition[DocumentChange, None]):
    def __init__(self, sync: FeatureSync, on_written: Callable[[int], None] | None) -> None:
        self._sync = sync
        self._on_written = on_written

    def write_batch(self, items: list[DocumentChange]) -> None:
        retry_with_backoff(
            lambda: self._sync.apply(items), "writing to the feature store", retry_on=STORE_ERRORS
        )
        if self._on_written is not None:
            self._on_written(len(items))

    def snapshot(self) -> None:
        return None


class FeatureStoreSink(FixedPartitionedSink[DocumentChange, None]):
    """Writes cleaned snapshots and embedded chunks; returns only once Qdrant has applied them."""

    def __init__(
        self,
        settings: Settings,
        partitions: int = 1,
        on_written: Callable[[int], None] | None = None,
        embedders: EmbedderFactory = embedder_for,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self._settings = settings
        self._partitions = partitions
        self._on_written = on_written
        self._embedders = embedders

    def list_parts(self) -> list[str]:
        return [f"features-{i}" for i in range(self._partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _FeatureStorePartition:
        sync = build_sync(self._settings, embedders=self._embedders)
        return _FeatureStorePartition(sync, self._on_written)
