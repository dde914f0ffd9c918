"""Bytewax sink writing document changes to the feature store, partitioned by document.

Every change of a document is routed (by its key) to the same partition, which alone writes
that document: its version check and its writes cannot race another partition's.

A store that is down (`STORE_ERRORS`) is retried with backoff, its messages unacknowledged. Any
other exception from a write is taken as one document's fault: the batch is written again
document by document, and a document that still fails is dead-lettered (`store_error`) through
the dataflow's dead-letter sink while the rest apply, so no input can kill the process in a loop.

With `continuations` (the broker-fed `run`), a long document's turn ends after
`LONG_DOCUMENT_TURN_S`: its progress is in the store and its event is queued again (confirmed
before this sink returns, so before the original is acknowledged); see sync.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from bytewax.outputs import FixedPartitionedSink, Sink, StatefulSinkPartition
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from feature_pipeline.connectors.qdrant.store import FeatureStore, StoredChunk, SyncState
from feature_pipeline.connectors.retry import RetryInterrupted, describe_error, retry_with_backoff
from feature_pipeline.domain.changes import DeadLetter, DocumentChange
from feature_pipeline.domain.events import replace_surrogates
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics, metrics
from feature_pipeline.processing.continued import continued_changes
from feature_pipeline.processing.embedding import (
    EmbedderFactory,
    EmbeddingModel,
    embedder_for,
)
from feature_pipeline.redaction import redact
from feature_pipeline.settings import Settings
from feature_pipeline.sync import ApplyReport, FeatureSync

log = logging.getLogger(__name__)

#: Store failures worth retrying: the server is down, slow or restarting.
STORE_ERRORS: tuple[type[BaseException], ...] = (
    ResponseHandlingException,
    UnexpectedResponse,
    ConnectionError,
    TimeoutError,
)

#: A server's answers that refuse the request itself (its content), not the service: retrying
#: cannot help. Others (5xx, 401/403, 404, 429) are the server's or the setup's state: retried.
REFUSING_STATUSES = frozenset({400, 413, 422})


class StoreRefused(Exception):
    """The Qdrant server refused a write's content (`REFUSING_STATUSES`): not retried."""


#: The dataflow's dead-letter sink (queue or file), which takes no resume state.
DeadLetterSink = FixedPartitionedSink[DeadLetter, Any]


class Continuations(Protocol):
    """Where unfinished long documents' events go for their next turn (back to their queue)."""

    def send(self, changes: Sequence[DocumentChange]) -> None: ...

    def close(self) -> None: ...


def build_sync(
    settings: Settings,
    counters: Metrics = metrics,
    embedders: EmbedderFactory = embedder_for,
    *,
    turns: bool = False,
) -> FeatureSync:
    """The process's sync logic: shared store, each data type's model loaded once.

    `embedders` gives the model of a data type: the configured one, or (the benchmark's ceiling
    pass) a stand-in. `turns`: long documents yield after `LONG_DOCUMENT_TURN_S` (their events
    must then be queued again: `ApplyReport.unfinished`).
    """
    store = cast(FeatureStore, TimedStore(FeatureStore.open(settings), counters))

    def model_for(data_type: DataType) -> EmbeddingModel:
        return embedders(settings, data_type)

    store.ensure_collections({t: model_for(t).dimension for t in DataType})
    return FeatureSync(
        store,
        model_for,
        counters,
        # Unset: each model's own default (its device's and backend's).
        settings.embedding_batch_size,
        slice_chunks=settings.slice_chunks,
        turn_s=settings.long_document_turn_s if turns else None,
    )


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


