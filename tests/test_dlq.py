"""Dead letters after the fact, against the real broker: `dlq list` shows them without consuming
them, `dlq replay` sends the chosen ones back through the routing, the running pipeline applies
them once fixed, and a kill -9 mid-replay loses none."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import feature_pipeline.processing.handlers  # noqa: F401  (registers the handlers this test removes)
from feature_pipeline.connectors.files import DeadLetterFileSink
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.connectors.rabbitmq.redrive import DeadLetterQueue, Selection
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.processing.registry import Step, registry
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, drain, queue_depth, read_jsonl, settings_env
from .pipeline_process import InProcessPipeline

#: (body, error type, reason) of the dead letters most tests start from, in queue order.
POISON = [
    (b"{not json", "invalid_event", "body is not valid JSON: Expecting property name"),
    (
        b'{"type": "posts", "entry_id": "p1", "platform": "x", "author_id": "a"}',
        "invalid_document",
        "document.content: Field required",
    ),
    (b'{"type": "tweets", "entry_id": "t1", "text": "hi"}', "invalid_event", "type: bad enum"),
    (
        b'{"type": "posts", "entry_id": "p2", "platform": "x", "author_id": "a"}',
        "invalid_document",
        "document.content: Field required",
    ),
]


def dead_letter(settings: Settings, letters: list[tuple[bytes, str, str]]) -> None:
    """Dead-letter messages the way the pipeline's dead-letter sink does."""
    with EventPublisher(settings) as publisher:
        for body, error_type, reason in letters:
            publisher.publish_dead_letter(
                body, reason=reason, error_type=error_type, source_queue=settings.rabbitmq_queue
            )


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", "dlq", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done


def routed(settings: Settings) -> dict[str, list[bytes]]:
    """Every message now in a shard queue or the main queue, by queue (consumes them)."""
    queues = [settings.rabbitmq_queue, *settings.shard_queues]
    return {queue: [body for _, body in drain(settings, queue)] for queue in queues}


def test_list_shows_each_reason_oldest_first_and_consumes_nothing(settings: Settings) -> None:
    dead_letter(settings, POISON)
    listed = cli(settings, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["error_type"], r["reason"]) for r in rows] == [(e, r) for _, e, r in POISON]
    assert [(r["type"], r["entry_id"]) for r in rows] == [
        (None, None),
        ("posts", "p1"),
        ("tweets", "t1"),
        ("posts", "p2"),
    ]
    assert [r["size"] for r in rows] == [len(body) for body, _, _ in POISON]
    assert all(r["source"] == settings.rabbitmq_queue and 0 <= r["age_s"] < 60 for r in rows)

    table = cli(settings, "list", "--limit", "2")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == (
        f"4 dead letters (the first 2) in {settings.dead_letter_queue}"
    )
    assert "document.content: Field required" in table.stdout and "posts:p1" in table.stdout
    assert "tweets:t1" not in table.stdout

    # Still all there, still in order.
    assert [body for _, body in drain(settings, settings.dead_letter_queue)] == [
        body for body, _, _ in POISON
    ]


def test_replay_by_error_type_routes_by_document_and_keeps_the_rest_in_order(
    settings: Settings,
) -> None:
    dead_letter(settings, POISON)
    done = cli(settings, "replay", "--error-type", "invalid_document")
    assert done.returncode == 0, done.stderr
    assert "replayed 2 dead letters" in done.stdout and "2 left there" in done.stdout

    queues = routed(settings)
    replayed = sorted(body for bodies in queues.values() for body in bodies)
    assert replayed == sorted([POISON[1][0], POISON[3][0]])
    assert queues[settings.rabbitmq_queue] == []  # routed to their documents' shards
    left = drain(settings, settings.dead_letter_queue)
    assert [body for _, body in left] == [POISON[0][0], POISON[2][0]]
    assert [headers["x-error"] for headers, _ in left] == [POISON[0][2], POISON[2][2]]


def test_replay_by_entry_id_and_all_and_a_missing_choice(settings: Settings) -> None:
    dead_letter(settings, POISON)
    refused = cli(settings, "replay")
    assert refused.returncode == 1 and "--all" in refused.stderr
    assert queue_depth(settings, settings.dead_letter_queue) == len(POISON)

    assert "replayed 1 dead letters" in cli(settings, "replay", "--entry-id", "t1").stdout
    everything = cli(settings, "replay", "--all")
    assert "replayed 3 dead letters" in everything.stdout and "0 left there" in everything.stdout
    queues = routed(settings)
    # A body naming no document goes to the main queue, where the pipeline reads it as before.
    assert queues[settings.rabbitmq_queue] == [POISON[0][0]]
    assert sorted(b for q in settings.shard_queues for b in queues[q]) == sorted(
        body for body, _, _ in POISON[1:]
    )


