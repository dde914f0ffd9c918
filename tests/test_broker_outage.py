"""Infrastructure failures are retried, never dead-lettered: the broker drops every connection
mid-stream, and the running pipeline reconnects and still indexes every document once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, queue_depth, read_jsonl
from .pipeline_process import InProcessPipeline

pytestmark = pytest.mark.slow


def events(prefix: str) -> list[ChangeEvent]:
    posts = read_jsonl(SAMPLES / "posts.jsonl")[:30]
    return [
        ChangeEvent(
            op=Op.INSERT,
            type=DataType.POSTS,
            entry_id=f"{prefix}-{doc['_id']}",
            document=event_document(doc),
            ts=1,
        )
        for doc in posts
    ]


def cleaned_ids(settings: Settings) -> set[str]:
    return {p.payload["entry_id"] for p in FeatureStore.open(settings).scroll("cleaned_posts")}


def wait_until(
    condition: Callable[[], bool], pipeline: InProcessPipeline, timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        pipeline.check_alive()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_pipeline_reconnects_after_the_broker_drops_its_connections(
    settings: Settings, tmp_path: Path
) -> None:
    pipeline = InProcessPipeline(settings).start()
    dead_letters_before = metrics.get("dead_letters")
    try:
        first, second = events("before"), events("after")
        with EventPublisher(settings) as publisher:
            publisher.publish(first)
            publisher.publish_raw(b"{not json")  # opens the dead-letter sink's connection
        wait_until(lambda: {e.entry_id for e in first} <= cleaned_ids(settings), pipeline)
        wait_until(lambda: metrics.get("dead_letters") == dead_letters_before + 1, pipeline)

        closed = subprocess.run(
            ["rabbitmqctl", "close_all_connections", "outage test"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert closed.returncode == 0, closed.stderr
        with EventPublisher(settings) as publisher:
            publisher.publish(second)
            publisher.publish_raw(b"{still not json")  # the dead-letter sink must reconnect too
        wait_until(lambda: {e.entry_id for e in second} <= cleaned_ids(settings), pipeline)
        wait_until(lambda: metrics.get("dead_letters") == dead_letters_before + 2, pipeline)
    finally:
        pipeline.stop()
    assert cleaned_ids(settings) == {e.entry_id for e in first + second}
    assert queue_depth(settings, settings.dead_letter_queue) == 2
