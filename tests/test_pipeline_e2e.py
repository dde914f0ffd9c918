"""End to end on real parts: RabbitMQ -> `feature-pipeline run` (subprocess) -> embedded Qdrant."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore, close_stores
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, drain, queue_depth, read_jsonl, settings_env
from .pipeline_process import PipelineProcess

pytestmark = pytest.mark.slow


def upsert(data_type: DataType, document: dict, ts: int | None = None) -> ChangeEvent:
    doc = dict(document)
    entry_id = str(doc.pop("_id"))
    return ChangeEvent(op=Op.INSERT, type=data_type, entry_id=entry_id, document=doc, ts=ts)


def expected_chunks(settings: Settings, events: list[ChangeEvent]) -> set[tuple[str, int, str]]:
    """(entry_id, chunk_index, content) of a from-scratch processing of the final documents."""
    processor = DocumentProcessor(settings)
    result = set()
    for event in events:
        change = processor.process_event(event)
        result |= {(c.entry_id, c.chunk_index, c.content) for c in change.chunks}
    return result


def stored_chunks(settings: Settings, data_types: list[DataType]) -> list[tuple[str, int, str]]:
    store = FeatureStore.open(settings)
    points = [p for t in data_types for p in store.scroll(t.vector_collection)]
    return [(p.payload["entry_id"], p.payload["chunk_index"], p.payload["content"]) for p in points]


def test_three_types_both_shapes_mixed_batch(settings: Settings, tmp_path: Path) -> None:
    posts = read_jsonl(SAMPLES / "posts.jsonl")[:6]
    articles = read_jsonl(SAMPLES / "articles.jsonl")[:1]
    repos = read_jsonl(SAMPLES / "repositories.jsonl")[:1]
    events = (
        [upsert(DataType.POSTS, d, ts=1) for d in posts[:3]]
        + [upsert(DataType.ARTICLES, d, ts=1) for d in articles]
        + [upsert(DataType.REPOSITORIES, d, ts=1) for d in repos]
    )
    with EventPublisher(settings) as publisher:
        publisher.publish(events)  # routed, envelope shape, mixed types in one batch
        for doc in posts[3:]:  # the course's CDC: flat shape, straight to the main queue
            body = event_document(doc)
            publisher.publish_raw(
                json.dumps({**body, "type": "posts", "entry_id": doc["_id"]}).encode()
            )
    pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
    want = {"cleaned_posts": 6, "cleaned_articles": 1, "cleaned_repositories": 1}
    pipeline.wait_for(
        lambda p: all(p.counts().get(k) == v for k, v in want.items()), what="documents indexed"
    )
    hits = pipeline.search("streaming pipelines and vector databases", "articles", k=3)
    assert hits and hits[0]["entry_id"] == articles[0]["_id"]
    # While `run` holds the embedded store, `points` asks it, as `search` and `counts` do.
    listed = subprocess.run(
        [
            *(sys.executable, "-m", "feature_pipeline.cli", "points", "vector_articles"),
            *("--entry-id", articles[0]["_id"], "--with-vectors", "--limit", "2"),
        ],
        env=settings_env(settings) | {"QUERY_PORT": str(pipeline.port)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 2
    assert all(r["payload"]["entry_id"] == articles[0]["_id"] for r in rows)
    assert all(len(r["vector"]) == 384 for r in rows)
    assert pipeline.stop() == 0
    assert "stopping" in pipeline.log()

    all_events = events + [upsert(DataType.POSTS, d) for d in posts[3:]]
    assert sorted(stored_chunks(settings, list(DataType))) == sorted(
        expected_chunks(settings, all_events)
    )
    store = FeatureStore.open(settings)
    post = next(
        p.payload for p in store.scroll("cleaned_posts") if p.payload["entry_id"] == posts[0]["_id"]
    )
    assert set(post) >= {"cleaned_content", "platform", "author_id", "image", "type", "entry_id"}
    chunk = store.scroll("vector_repositories")[0].payload
    assert set(chunk) >= {
        "content",
        "entry_id",
        "link",
        "owner_id",
        "name",
        "type",
        "chunk_index",
        "content_hash",
        "model",
    }
    for queue in [settings.rabbitmq_queue, *settings.shard_queues]:
        assert queue_depth(settings, queue) == 0, f"{queue} still holds unacked or unread messages"


def test_poison_messages_are_dead_lettered_and_the_pipeline_goes_on(
    settings: Settings, tmp_path: Path
) -> None:
    good = read_jsonl(SAMPLES / "posts.jsonl")[0]
    poison = {
        b"{this is not json": "invalid_event",
        b'{"type": "tweets", "entry_id": "t1", "text": "hi"}': "invalid_event",
        b'{"type": "posts", "platform": "x", "content": {"text": "no id"}, "author_id": "a"}': "invalid_event",
        b'{"type": "posts", "entry_id": "p1", "platform": "x", "author_id": "a"}': "invalid_document",
        b'{"type": "articles", "entry_id": "a1", "platform": "m", "link": 5, "author_id": "a",'
        b' "content": {"Title": "t", "Content": "c"}}': "invalid_document",
        b'{"op": "update", "type": "posts", "entry_id": "p2"}': "invalid_event",
    }
    with EventPublisher(settings) as publisher:
        for body in poison:
            publisher.publish_raw(body)
        publisher.publish([upsert(DataType.POSTS, good, ts=1)])
    pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
    pipeline.wait_for(lambda p: p.counts().get("cleaned_posts") == 1, what="the good post")
    pipeline.wait_for(lambda p: p.metrics().get("dead_letters") == len(poison), what="dead letters")
    assert pipeline.stop() == 0
    dead = drain(settings, settings.dead_letter_queue)
    assert {body: headers["x-error-type"] for headers, body in dead} == poison
    for headers, _ in dead:
        assert headers["x-error"] and headers["x-source-queue"] == settings.rabbitmq_queue
    assert queue_depth(settings, settings.rabbitmq_queue) == 0


def test_kill_9_mid_stream_loses_nothing_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    posts = read_jsonl(SAMPLES / "posts.jsonl")
    # A backlog of distinct documents: every sample post under a few ids.
    events = [
        upsert(DataType.POSTS, {**doc, "_id": f"{doc['_id']}-{copy}"}, ts=1)
        for copy in range(3)
        for doc in posts
    ]
    with EventPublisher(settings) as publisher:
        publisher.publish(events)
    log = tmp_path / "pipeline.log"
    first = PipelineProcess(settings, log).start()
    first.wait_for(lambda p: p.counts().get("cleaned_posts", 0) >= 40, what="a partial index")
    first.kill()
    second = PipelineProcess(settings, log).start()
    second.wait_for(
        lambda p: p.counts().get("cleaned_posts") == len(events), what="the whole backlog"
    )
    second.wait_for(PipelineProcess.drained, what="every message acknowledged")
    assert second.stop() == 0
    close_stores()
    chunks = stored_chunks(settings, [DataType.POSTS])
    assert len(chunks) == len(set(chunks)), "duplicate chunk points"
    assert set(chunks) == expected_chunks(settings, events)
    for queue in [settings.rabbitmq_queue, *settings.shard_queues]:
        assert queue_depth(settings, queue) == 0


def test_a_second_pipeline_on_the_same_queues_stands_by_then_takes_over(
    settings: Settings, tmp_path: Path
) -> None:
    """Two consumers on one shard queue would interleave a document's events; the second
    `run` must wait instead, and take over, losing nothing, when the first one dies."""
    posts = read_jsonl(SAMPLES / "posts.jsonl")[:6]
    first = PipelineProcess(settings, tmp_path / "first.log").start()
    # Its own embedded store, so the two can run at once (a Qdrant server would be shared).
    standby_settings = settings.model_copy(update={"qdrant_path": tmp_path / "standby-qdrant"})
    standby = PipelineProcess(standby_settings, tmp_path / "standby.log").start()
    standby.wait_for(lambda p: "standing by" in p.log(), timeout_s=60, what="the standby")

    with EventPublisher(settings) as publisher:
        publisher.publish(
            upsert(DataType.POSTS, {**doc, "_id": f"a-{doc['_id']}"}) for doc in posts
        )
    first.wait_for(lambda p: p.counts().get("cleaned_posts") == len(posts), what="the first")
    time.sleep(1.0)  # one more epoch: everything written is acked
    assert standby.counts().get("cleaned_posts", 0) == 0
    first.kill()

    later = [upsert(DataType.POSTS, {**doc, "_id": f"b-{doc['_id']}"}) for doc in posts]
    with EventPublisher(settings) as publisher:
        publisher.publish(later)
    standby.wait_for(lambda p: p.counts().get("cleaned_posts") == len(later), what="the take-over")
    assert standby.stop() == 0
    close_stores()
    stored = {entry_id for entry_id, _, _ in stored_chunks(standby_settings, [DataType.POSTS])}
    assert stored == {event.entry_id for event in later}
