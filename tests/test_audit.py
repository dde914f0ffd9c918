"""`feature-pipeline audit` against a real PostgreSQL warehouse, the real store and broker: drift
made on purpose is found exactly, `--repair` fixes it through a running pipeline, and the next
audit is clean."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import FeatureStore, Point, close_stores
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl, settings_env
from .pipeline_process import PipelineProcess
from .warehouse import DSN, Warehouse, temporary_warehouse

pytestmark = pytest.mark.slow

POSTS = read_jsonl(SAMPLES / "posts.jsonl")[:5]
ARTICLE = read_jsonl(SAMPLES / "articles.jsonl")[0]
AUDIT = [sys.executable, "-m", "feature_pipeline.cli", "audit", "--postgres"]


def body(document: dict[str, Any]) -> dict[str, Any]:
    return event_document(document)


def audit(
    settings: Settings, warehouse: Warehouse, *args: str, port: int | None = None
) -> tuple[int, list[dict], dict]:
    """Run the CLI with --json: exit status, findings, and the closing summary line."""
    env = settings_env(settings) | ({} if port is None else {"QUERY_PORT": str(port)})
    done = subprocess.run(
        [*AUDIT, DSN, "--schema", warehouse.schema, "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 3), done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return done.returncode, lines[:-1], lines[-1]


def drifts(findings: list[dict]) -> set[tuple[str, str]]:
    return {(f["drift"], f["entry_id"]) for f in findings}


def test_drift_is_found_exactly_repaired_through_the_pipeline_then_clean(
    settings: Settings, tmp_path: Path
) -> None:
    with temporary_warehouse() as warehouse:
        for post in POSTS[:4]:
            warehouse.upsert("posts", str(post["_id"]), body(post))
        warehouse.upsert("articles", str(ARTICLE["_id"]), body(ARTICLE))
        # Index the warehouse as the CDC snapshot and the pipeline would.
        processor = DocumentProcessor(settings)
        build_sync(settings).apply(
            [
                processor.process_event(
                    ChangeEvent(op=Op.INSERT, type=data_type, entry_id=entry_id, document=doc, ts=1)
                )
                for (data_type, entry_id), doc in warehouse.rows().items()
            ]
        )
        close_stores()
        status, findings, summary = audit(settings, warehouse)
        assert (status, findings) == (0, []), findings

        a, b, c, d = (str(p["_id"]) for p in POSTS[:4])
        store = FeatureStore.open(settings)
        # Chunks deleted from Qdrant by hand.
        a_chunk = next(p.id for p in store.scroll("vector_posts") if p.payload["entry_id"] == a)
        store.delete_ids("vector_posts", [str(a_chunk)])
        # A chunk written by hand: no sync state lists it.
        orphan = str(uuid.uuid4())
        store.upsert(
            "vector_posts",
            [
                Point(
                    id=orphan,
                    payload={"type": "posts", "entry_id": d, "content": "hand-written"},
                    vector=[1.0] + [0.0] * 383,
                )
            ],
        )
        # An older version of a post written into the store.
        older = body(POSTS[2]) | {"content": {"text": "An older draft of this post."}}
        build_sync(settings).apply(
            [
                processor.process_event(
                    ChangeEvent(op=Op.UPDATE, type=DataType.POSTS, entry_id=c, document=older, ts=2)
                )
            ]
        )
        close_stores()
        # A row inserted and another deleted while the CDC was stopped.
        new = f"new-{uuid.uuid4().hex[:6]}"
        warehouse.upsert("posts", new, body(POSTS[4]))
        warehouse.delete("posts", b)

        status, findings, summary = audit(settings, warehouse)
        assert status == 3
        assert drifts(findings) == {
            ("chunks_missing", a),
            ("extra", b),
            ("outdated", c),
            ("orphan_chunk", d),
            ("missing", new),
        }
        assert next(f for f in findings if f["drift"] == "orphan_chunk")["point_id"] == orphan
        assert summary["summary"]["articles"] == {}
        assert summary["summary"]["posts"] == {
            "missing": 1,
            "extra": 1,
            "outdated": 1,
            "chunks_missing": 1,
            "orphan_chunk": 1,
        }

        pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
        try:
            status, _, summary = audit(settings, warehouse, "--repair", port=pipeline.port)
            assert summary["repair"]["events_published"] == 4
            # Through the running pipeline, which holds the embedded store: the orphan stays.
            assert summary["repair"]["orphan_chunks_left"] == 1
            pipeline.wait_for(
                lambda p: p.metrics().get("events_applied", 0) >= 4, what="the repair events"
            )
            status, findings, _ = audit(settings, warehouse, port=pipeline.port)
            assert drifts(findings) == {("orphan_chunk", d)}
        finally:
            assert pipeline.stop() == 0

        status, _, summary = audit(settings, warehouse, "--repair")
        assert summary["repair"]["orphan_chunks_deleted"] == 1
        status, findings, _ = audit(settings, warehouse)
        assert (status, findings) == (0, [])

        # The repaired store holds the warehouse's content.
        store = FeatureStore.open(settings)
        cleaned = {p.payload["entry_id"]: p.payload for p in store.scroll("cleaned_posts")}
        assert set(cleaned) == {a, c, d, new}
        assert "older draft" not in cleaned[c]["cleaned_content"]


def test_an_unprocessable_row_is_reported_and_an_empty_store_misses_everything(
    settings: Settings,
) -> None:
    with temporary_warehouse() as warehouse:
        warehouse.upsert("posts", "good", body(POSTS[0]))
        warehouse.upsert("posts", "bad", {"platform": "linkedin"})
        status, findings, summary = audit(settings, warehouse)
    assert status == 3
    assert drifts(findings) == {("missing", "good"), ("unprocessable", "bad")}
    bad = next(f for f in findings if f["drift"] == "unprocessable")
    assert bad["detail"].startswith("invalid_document: ") and "author_id" in bad["detail"]
    assert summary["summary"]["posts"] == {"missing": 1, "unprocessable": 1}


def test_the_text_summary(settings: Settings) -> None:
    with temporary_warehouse() as warehouse:
        warehouse.upsert("posts", "p1", body(POSTS[0]))
        done = subprocess.run(
            [*AUDIT, DSN, "--schema", warehouse.schema, "--tables", "posts"],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[1:] == ["  posts  missing 1", "1 differences"]
