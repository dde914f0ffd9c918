"""Fault injection against the real broker, store and model (issue 11): seeded fuzzed messages
mixed with valid ones on the pipeline's own queues, the broker closing the pipeline's connections
under load, and kill -9 at random moments. Each fuzzed message must be dead-lettered exactly once
(by `x-dead-letter-id`) with a reason, every valid one indexed as a clean run would index it, the
process up throughout the closes, and no traceback in its log.

Default counts fit the suite; FAULT_FUZZED=1000 FAULT_KILLS=20 run the issue's full counts
(FAULT_CLOSES, FAULT_VALID and FAULT_SEED too).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pika
import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore, close_stores
from feature_pipeline.connectors.rabbitmq.publisher import DEAD_LETTER_ID_HEADER, EventPublisher
from feature_pipeline.connectors.rabbitmq.topology import consumed_queues, router_exchange
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, load_settings

from .conftest import SAMPLES, delete_topology, drain, queue_depths, read_jsonl
from .pipeline_process import PipelineProcess
from .test_oracle import BASE, Operation, actual_state, expected_state, handled, to_events

pytestmark = [pytest.mark.faults, pytest.mark.slow]

FUZZED = int(os.environ.get("FAULT_FUZZED", "300"))
VALID = int(os.environ.get("FAULT_VALID", "40"))
CLOSES = int(os.environ.get("FAULT_CLOSES", "5"))
KILLS = int(os.environ.get("FAULT_KILLS", "3"))
SEED = int(os.environ.get("FAULT_SEED", "11"))
#: A 5 MB string costs the broker, the parser and the dead-letter queue 5 MB each: a few.
HUGE_EVERY = 100
HUGE_BYTES = 5 * 1024 * 1024

KINDS = (
    "truncated",
    "wrong_type",
    "null",
    "unknown_type",
    "non_utf8",
    "empty",
    "array",
    "deep",
    "bad_version",
    "course_shape_wrong",
)


def _valid_envelope(i: int) -> dict[str, Any]:
    return {
        "op": "update",
        "type": "posts",
        "entry_id": f"fuzz-{i}",
        "ts": i + 1,
        "document": {
            "platform": "linkedin",
            "author_id": "a",
            "content": {"text": f"fuzz {i}"},
        },
    }


def fuzz_body(rng: random.Random, i: int, kind: str) -> bytes:
    """One malformed message of `kind`; random within it, never a valid event."""
    event = _valid_envelope(i)
    if kind == "truncated":
        text = json.dumps(event).encode()
        return text[: rng.randrange(1, len(text) - 1)]  # an object without its closing brace
    if kind == "wrong_type":
        field, value = rng.choice(
            [("entry_id", i), ("type", 7), ("op", ["update"]), ("document", "text"), ("ts", "soon")]
        )
        return json.dumps({**event, field: value}).encode()
    if kind == "null":
        field = rng.choice(["type", "entry_id", "op", "document"])
        return json.dumps({**event, field: None}).encode()
    if kind == "unknown_type":
        return json.dumps({**event, "type": rng.choice(["tweets", "videos", ""])}).encode()
    if kind == "non_utf8":
        return (
            b'{"op": "update", "type": "posts", "entry_id": "\xc3\x28\xa0'
            + bytes([i % 256])
            + b'"}'
        )
    if kind == "empty":
        return b""
    if kind == "array":
        return json.dumps(rng.choice([[], [event], [1, 2, i]])).encode()
    if kind == "deep":
        if rng.random() < 0.5:
            return b"[" * 10_000 + b"]" * 10_000
        return b'{"a":' * 10_000 + str(i).encode() + b"}" * 10_000
    if kind == "bad_version":
        ts = rng.choice(["-1", "1.5", str(2**63), "1e300", "NaN", "9" * 5_000])
        return json.dumps({**event, "ts": 0}).encode().replace(b'"ts": 0', b'"ts": ' + ts.encode())
    if kind == "course_shape_wrong":  # the course's flat document, with fields of wrong types
        return json.dumps(
            {"type": "posts", "entry_id": f"c{i}", "content": rng.choice([5, None, "x"])}
        ).encode()
    if kind == "huge":
        return json.dumps({**event, "type": "x" * HUGE_BYTES}).encode()
    raise ValueError(kind)


def fuzzed(rng: random.Random, count: int, start: int) -> list[bytes]:
    bodies = []
    for n in range(count):
        i = start + n
        kind = "huge" if n % HUGE_EVERY == HUGE_EVERY - 1 else KINDS[rng.randrange(len(KINDS))]
        bodies.append(fuzz_body(rng, i, kind))
    return bodies


def valid_ops(rng: random.Random, count: int) -> list[Operation]:
    return [
        ("delete", rng.randrange(len(BASE)), 0)
        if rng.random() < 0.15
        else ("upsert", rng.randrange(len(BASE)), rng.randrange(4))
        for _ in range(count)
    ]


def publish_mixed(
    settings: Settings, rng: random.Random, events: list[ChangeEvent], poison: list[bytes], tag: str
) -> None:
    """Valid events through the routing (as our producers do), fuzzed ones interleaved at random,
    each to the main queue (as the course's CDC does) or to a shard, with a message-id."""
    # Where the fuzzed ones go among the valid ones; the valid ones keep their order.
    slots = [True] * len(events) + [False] * len(poison)
    rng.shuffle(slots)
    valid, bad = iter(events), iter(poison)
    queue: list[ChangeEvent | bytes] = [next(valid) if slot else next(bad) for slot in slots]
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    channel = connection.channel()
    channel.confirm_delivery()
    with EventPublisher(settings) as publisher:
        for k, item in enumerate(queue):
            if isinstance(item, ChangeEvent):
                publisher.publish([item])
                continue
            to_shard = rng.random() < 0.5
            channel.basic_publish(
                exchange=router_exchange(settings) if to_shard else "",
                routing_key=f"posts:{tag}-{k}" if to_shard else settings.rabbitmq_queue,
                body=item,
                properties=pika.BasicProperties(message_id=f"{tag}-{k}", delivery_mode=2),
                mandatory=True,
            )
    connection.close()


def pipeline_connections(pid: int) -> list[str]:
    """The broker's ids of a process's connections (named by `connect`)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    marker = f'"feature-pipeline pid {pid}"'
    return [line.split("\t", 1)[0] for line in listed.splitlines() if marker in line]


def close_connections(ids: list[str]) -> None:
    for connection_id in ids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", connection_id, "fault injection"],
            capture_output=True,
            timeout=60,
            check=False,  # a short-lived one (a dead-letter queue scan) may be gone already
        )


def consuming_connections(pipeline: PipelineProcess, settings: Settings) -> list[str]:
    """The pipeline's connections, once it is ready and each queue's consumer is connected."""
    assert pipeline.process is not None
    found: list[str] = []

    def consuming(p: PipelineProcess) -> bool:
        found[:] = pipeline_connections(p.process.pid)
        return is_ready(p) and len(found) >= len(consumed_queues(settings))

    pipeline.wait_for(consuming, timeout_s=120, what="the pipeline to consume again")
    return found


def is_ready(pipeline: PipelineProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pipeline.port}/ready", timeout=30):
            return True
    except urllib.error.HTTPError:
        return False


def all_handled(pipeline: PipelineProcess, published: int) -> bool:
    totals = pipeline.metrics()
    return handled(totals) + totals.get("dead_letters_repeated", 0) >= published


def idle(pipeline: PipelineProcess) -> bool:
    """Drained, and every message it took out of its buffer handled."""
    totals = pipeline.metrics()
    done = handled(totals) + totals.get("dead_letters_repeated", 0)
    done += totals.get("events_continued", 0)  # each turn's message, queued again
    return pipeline.drained() and totals.get("events_received", 0) == done


def tracebacks(log: str) -> list[str]:
    """The exception line ending each traceback in the log."""
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in block.splitlines() if line and not line.startswith(" ")]
        found.append(lines[0] if lines else "?")
    return found


def test_fuzzed_messages_broker_closes_and_kill_9(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    prefix = f"fz{SEED}x{rng.randrange(10**6)}"
    settings = load_settings(
        _env_file=None,
        rabbitmq_queue=f"test-faults-{uuid.uuid4().hex[:12]}",  # runs may overlap
        rabbitmq_shards=2,
        qdrant_path=tmp_path / "qdrant",
        batch_max_wait_ms=10,
        epoch_interval_ms=200,
        query_port=0,
        embedding_backend="fp32",  # no backend timing at each of the restarts
    )
    log = tmp_path / "pipeline.log"
    poison: list[bytes] = []
    final: dict[str, ChangeEvent] = {}

    def add_load(phase: int, fuzz_count: int) -> int:
        events, phase_final = to_events(f"{prefix}-{phase}", valid_ops(rng, VALID))
        bodies = fuzzed(rng, fuzz_count, start=len(poison))
        publish_mixed(settings, rng, events, bodies, tag=f"{prefix}-{phase}")
        poison.extend(bodies)
        final.update(phase_final)
        return len(events) + len(bodies)

    try:
        # 1. Fuzzed messages among valid ones: each dead-lettered, the pipeline never stops.
        published = add_load(1, FUZZED)
        pipeline = PipelineProcess(settings, log).start()
        pid = pipeline.process.pid
        pipeline.wait_for(lambda p: all_handled(p, published), timeout_s=600, what="phase 1")

        # 2. The broker closes every connection of the pipeline, under load.
        published += add_load(2, max(10, FUZZED // 10))
        for _ in range(CLOSES):
            close_connections(consuming_connections(pipeline, settings))
            time.sleep(rng.uniform(0.2, 1.5))
        pipeline.wait_for(is_ready, timeout_s=120, what="readiness after the closes")
        pipeline.wait_for(lambda p: all_handled(p, published), timeout_s=600, what="phase 2")
        assert pipeline.process.pid == pid and pipeline.process.poll() is None

        # 3. kill -9 at random moments, restart; the last run drains and stops cleanly.
        add_load(3, max(10, FUZZED // 10))
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.0, 3.0))
            pipeline.kill()
            pipeline = PipelineProcess(settings, log).start()
            pipeline.wait_for(is_ready, timeout_s=180, what="readiness after a restart")
        for _ in range(3):  # as the oracle: until every message is acknowledged
            pipeline.wait_for(idle, timeout_s=600, what="the queues to drain")
            assert pipeline.stop() == 0
            if queue_depths(settings) == 0:
                break
            pipeline = PipelineProcess(settings, log).start()
        assert queue_depths(settings) == 0

        dead = drain(settings, settings.dead_letter_queue)
        ids = [headers.get(DEAD_LETTER_ID_HEADER) for headers, _ in dead]
        assert all(ids) and len(set(ids)) == len(ids), "a message was dead-lettered twice"
        assert Counter(body for _, body in dead) == Counter(poison)
        assert all(headers.get("x-error") for headers, _ in dead)
        assert actual_state(FeatureStore.open(settings), prefix) == expected_state(settings, final)

        text = log.read_text(errors="replace")
        assert text.count("lost the broker on") >= CLOSES, "the closes did not reach the source"
        assert not tracebacks(text), f"tracebacks in the pipeline's log: {tracebacks(text)}"
    finally:
        close_stores()
        delete_topology(settings)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_huge_document_among_small_ones_does_not_hold_them_up(tmp_path: Path) -> None:
    """A long article takes turns of one slice: posts published while it is being written are
    indexed before it is done (not after it), memory stays bounded, the article ends complete."""
    prefix = f"huge{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        _env_file=None,
        rabbitmq_queue=f"test-huge-{uuid.uuid4().hex[:12]}",
        rabbitmq_shards=0,  # one queue: the posts are queued behind the article
        qdrant_path=tmp_path / "qdrant",
        batch_size=4,
        batch_max_wait_ms=10,
        epoch_interval_ms=200,
        query_port=0,
        embedding_backend="fp32",
        chunk_size_articles=32,  # many cheap chunks: ~350 for the longest sample article
        chunk_overlap=4,
        slice_chunks=16,
        long_document_turn_s=0,  # one slice per turn
    )
    article_doc = max((d for d in read_jsonl(SAMPLES / "articles.jsonl")), key=_article_length)
    article = ChangeEvent(
        op=Op.INSERT,
        type=DataType.ARTICLES,
        entry_id=f"{prefix}-article",
        document=event_document(article_doc),
        ts=1,
    )
    posts = [
        ChangeEvent(
            op=Op.INSERT,
            type=DataType.POSTS,
            entry_id=f"{prefix}-post-{i}",
            document=event_document(doc),
            ts=1,
        )
        for i, doc in enumerate(read_jsonl(SAMPLES / "posts.jsonl")[:20])
    ]
    expected = expected_state(
        settings, {f"{e.type.value}:{e.entry_id}": e for e in [article, *posts]}
    )
    turns = -(-sum(1 for c in expected[1] if c[0] == "articles") // settings.slice_chunks)
    assert turns >= 15
    log = tmp_path / "pipeline.log"
    try:
        pipeline = PipelineProcess(settings, log).start()
        with EventPublisher(settings) as publisher:
            publisher.publish([article], to_main_queue=True)
            pipeline.wait_for(
                lambda p: p.metrics().get("events_continued", 0) >= 1, what="the article's 1st turn"
            )
            publisher.publish(posts, to_main_queue=True)
        seen: list[dict[str, int]] = []

        def posts_indexed(p: PipelineProcess) -> bool:
            seen.append(p.counts())
            return seen[-1].get("cleaned_posts", 0) == len(posts)

        pipeline.wait_for(posts_indexed, timeout_s=300, what="the posts")
        # The posts did not wait for the article: it was still taking its turns.
        assert seen[-1].get("cleaned_articles", 0) == 0, seen[-1]

        pipeline.wait_for(idle, timeout_s=600, what="the article to finish")
        totals = pipeline.metrics()
        assert totals["events_continued"] == turns - 1
        assert totals["events_applied"] == 1 + len(posts)
        assert peak_rss_mb(pipeline.process.pid) < 1_200

        # A new version of the article, killed -9 twice while it takes its turns: each restart
        # resumes it from the store's progress (or its redelivered event does), and it ends
        # exactly as a clean run would leave it.
        rng = random.Random(SEED)
        other = sorted(read_jsonl(SAMPLES / "articles.jsonl"), key=_article_length)[-2]
        update = article.model_copy(
            update={
                "op": Op.UPDATE,
                "document": event_document(other),
                "ts": 2,
            }
        )
        with EventPublisher(settings) as publisher:
            publisher.publish([update], to_main_queue=True)
        for _ in range(2):
            pipeline.wait_for(
                lambda p: p.metrics().get("events_continued", 0) >= 1, what="a turn to end"
            )
            time.sleep(rng.uniform(0.0, 1.0))
            pipeline.kill()
            pipeline = PipelineProcess(settings, log).start()
        pipeline.wait_for(idle, timeout_s=600, what="the new version to finish")
        assert pipeline.stop() == 0
        assert queue_depths(settings) == 0
        final = {f"{e.type.value}:{e.entry_id}": e for e in [update, *posts]}
        assert actual_state(FeatureStore.open(settings), prefix) == expected_state(settings, final)
        text = log.read_text(errors="replace")
        assert f"articles:{article.entry_id}: resuming after" in text
        assert not tracebacks(text), f"tracebacks in the pipeline's log: {tracebacks(text)}"
    finally:
        close_stores()
        delete_topology(settings)


def _article_length(document: dict[str, Any]) -> int:
    return len(document["content"]["Content"])