def test_replayed_after_the_fix_the_running_pipeline_applies_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    posts = read_jsonl(SAMPLES / "posts.jsonl")[:3]
    events = [
        ChangeEvent(
            op=Op.INSERT,
            type=DataType.POSTS,
            entry_id=f"fix-{doc['_id']}",
            document=event_document(doc),
            ts=1,
        )
        for doc in posts
    ]
    # A release that forgot to register the posts' cleaner: every post is dead-lettered.
    monkeypatch.delitem(registry._handlers, (DataType.POSTS, Step.CLEAN))
    pipeline = InProcessPipeline(settings).start()
    try:
        before = metrics.get("dead_letters")
        with EventPublisher(settings) as publisher:
            publisher.publish(events)
        deadline = time.monotonic() + 120
        while metrics.get("dead_letters") < before + len(events):
            pipeline.check_alive()
            assert time.monotonic() < deadline, "the posts were not dead-lettered"
            time.sleep(0.1)
        with DeadLetterQueue(settings) as queue:
            listed = queue.peek(10)
        assert {r.error_type for r in listed} == {"unknown_type"}
        assert "no 'clean' handler is registered for data type 'posts'" in listed[0].reason

        monkeypatch.undo()  # the fixed release registers it again
        with EventPublisher(settings) as publisher, DeadLetterQueue(settings) as queue:
            report = queue.replay(Selection(error_type="unknown_type"), publisher)
        assert (report.replayed, report.kept) == (3, 0)

        store_ids = {e.entry_id for e in events}
        from feature_pipeline.connectors.qdrant.store import FeatureStore

        store = FeatureStore.open(settings)
        deadline = time.monotonic() + 120
        while {p.payload["entry_id"] for p in store.scroll("cleaned_posts")} != store_ids:
            pipeline.check_alive()
            assert time.monotonic() < deadline, "the replayed posts were not applied"
            time.sleep(0.1)
        assert queue_depth(settings, settings.dead_letter_queue) == 0
    finally:
        pipeline.stop()


def test_a_kill_9_during_replay_loses_nothing(settings: Settings) -> None:
    total = 3_000
    letters = [
        (
            json.dumps({"type": "posts", "entry_id": f"k{i}", "platform": "x"}).encode(),
            "invalid_document",
            "document.content: Field required",
        )
        for i in range(total)
    ]
    dead_letter(settings, letters)
    replay = subprocess.Popen(
        [sys.executable, "-m", "feature_pipeline.cli", "dlq", "replay", "--all"],
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while sum(queue_depth(settings, q) for q in settings.shard_queues) < total // 10:
            assert replay.poll() is None, "the replay ended before the kill"
            assert time.monotonic() < deadline, "the replay made no progress"
            time.sleep(0.02)
        os.kill(replay.pid, signal.SIGKILL)
    finally:
        replay.wait(timeout=30)

    # Unacked dead letters went back to the queue: each message is in the DLQ or a shard.
    in_shards = [b for q in settings.shard_queues for _, b in drain(settings, q)]
    in_dlq = [b for _, b in drain(settings, settings.dead_letter_queue)]
    assert 0 < len(in_shards) < total
    assert set(in_shards) | set(in_dlq) == {body for body, _, _ in letters}
    # At most the one message between its confirm and its ack is in both.
    assert len(in_shards) + len(in_dlq) - total <= 1


def test_replay_from_a_backfill_dead_letter_file(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    sink = DeadLetterFileSink(path).build_part("dlq", "dead-letters", None)
    sink.write_batch(
        [
            DeadLetter(source=f"posts.jsonl:{i}", body=b, reason=r, error_type=e)
            for i, (b, e, r) in enumerate(POISON)
        ]
    )
    sink.close()
    listed = cli(settings, "list", "--file", str(path), "--json")
    assert [json.loads(line)["error_type"] for line in listed.stdout.splitlines()] == [
        e for _, e, _ in POISON
    ]
    done = cli(settings, "replay", "--file", str(path), "--error-type", "invalid_document")
    assert done.returncode == 0, done.stderr
    assert "replayed 2 dead letters" in done.stdout
    assert sorted(b for bodies in routed(settings).values() for b in bodies) == sorted(
        [POISON[1][0], POISON[3][0]]
    )
    assert [json.loads(line)["body"] for line in path.read_text().splitlines()] == [
        POISON[0][0].decode(),
        POISON[2][0].decode(),
    ]
