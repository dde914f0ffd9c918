"""Oracle tests: random insert/update/delete sequences through the real pipeline must leave the
store equal to a from-scratch index of the final warehouse state (issue: exact sync).

The sequences run over a dozen documents of all three types, with edits that change one
paragraph, empty documents, deletes and re-inserts after delete; with 1 and 2 workers in
process (hypothesis), and with a kill -9 and restart in the middle (seeded sequences).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from feature_pipeline.connectors.qdrant.store import FeatureStore, close_stores
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings, load_settings

from .conftest import SAMPLES, delete_topology, queue_depths, read_jsonl
from .pipeline_process import InProcessPipeline, PipelineProcess

pytestmark = pytest.mark.slow


def _paragraphs(text: str, size: int = 400) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _base_documents() -> list[tuple[DataType, dict[str, Any]]]:
    posts = sorted(read_jsonl(SAMPLES / "posts.jsonl"), key=lambda d: len(d["content"]["text"]))
    article = read_jsonl(SAMPLES / "articles.jsonl")[2]
    repository = read_jsonl(SAMPLES / "repositories.jsonl")[1]
    docs: list[tuple[DataType, dict[str, Any]]] = [
        (DataType.POSTS, posts[i]) for i in (5, 30, 60, 86)
    ]
    short_article = {
        **article,
        "content": {**article["content"], "Content": article["content"]["Content"][:2400]},
    }
    docs += [(DataType.ARTICLES, short_article)]
    small_repo = {
        **repository,
        "content": {p: t[:1500] for p, t in sorted(repository["content"].items())[:3]},
    }
    docs += [(DataType.REPOSITORIES, small_repo)]
    return [(t, event_document(d)) for t, d in docs]


BASE = _base_documents()


def variant(data_type: DataType, document: dict[str, Any], kind: int) -> dict[str, Any]:
    """0: as is; 1: one paragraph edited; 2: empty; 3: a paragraph appended."""
    if kind == 0:
        return document

    def edit(text: str) -> str:
        if kind == 2:
            return ""
        parts = _paragraphs(text)
        if kind == 1:
            middle = len(parts) // 2
            parts[middle] = "EDITED: this paragraph was rewritten by an update. " + parts[middle]
            return "".join(parts)
        return text + "\n\nAn appended closing paragraph about streaming feature pipelines."

    if data_type is DataType.POSTS:
        return {**document, "content": {"text": edit(document["content"]["text"])}}
    if data_type is DataType.ARTICLES:
        return {
            **document,
            "content": {**document["content"], "Content": edit(document["content"]["Content"])},
        }
    files = dict(document["content"])
    first = sorted(files)[0]
    files[first] = edit(files[first])
    return {**document, "content": files}


Operation = tuple[str, int, int]  # ("upsert" | "delete", document index, variant kind)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.integers(0, len(BASE) - 1), st.integers(0, 3)),
        st.tuples(st.just("delete"), st.integers(0, len(BASE) - 1), st.just(0)),
    ),
    min_size=1,
    max_size=24,
)


def to_events(
    namespace: str, ops: list[Operation]
) -> tuple[list[ChangeEvent], dict[str, ChangeEvent]]:
    """The events to publish, and the final warehouse state (key -> last upsert; deleted: absent)."""
    events, final = [], {}
    for ts, (kind, index, variant_kind) in enumerate(ops, start=1):
        data_type, document = BASE[index]
        entry_id = f"{namespace}-{index}"
        if kind == "delete":
            event = ChangeEvent(op=Op.DELETE, type=data_type, entry_id=entry_id, ts=ts)
            final.pop(f"{data_type.value}:{entry_id}", None)
        else:
            body = variant(data_type, document, variant_kind)
            event = ChangeEvent(
                op=Op.UPDATE, type=data_type, entry_id=entry_id, document=body, ts=ts
            )
            final[f"{data_type.value}:{entry_id}"] = event
        events.append(event)
    return events, final


def expected_state(settings: Settings, final: dict[str, ChangeEvent]) -> tuple[dict, set]:
    processor = DocumentProcessor(settings)
    cleaned, chunks = {}, set()
    for event in final.values():
        change = processor.process_event(event)
        assert change.cleaned is not None
        cleaned[(event.type.value, event.entry_id)] = change.cleaned.cleaned_content
        chunks |= {(event.type.value, c.entry_id, c.chunk_index, c.content) for c in change.chunks}
    return cleaned, chunks


def actual_state(store: FeatureStore, namespace: str) -> tuple[dict, set]:
    cleaned, chunks = {}, set()
    for data_type in DataType:
        for point in store.scroll(data_type.cleaned_collection):
            if point.payload["entry_id"].startswith(namespace):
                cleaned[(data_type.value, point.payload["entry_id"])] = point.payload[
                    "cleaned_content"
                ]
        for point in store.scroll(data_type.vector_collection):
            p = point.payload
            if p["entry_id"].startswith(namespace):
                chunks.add((data_type.value, p["entry_id"], p["chunk_index"], p["content"]))
    return cleaned, chunks


def handled(counts: dict[str, Any]) -> int:
    """Messages the sink has finished with: each ends in exactly one of these counters."""
    names = ("events_applied", "events_superseded", "events_stale", "dead_letters")
    return int(sum(counts.get(name, 0) for name in names))


def processed() -> int:
    return handled(metrics.snapshot())


def oracle_settings(tmp_path: Path, name: str) -> Settings:
    return load_settings(
        _env_file=None,
        rabbitmq_queue=f"test-oracle-{uuid.uuid4().hex[:10]}",
        rabbitmq_shards=2,
        qdrant_path=tmp_path / name,
        batch_max_wait_ms=10,
        epoch_interval_ms=200,
        query_port=0,
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def running(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessPipeline]:
    settings = oracle_settings(tmp_path_factory.mktemp("oracle"), "qdrant")
    pipeline = InProcessPipeline(settings, workers=request.param).start()
    yield pipeline
    pipeline.stop()
    close_stores()
    delete_topology(settings)


@hypothesis_settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_random_sequences_leave_the_store_equal_to_the_warehouse(
    running: InProcessPipeline, ops: list[Operation]
) -> None:
    settings = running.settings
    namespace = uuid.uuid4().hex[:8]
    events, final = to_events(namespace, ops)
    before = processed()
    with EventPublisher(settings) as publisher:
        publisher.publish(events)
    deadline = time.monotonic() + 120
    while processed() - before < len(events):
        running.check_alive()
        assert time.monotonic() < deadline, f"only {processed() - before}/{len(events)} processed"
        time.sleep(0.05)
    assert actual_state(FeatureStore.open(settings), namespace) == expected_state(settings, final)


@pytest.mark.parametrize("seed", [7, 2024])
def test_kill_9_in_the_middle_of_a_sequence(seed: int, tmp_path: Path) -> None:
    settings = oracle_settings(tmp_path, "qdrant")
    rng = random.Random(seed)
    namespace = f"crash{seed}"
    ops: list[Operation] = [
        ("delete", rng.randrange(len(BASE)), 0)
        if rng.random() < 0.2
        else ("upsert", rng.randrange(len(BASE)), rng.randrange(4))
        for _ in range(160)
    ]
    # Spread the sequence over more documents: the same operations on three copies of the set.
    events: list[ChangeEvent] = []
    final: dict[str, ChangeEvent] = {}
    for copy in range(3):
        copy_events, copy_final = to_events(f"{namespace}-{copy}", ops)
        events += copy_events
        final |= copy_final
    log = tmp_path / "pipeline.log"
    try:
        with EventPublisher(settings) as publisher:
            publisher.publish(events)
        first = PipelineProcess(settings, log).start()
        first.wait_for(lambda p: handled(p.metrics()) >= 100, what="part of the backlog")
        first.kill()
        # Restart (with two workers this time) until every message is acknowledged.
        for _ in range(5):
            again = PipelineProcess(settings, log, workers=2).start()
            again.wait_for(PipelineProcess.drained, what="the queues to drain")
            assert again.stop() == 0
            if queue_depths(settings) == 0:
                break
        assert queue_depths(settings) == 0
        assert actual_state(FeatureStore.open(settings), namespace) == expected_state(
            settings, final
        )
    finally:
        close_stores()
        delete_topology(settings)