class _FeatureStorePartition(StatefulSinkPartition[DocumentChange, None]):
    def __init__(
        self,
        sync: FeatureSync,
        on_written: Callable[[int], None] | None,
        dead_letters: Callable[[], StatefulSinkPartition[DeadLetter, Any]] | None = None,
        continuations: Continuations | None = None,
    ) -> None:
        self._sync = sync
        self._on_written = on_written
        self._continuations = continuations
        #: Builds a dead-letter partition on the first refused change (most runs need none):
        #: it writes (publishes and confirms) before returning, so the epoch's ack stays safe.
        self._make_dead_letters = dead_letters
        self._dead_letters: StatefulSinkPartition[DeadLetter, Any] | None = None

    def write_batch(self, items: list[DocumentChange]) -> None:
        try:
            unfinished = list(self._apply(items).unfinished)
            refused: list[DeadLetter] = []
        except RetryInterrupted:
            raise
        except Exception as exc:
            log.warning(
                "writing %d changes to the feature store failed (%s): writing them document "
                "by document",
                len(items),
                redact(describe_error(exc)),
            )
            refused, unfinished = self._apply_each_document(items)
        if unfinished:
            self._continue(unfinished)
        if refused:
            self._dead_letter(refused)
        if self._on_written is not None:
            self._on_written(len(items) - len(refused))

    def _apply(self, changes: list[DocumentChange]) -> ApplyReport:
        return retry_with_backoff(
            lambda: self._apply_once(changes), "writing to the feature store", retry_on=STORE_ERRORS
        )

    def _apply_once(self, changes: list[DocumentChange]) -> ApplyReport:
        try:
            return self._sync.apply(changes)
        except UnexpectedResponse as exc:
            if exc.status_code in REFUSING_STATUSES:
                raise StoreRefused(describe_error(exc)) from exc
            raise

    def _apply_each_document(
        self, items: list[DocumentChange]
    ) -> tuple[list[DeadLetter], list[DocumentChange]]:
        """Apply each document's changes on their own. Returns dead letters for those that still
        fail, and the long documents left for a later turn."""
        by_document: dict[str, list[DocumentChange]] = {}
        for change in items:
            by_document.setdefault(change.key, []).append(change)
        refused = []
        unfinished: list[DocumentChange] = []
        for key, changes in by_document.items():
            try:
                unfinished.extend(self._apply(changes).unfinished)
            except RetryInterrupted:
                raise
            except Exception as exc:
                # One line, no secret, encodable (it travels in a header or a JSON line).
                reason = replace_surrogates(redact(describe_error(exc)))
                log.warning("dead-lettering %s: the store refused it: %s", key, reason)
                refused.extend(
                    DeadLetter(
                        source=c.source, body=c.body, reason=reason, error_type="store_error"
                    )
                    for c in changes
                )
        return refused, unfinished

    def _continue(self, unfinished: list[DocumentChange]) -> None:
        if self._continuations is None:  # the sync has turns only where continuations are wired
            raise RuntimeError(f"{unfinished[0].key} is unfinished and cannot be queued again")
        self._continuations.send(unfinished)
        for change in unfinished:  # its next turn need not parse, clean and chunk it again
            continued_changes.remember(change)

    def _dead_letter(self, refused: list[DeadLetter]) -> None:
        if self._make_dead_letters is None:
            # Only where no dead-letter sink was wired in (a test's partition): never silently.
            raise RuntimeError(f"the store refused {len(refused)} changes: {refused[0].reason}")
        if self._dead_letters is None:
            self._dead_letters = self._make_dead_letters()
        self._dead_letters.write_batch(refused)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        if self._dead_letters is not None:
            self._dead_letters.close()
        if self._continuations is not None:
            self._continuations.close()


class FeatureStoreSink(FixedPartitionedSink[DocumentChange, None]):
    """Writes cleaned snapshots and embedded chunks; returns only once Qdrant has applied them."""

    def __init__(
        self,
        settings: Settings,
        partitions: int = 1,
        on_written: Callable[[int], None] | None = None,
        embedders: EmbedderFactory = embedder_for,
        continuations: Callable[[], Continuations] | None = None,
    ) -> None:
        """`continuations` (one per partition): where long documents go when their turn ends;
        without it, each document is written whole in one batch (a file backfill)."""
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self._settings = settings
        self._partitions = partitions
        self._on_written = on_written
        self._embedders = embedders
        self._continuations = continuations
        self._dead_letter_sink: DeadLetterSink | None = None

    def dead_letters_to(self, sink: Sink[Any]) -> None:
        """Send changes the store refuses to `sink`, the dataflow's dead-letter sink (one
        partition of it per partition of this sink, built on first use)."""
        if not isinstance(sink, FixedPartitionedSink):
            raise TypeError(f"dead letters need a FixedPartitionedSink, got {type(sink).__name__}")
        self._dead_letter_sink = sink

    def list_parts(self) -> list[str]:
        return [f"features-{i}" for i in range(self._partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _FeatureStorePartition:
        turns = self._continuations is not None
        sync = build_sync(self._settings, embedders=self._embedders, turns=turns)
        continuations = self._continuations() if self._continuations is not None else None
        sink = self._dead_letter_sink
        if sink is None:
            return _FeatureStorePartition(sync, self._on_written, continuations=continuations)
        return _FeatureStorePartition(
            sync,
            self._on_written,
            lambda: sink.build_part(step_id, sink.list_parts()[0], None),
            continuations,
        )
