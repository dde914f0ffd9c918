"""Seeing it run: Prometheus metrics, health and readiness, `/status`, and the status page as a
person sees it in a real (headless) Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import CONTENT_TYPE, Metrics, totals_from_text
from feature_pipeline.query_server import start_query_server
from feature_pipeline.settings import Settings
from feature_pipeline.status import CACHE_S, describe_progress, readiness

from .conftest import SAMPLES, read_jsonl
from .pipeline_process import PipelineProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@contextmanager
def serving(settings: Settings) -> Iterator[int]:
    server = start_query_server(settings, FeatureStore.open(settings))
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_counters_by_type_histograms_and_the_freshness_window() -> None:
    own = Metrics()
    own.add("events_applied", 2, label="posts")
    own.add("events_applied", 1, label="articles")
    own.add("events_received", 5, label="q.shard.0")
    own.add("dead_letters", 1)
    for seconds in [0.1] * 98 + [0.5, 9.0]:
        own.observe("freshness_seconds", seconds)
    own.observe("apply_batch_seconds", 0.2)
    assert own.get("events_applied") == 3 and own.by_label("events_applied") == {
        "posts": 2,
        "articles": 1,
    }
    assert own.in_flight() == 1  # 5 read, 3 applied, 1 dead-lettered
    assert own.freshness() == {"count": 100, "p50_s": 0.1, "p99_s": 0.5}
    text = own.prometheus()
    assert 'feature_pipeline_events_applied_total{type="posts"} 2.0' in text
    assert "feature_pipeline_freshness_seconds_bucket" in text
    assert "feature_pipeline_messages_in_flight 1.0" in text
    assert "process_resident_memory_bytes" in text
    assert totals_from_text(text)["events_applied"] == 3
    assert totals_from_text(Metrics().prometheus())["chunks_reused"] == 0
    with pytest.raises(ValueError, match="per type"):
        own.add("events_applied", 1)


def test_health_ready_status_metrics_and_the_page(settings: Settings) -> None:
    with serving(settings) as port:
        assert get(port, "/health")[0] == 200
        readiness.waiting("model", "loading the embedding models")
        status, _, body = get(port, "/ready")
        assert status == 503
        assert json.loads(body)["waiting"]["model"] == "loading the embedding models"
        readiness.ready("model")
        assert get(port, "/ready")[0] == 200

        status, _, body = get(port, "/status")
        shown = json.loads(body)
        assert [q["role"] for q in shown["queues"]] == ["main", "shard", "shard", "dead letters"]
        assert {q["depth"] for q in shown["queues"]} == {None}  # nothing declared them yet

        with EventPublisher(settings) as publisher:  # declares the topology
            publisher.publish_dead_letter(b"x", reason="r", error_type="e", source_queue="q")
        time.sleep(CACHE_S)
        status, content_type, body = get(port, "/metrics")
        assert status == 200 and content_type == CONTENT_TYPE
        assert f'feature_pipeline_queue_depth{{queue="{settings.dead_letter_queue}"}} 1.0' in (
            body.decode()
        )
        assert shown["freshness"]["window_s"] == 300

        status, content_type, page = get(port, "/")
        assert status == 200 and content_type.startswith("text/html")
        assert b"<title>feature-pipeline status</title>" in page


def browse(port: int, query: str = "", screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (Chromium headless, virtual time)."""
    assert CHROMIUM is not None
    action = [f"--screenshot={screenshot}", "--window-size=1366,1100"] if screenshot else []
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=15000",
            *(action or ["--dump-dom"]),
            f"http://127.0.0.1:{port}/{query}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cells(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<tbody id="{table_id}">(.*?)</tbody>', dom, re.S)
    assert body is not None, f"no table {table_id}"
    rows = re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    return [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
        for r in rows
    ]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is installed by `make test`")
def test_the_status_page_in_a_browser(settings: Settings, tmp_path: Path) -> None:
    posts = read_jsonl(SAMPLES / "posts.jsonl")[:6]
    poison = b'{"type": "posts", "entry_id": "p-broken", "platform": "x", "author_id": "a"}'
    with EventPublisher(settings) as publisher:
        publisher.publish(
            [
                ChangeEvent(
                    op=Op.INSERT,
                    type=DataType.POSTS,
                    entry_id=str(doc["_id"]),
                    document=event_document(doc),
                    ts=1,
                )
                for doc in posts
            ]
        )
        publisher.publish_raw(poison)
    pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
    try:
        pipeline.wait_for(lambda p: p.counts().get("cleaned_posts") == len(posts), what="posts")
        pipeline.wait_for(lambda p: p.metrics().get("dead_letters") == 1, what="the dead letter")
        # Queue depths are read at most every 2 s (status.CACHE_S): wait until a read has seen
        # the dead letter in its queue (the only message left in any), so the page shows it.
        pipeline.wait_for(lambda p: p.metrics().get("queue_depth") == 1, what="the DLQ's depth")
        counts: dict[str, Any] = pipeline.counts()
        target = posts[3]
        words = " ".join(str(target["content"]["text"]).split()[:12])
        dom = browse(pipeline.port, "?" + urllib.parse.urlencode({"q": words, "type": "posts"}))
    finally:
        pipeline.stop()

    assert 'class="badge ok">ready<' in dom
    shown = {name: int(n) for name, n in cells(dom, "collections")}
    assert shown == counts and shown["cleaned_posts"] == len(posts)
    assert "document.content: Field required" in dom or "content: Field required" in dom
    assert "invalid_document" in dom
    first_hit = re.search(r'<div class="hit">(.*?)</div></div>', dom, re.S)
    assert first_hit is not None and str(target["_id"]) in first_hit.group(1)
    queues = {row[0]: row for row in cells(dom, "queues")}
    assert queues[settings.dead_letter_queue][1:3] == ["dead letters", "1"]
    assert [row[0] for row in cells(dom, "models")] == [t.value for t in DataType]


def test_the_progress_line_says_rates_backlog_dead_letters_and_freshness() -> None:
    own = Metrics()
    before = own.snapshot()
    own.add("events_applied", 30, label="posts")
    own.add("chunks_embedded", 120, label="posts")
    own.add("dead_letters", 2)
    own.observe("freshness_seconds", 0.25)
    queues = [
        {"name": "q", "role": "main", "depth": 5},
        {"name": "q.shard.0", "role": "shard", "depth": None},
        {"name": "q.dlq", "role": "dead letters", "depth": 9},
    ]
    line = describe_progress(before, own.snapshot(), 10, queues, own)
    assert line == (
        "progress: 3.0 events/s applied, 12.0 chunks/s embedded, 0.0 reused; backlog 5 "
        "messages; 2 dead letters (+2); freshness p50 0.25 s, p99 0.25 s"
    )
    unreachable = describe_progress(before, own.snapshot(), 10, {"error": "x"}, own)
    assert "backlog unknown (broker unreachable)" in unreachable
