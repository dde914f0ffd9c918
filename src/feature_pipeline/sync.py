"""Applies processed document changes to the feature store so it stays equal to the warehouse.

For one batch of changes (all owned by the calling sink partition):

1. keep only the newest change of each document in the batch (each carries the whole document);
2. skip changes whose version (`ts`) is not newer than the version stored for the document,
   so a replayed older event never makes the store older (deletes leave a versioned tombstone);
3. look up each chunk by its deterministic id; a chunk with the same text and model keeps its
   stored vector, only the others are embedded, together, one model call per model;
4. record in the document's sync state every chunk id it may now have (old and new), write the
   chunks, delete the old chunks not in the new version (by id: the state lists them, so no
   collection scan), write (or delete) the cleaned snapshot, and last the new version with the
   new chunk ids. A crash between these steps replays the change, every step is idempotent, and
   the state always lists every chunk the document has, so nothing is orphaned.

Memory stays bounded however long a document is: steps 3-4 run on groups of documents of at most
`slice_chunks` chunks in all, smallest documents first, and a longer document is embedded and
written a slice at a time (embed a slice, write it, drop its vectors). Its state lists every
chunk id before its first slice is written and the new version comes after its last, so a crash
between slices leaves the same replayable state as a crash in step 4.

A long versioned document also records, after each slice, how far it got (`PendingWrite`: its
version, the chunks written, a digest of its chunk ids): a replay of the same change resumes
there instead of starting over. With a turn length (`turn_s`), a long document's turn ends after
the slice that passes it, and `apply` reports it unfinished: the caller re-queues its event, so
the documents queued behind it go first and it resumes from its durable point on its next turn.
While a version is pending, an older change of the document is stale: the pending one will
finish (its event is queued again, or still unacknowledged) and supersede it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from feature_pipeline.connectors.qdrant.store import (
    SYNC_STATE_COLLECTION,
    FeatureStore,
    PendingWrite,
    Point,
    SyncState,
)
from feature_pipeline.domain.changes import DocumentChange, chunk_point_ids, document_point_id
from feature_pipeline.domain.features import Chunk
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing.embedding import EmbeddingModel
from feature_pipeline.settings import DEFAULT_SLICE_CHUNKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyReport:
    applied: int
    superseded: int
    stale: int
    embedded: int
    reused: int
    #: Long documents whose turn ended before their last slice: their events must be queued
    #: again (they resume where they stopped).
    unfinished: tuple[DocumentChange, ...] = ()


@dataclass
class _PlannedChunk:
    point_id: str
    chunk: Chunk
    model: str
    vector: list[float] | None = None
    #: Its vector came from the store (same text, same model): not embedded again.
    reused: bool = False
    #: Its vector came from the model.
    embedded: bool = False
    #: Stored with this very payload already: nothing to write.
    unchanged: bool = False

    def payload(self) -> dict[str, object]:
        return {**self.chunk.model_dump(mode="json"), "model": self.model}


def newest_per_document(changes: Sequence[DocumentChange]) -> list[DocumentChange]:
    """The last change of each document, in arrival order unless versions say otherwise."""
    newest: dict[str, DocumentChange] = {}
    for change in changes:
        current = newest.get(change.key)
        if current is None or not _is_older(change, current):
            newest[change.key] = change
    return list(newest.values())


def _is_older(change: DocumentChange, current: DocumentChange) -> bool:
    return change.ts is not None and current.ts is not None and change.ts <= current.ts


def is_stale(change: DocumentChange, state: SyncState | None) -> bool:
    """A change not newer than what the store holds, or older than a version being written;
    unversioned changes always apply."""
    if state is None or change.ts is None:
        return False
    if state.version is not None and change.ts <= state.version:
        return True
    return state.pending is not None and change.ts < state.pending.version


def chunk_ids_digest(ids: Sequence[str]) -> str:
    """Identifies a change's chunk list (ids in order): a resume point is valid only for it."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class FeatureSync:
    """Keeps one store in sync; `embedder_for` gives the (process-wide) model of a data type.

    `turn_s`: how long one `apply` may work on long documents before it leaves the rest of them
    for a later turn (`ApplyReport.unfinished`); None: every change is finished in the call.
    """

    def __init__(
        self,
        store: FeatureStore,
        embedder_for: Callable[[DataType], EmbeddingModel],
        metrics: Metrics,
        embed_batch_size: int | None,
        *,
        slice_chunks: int = DEFAULT_SLICE_CHUNKS,
        turn_s: float | None = None,
    ) -> None:
        if slice_chunks < 1:
            raise ValueError(f"slice_chunks must be >= 1, got {slice_chunks}")
        self._store = store
        self._embedder_for = embedder_for
        self._metrics = metrics
        self._embed_batch_size = embed_batch_size
        self._slice_chunks = slice_chunks
        self._turn_s = turn_s

    def apply(self, changes: Sequence[DocumentChange]) -> ApplyReport:
        started = time.perf_counter()
        deadline = None if self._turn_s is None else time.monotonic() + self._turn_s
        newest = newest_per_document(changes)
        superseded = len(changes) - len(newest)
        states = self._store.sync_states([document_point_id(c.type, c.entry_id) for c in newest])
        todo = [
            c for c in newest if not is_stale(c, states.get(document_point_id(c.type, c.entry_id)))
        ]
        stale = len(newest) - len(todo)

        # Smallest first: the batch's short documents are written before a long one starts.
        todo.sort(key=lambda c: len(c.chunks))
        previous = {c.key: states.get(document_point_id(c.type, c.entry_id)) for c in todo}
        planned: dict[str, list[_PlannedChunk]] = {}
        unfinished: list[DocumentChange] = []
        for group in _groups(todo, self._slice_chunks):
            if not self._apply_group(group, previous, planned, deadline):
                unfinished.extend(group)

        continued = {id(c) for c in unfinished}
        finished = [c for c in todo if id(c) not in continued]
        self._count(changes, newest, finished, unfinished, planned, time.perf_counter() - started)
        chunks = [item for plan in planned.values() for item in plan]
        return ApplyReport(
            applied=len(finished),
            superseded=superseded,
            stale=stale,
            embedded=sum(item.embedded for item in chunks),
            reused=sum(item.reused for item in chunks),
            unfinished=tuple(unfinished),
        )

    def _apply_group(
        self,
        group: list[DocumentChange],
        previous: dict[str, SyncState | None],
        planned: dict[str, list[_PlannedChunk]],
        deadline: float | None,
    ) -> bool:
        """Steps 3-4 for a group of documents, their chunks embedded and written a slice at a
        time; adds the group's plans to `planned`. False: a long document's turn ended (passed
        `deadline`) before its last slice, its progress recorded."""
        plans = {c.key: self._plan_chunks(c) for c in group if c.cleaned is not None}
        planned.update(plans)
        new_ids = {c.key: frozenset(i.point_id for i in plans.get(c.key, [])) for c in group}
        # A group of more than one slice holds one long document; only a versioned one can
        # record its progress (the version tells its replays apart from other changes).
        items = [item for c in group for item in plans.get(c.key, [])]
        long_change = group[0] if len(items) > self._slice_chunks else None
        pending = None
        if long_change is not None and long_change.ts is not None:
            ids = [item.point_id for item in items]
            pending = PendingWrite(long_change.ts, 0, chunk_ids_digest(ids))
            pending = _resumed(pending, previous[long_change.key])
        self._record_pending_chunks(group, previous, new_ids, pending)

        begin = pending.written if pending is not None else 0
        if begin:
            log.info(
                "long document %s: resuming after %d/%d chunks", group[0].key, begin, len(items)
            )
        started = time.perf_counter()
        while begin < len(items):
            part = items[begin : begin + self._slice_chunks]
            self._fill_vectors(part)
            self._write_chunks(part)
            for item in part:
                item.vector = None  # written: a long document's vectors must not pile up
            begin += len(part)
            if long_change is None:
                continue
            log.info(
                "long document %s: %d/%d chunks written (%d embedded, %d reused), %.0f s",
                long_change.key,
                begin,
                len(items),
                sum(i.embedded for i in items),
                sum(i.reused for i in items),
                time.perf_counter() - started,
            )
            if pending is not None and begin < len(items):
                pending = PendingWrite(pending.version, begin, pending.digest)
                self._write_progress(long_change, previous[long_change.key], new_ids, pending)
                if deadline is not None and time.monotonic() >= deadline:
                    log.info("long document %s: turn over, continued later", long_change.key)
                    return False

        by_type: dict[DataType, list[DocumentChange]] = defaultdict(list)
        for change in group:
            by_type[change.type].append(change)
        for data_type, type_changes in by_type.items():
            stale_ids = [
                point_id
                for c in type_changes
                for point_id in _chunk_ids(previous[c.key]) - new_ids[c.key]
            ]
            self._write_documents(data_type, type_changes, stale_ids)
        self._write_states(group, previous, new_ids)
        return True

    def _count(
        self,
        changes: Sequence[DocumentChange],
        newest: list[DocumentChange],
        finished: list[DocumentChange],
        unfinished: list[DocumentChange],
        planned: dict[str, list[_PlannedChunk]],
        seconds: float,
    ) -> None:
        """Counters per data type, the batch's histograms, and each applied change's freshness
        (from its publish time, when its message carried one)."""
        received, kept, applied, continued = (
            Counter(c.type for c in group) for group in (changes, newest, finished, unfinished)
        )
        chunks = [item for plan in planned.values() for item in plan]
        for data_type in received:
            name = data_type.value
            self._metrics.add("events_applied", applied[data_type], label=name)
            self._metrics.add("events_continued", continued[data_type], label=name)
            superseded = received[data_type] - kept[data_type]
            self._metrics.add("events_superseded", superseded, label=name)
            stale = kept[data_type] - applied[data_type] - continued[data_type]
            self._metrics.add("events_stale", stale, label=name)
            of_type = [item for item in chunks if item.chunk.type is data_type]
            self._metrics.add("chunks_embedded", sum(i.embedded for i in of_type), label=name)
            self._metrics.add("chunks_reused", sum(i.reused for i in of_type), label=name)
        self._metrics.add("apply_seconds", seconds)
        self._metrics.observe("apply_batch_seconds", seconds)
        self._metrics.observe("batch_changes", len(changes))
        written_at = time.time()
        for change in finished:
            if change.published_at is not None:
                self._metrics.observe(
                    "freshness_seconds", max(0.0, written_at - change.published_at)
                )

    def _plan_chunks(self, change: DocumentChange) -> list[_PlannedChunk]:
        model = self._embedder_for(change.type).name
        return [
            _PlannedChunk(point_id=point_id, chunk=chunk, model=model)
            for point_id, chunk in zip(chunk_point_ids(change, model), change.chunks, strict=True)
        ]

    def _fill_vectors(self, plan: list[_PlannedChunk]) -> None:
        """Reuse stored vectors where the chunk exists; embed the rest."""
        by_type: dict[DataType, list[_PlannedChunk]] = defaultdict(list)
        for item in plan:
            by_type[item.chunk.type].append(item)
        missing: dict[DataType, list[_PlannedChunk]] = {}
        for data_type, items in by_type.items():
            stored = self._store.chunks(data_type, [i.point_id for i in items])
            for item in items:
                existing = stored.get(item.point_id)
                if existing is not None:
                    item.vector = existing.vector
                    item.reused = True
                    item.unchanged = existing.payload == item.payload()
            missing[data_type] = [i for i in items if i.vector is None]
        for data_type, items in missing.items():
            if not items:
                continue
            started = time.perf_counter()
            # The chunker's word-piece ids: the model does not tokenize the texts again.
            vectors = self._embedder_for(data_type).embed(
                [i.chunk.content for i in items],
                [i.chunk.token_ids for i in items],
                batch_size=self._embed_batch_size,
            )
            self._metrics.add("embedding_seconds", time.perf_counter() - started)
            # One conversion for the whole batch: a `tolist()` per row cost more than the rows.
            for item, vector in zip(items, vectors.tolist(), strict=True):
                item.vector = vector
                item.embedded = True

    def _write_chunks(self, items: list[_PlannedChunk]) -> None:
        """Upsert the chunks whose stored point differs (new text, new payload)."""
        by_collection: dict[str, list[Point]] = defaultdict(list)
        for item in items:
            if not item.unchanged:
                by_collection[item.chunk.type.vector_collection].append(
                    Point(id=item.point_id, payload=item.payload(), vector=item.vector or [])
                )
        for collection, points in by_collection.items():
            self._store.upsert(collection, points)

    def _write_documents(
        self, data_type: DataType, changes: list[DocumentChange], stale_ids: list[str]
    ) -> None:
        """Delete the old chunks not in the new versions, then write or delete the snapshots."""
        self._store.delete_ids(data_type.vector_collection, stale_ids)
        cleaned_points = [
            Point(
                id=document_point_id(data_type, c.entry_id),
                payload=c.cleaned.model_dump(mode="json"),
            )
            for c in changes
            if c.cleaned is not None
        ]
        self._store.upsert(data_type.cleaned_collection, cleaned_points)
        self._store.delete_ids(
            data_type.cleaned_collection,
            [document_point_id(data_type, c.entry_id) for c in changes if c.cleaned is None],
        )

    def _record_pending_chunks(
        self,
        changes: list[DocumentChange],
        previous: dict[str, SyncState | None],
        new_ids: dict[str, frozenset[str]],
        pending: PendingWrite | None,
    ) -> None:
        """Before any chunk is written, list it in its document's state (with the old version), so
        a crash before the final state still lets the replay find it. `pending`: the group's long
        document's write, recorded with it."""
        points = []
        for change in changes:
            before = previous[change.key]
            if pending is None and new_ids[change.key] <= _chunk_ids(before):
                continue
            if pending is not None and before is not None and before.pending == pending:
                continue  # a resumed write: already recorded
            points.append(
                _state_point(change, _pending_state(before, new_ids[change.key], pending))
            )
        self._store.upsert(SYNC_STATE_COLLECTION, points)

    def _write_progress(
        self,
        change: DocumentChange,
        before: SyncState | None,
        new_ids: dict[str, frozenset[str]],
        pending: PendingWrite,
    ) -> None:
        """A long document's resume point, after a slice is written."""
        state = _pending_state(before, new_ids[change.key], pending)
        self._store.upsert(SYNC_STATE_COLLECTION, [_state_point(change, state)])

    def _write_states(
        self,
        changes: list[DocumentChange],
        previous: dict[str, SyncState | None],
        new_ids: dict[str, frozenset[str]],
    ) -> None:
        points = []
        for change in changes:
            before = previous[change.key]
            # An unversioned change (the course's message shape) keeps the known version (or the
            # one being written, which it overrides), so a replayed older versioned event, or
            # the rest of that pending one, still cannot win.
            version = change.ts if change.ts is not None else _known_version(before)
            state = SyncState(
                version=version, deleted=change.cleaned is None, chunk_ids=new_ids[change.key]
            )
            points.append(_state_point(change, state))
        self._store.upsert(SYNC_STATE_COLLECTION, points)


