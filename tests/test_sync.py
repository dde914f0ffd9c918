"""The sync logic on the real embedded store and the real model: versions, tombstones, reuse."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import SYNC_STATE_COLLECTION, FeatureStore
from feature_pipeline.domain.changes import DocumentChange
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing.embedding import embedder_for
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings
from feature_pipeline.sync import FeatureSync

from .conftest import SAMPLES, read_jsonl

ARTICLE = read_jsonl(SAMPLES / "articles.jsonl")[0]
POST = read_jsonl(SAMPLES / "posts.jsonl")[0]


@pytest.fixture
def sync(settings: Settings) -> Iterator[FeatureSync]:
    yield build_sync(settings)


@pytest.fixture
def processor(settings: Settings) -> DocumentProcessor:
    return DocumentProcessor(settings)


def change(
    processor: DocumentProcessor,
    data_type: DataType,
    entry_id: str,
    document: dict | None,
    ts: int | None,
) -> DocumentChange:
    body = None if document is None else event_document(document)
    op = Op.DELETE if document is None else Op.UPDATE
    return processor.process_event(
        ChangeEvent(op=op, type=data_type, entry_id=entry_id, document=body, ts=ts)
    )


def chunk_contents(store: FeatureStore, data_type: DataType, entry_id: str) -> list[str]:
    points = [
        p for p in store.scroll(data_type.vector_collection) if p.payload["entry_id"] == entry_id
    ]
    return [p.payload["content"] for p in sorted(points, key=lambda p: p.payload["chunk_index"])]


def cleaned(store: FeatureStore, data_type: DataType, entry_id: str) -> str | None:
    for point in store.scroll(data_type.cleaned_collection):
        if point.payload["entry_id"] == entry_id:
            return point.payload["cleaned_content"]
    return None


def test_editing_one_paragraph_re_embeds_only_the_changed_chunks(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    original = change(processor, DataType.ARTICLES, "a", ARTICLE, ts=1)
    assert len(original.chunks) >= 8, "the sample article should be long"
    first = sync.apply([original])
    assert first.embedded == len(original.chunks) and first.reused == 0

    text = ARTICLE["content"]["Content"]
    middle = len(text) // 2
    edited_doc = {
        **ARTICLE,
        "content": {
            **ARTICLE["content"],
            "Content": text[:middle] + " A NEW SENTENCE. " + text[middle:],
        },
    }
    edited = change(processor, DataType.ARTICLES, "a", edited_doc, ts=2)
    second = sync.apply([edited])
    print(f"chunks: {len(edited.chunks)}, re-embedded after a one-sentence edit: {second.embedded}")
    assert 1 <= second.embedded <= 3
    assert second.reused == len(edited.chunks) - second.embedded
    assert chunk_contents(store, DataType.ARTICLES, "a") == [c.content for c in edited.chunks]


def test_delete_leaves_a_tombstone_that_older_replays_cannot_pass(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    sync.apply([change(processor, DataType.POSTS, "p", POST, ts=5)])
    assert chunk_contents(store, DataType.POSTS, "p")
    sync.apply([change(processor, DataType.POSTS, "p", None, ts=6)])
    assert cleaned(store, DataType.POSTS, "p") is None
    assert chunk_contents(store, DataType.POSTS, "p") == []

    replay = sync.apply([change(processor, DataType.POSTS, "p", POST, ts=5)])
    assert (replay.applied, replay.stale) == (0, 1)
    assert cleaned(store, DataType.POSTS, "p") is None

    reinsert = sync.apply([change(processor, DataType.POSTS, "p", POST, ts=7)])
    assert reinsert.applied == 1
    assert cleaned(store, DataType.POSTS, "p") is not None


def test_redelivery_changes_nothing(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    event = change(processor, DataType.POSTS, "p", POST, ts=3)
    sync.apply([event])
    before = {p.id: p.payload for p in store.scroll("vector_posts")}
    again = sync.apply([event, event])
    assert (again.applied, again.embedded) == (0, 0)
    assert {p.id: p.payload for p in store.scroll("vector_posts")} == before


def test_only_the_newest_change_in_a_batch_is_applied(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    empty = {**POST, "content": {"text": ""}}
    report = sync.apply(
        [
            change(processor, DataType.POSTS, "p", POST, ts=9),
            change(processor, DataType.POSTS, "p", empty, ts=8),  # older, arrives late
            change(processor, DataType.POSTS, "q", POST, ts=1),
        ]
    )
    assert (report.applied, report.superseded) == (2, 1)
    assert chunk_contents(store, DataType.POSTS, "p") == chunk_contents(store, DataType.POSTS, "q")


def test_an_empty_document_has_a_snapshot_and_no_chunks(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    sync.apply([change(processor, DataType.POSTS, "p", POST, ts=1)])
    image_only = {**POST, "content": {"text": "🚀🔥 → ✨"}, "image": "https://x/y.png"}
    sync.apply([change(processor, DataType.POSTS, "p", image_only, ts=2)])
    assert cleaned(store, DataType.POSTS, "p") == ""
    assert chunk_contents(store, DataType.POSTS, "p") == []


def test_unversioned_course_messages_keep_the_known_version(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    sync.apply([change(processor, DataType.POSTS, "p", POST, ts=10)])
    sync.apply(
        [change(processor, DataType.POSTS, "p", {**POST, "content": {"text": "new"}}, ts=None)]
    )
    assert cleaned(store, DataType.POSTS, "p") == "new"
    stale = sync.apply([change(processor, DataType.POSTS, "p", POST, ts=4)])
    assert stale.stale == 1 and cleaned(store, DataType.POSTS, "p") == "new"


def test_metrics_count_embeddings(settings: Settings, processor: DocumentProcessor) -> None:
    own = Metrics()
    sync = build_sync(settings, own)
    event = change(processor, DataType.POSTS, "p", POST, ts=1)
    sync.apply([event])
    assert own.get("chunks_embedded") == len(event.chunks)
    assert own.get("events_applied") == 1
    in_model, applying = own.get("embedding_seconds"), own.get("apply_seconds")
    assert 0 < in_model < applying

    # A metadata-only change reuses every vector: time is spent applying it, none in the model.
    again = change(processor, DataType.POSTS, "p", {**POST, "image": "https://x.test/a.png"}, ts=2)
    sync.apply([again])
    assert own.get("chunks_reused") == len(again.chunks)
    assert own.get("embedding_seconds") == in_model
    assert own.get("apply_seconds") > applying
    assert "feature_pipeline_embedding_seconds_total " in own.prometheus()


class _CrashBeforeFinalState:
    """The real store, failing on the final sync-state write of one batch: a process dying
    after the chunks were written but before the new version was recorded."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store
        self._state_writes = 0

    def upsert(self, collection: str, points: list) -> None:
        if collection == SYNC_STATE_COLLECTION:
            self._state_writes += 1
            if self._state_writes == 2:
                raise ConnectionError("killed before the final state")
        self._store.upsert(collection, points)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def test_a_crash_before_the_final_state_leaves_no_orphan_chunks(
    settings: Settings, sync: FeatureSync, processor: DocumentProcessor
) -> None:
    store = FeatureStore.open(settings)
    sync.apply([change(processor, DataType.ARTICLES, "a", ARTICLE, ts=1)])
    text = ARTICLE["content"]["Content"]
    v2 = {**ARTICLE, "content": {**ARTICLE["content"], "Content": "Version two. " + text[:3000]}}
    crashing = FeatureSync(
        _CrashBeforeFinalState(store),  # type: ignore[arg-type]
        lambda t: embedder_for(settings, t),
        Metrics(),
        settings.embedding_batch_size_for("cpu"),
    )
    with pytest.raises(ConnectionError):
        crashing.apply([change(processor, DataType.ARTICLES, "a", v2, ts=2)])
    # The replay brings a newer version whose chunks share nothing with version two's.
    v3 = {
        **ARTICLE,
        "content": {**ARTICLE["content"], "Content": "Version three. " + text[5000:8000]},
    }
    final = change(processor, DataType.ARTICLES, "a", v3, ts=3)
    sync.apply([final])
    assert chunk_contents(store, DataType.ARTICLES, "a") == [c.content for c in final.chunks]