def _groups(changes: list[DocumentChange], limit: int) -> Iterator[list[DocumentChange]]:
    """Consecutive documents of at most `limit` chunks in all; a longer one alone."""
    group: list[DocumentChange] = []
    size = 0
    for change in changes:
        if group and size + len(change.chunks) > limit:
            yield group
            group, size = [], 0
        group.append(change)
        size += len(change.chunks)
    if group:
        yield group


def _resumed(pending: PendingWrite, before: SyncState | None) -> PendingWrite:
    """Where a long document's write starts: after the chunks an earlier turn (or a run that
    died) wrote for this very version and chunk list, else at the beginning."""
    recorded = before.pending if before is not None else None
    if recorded is not None and (recorded.version, recorded.digest) == (
        pending.version,
        pending.digest,
    ):
        return recorded
    return pending


def _pending_state(
    before: SyncState | None, new_ids: frozenset[str], pending: PendingWrite | None
) -> SyncState:
    """The old version, listing the old and the new chunks, with the write in progress."""
    return SyncState(
        version=before.version if before else None,
        deleted=before.deleted if before else True,
        chunk_ids=_chunk_ids(before) | new_ids,
        pending=pending if pending is not None else (before.pending if before else None),
    )


def _known_version(state: SyncState | None) -> int | None:
    if state is None:
        return None
    versions = [
        v for v in (state.version, state.pending and state.pending.version) if v is not None
    ]
    return max(versions) if versions else None


def _chunk_ids(state: SyncState | None) -> frozenset[str]:
    return state.chunk_ids if state is not None else frozenset()


def _state_point(change: DocumentChange, state: SyncState) -> Point:
    return Point(
        id=document_point_id(change.type, change.entry_id),
        payload=state.payload(change.type, change.entry_id),
    )
