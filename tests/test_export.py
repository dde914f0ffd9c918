"""`feature-pipeline export`: the cleaned snapshots as a fine-tuning data set, from the real store
(directly, and through a running pipeline that holds it), read back as JSON Lines and Parquet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import close_stores
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.changes import DocumentChange
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl, settings_env
from .pipeline_process import PipelineProcess

POSTS = read_jsonl(SAMPLES / "posts.jsonl")[:6]
REPOSITORIES = read_jsonl(SAMPLES / "repositories.jsonl")[:1]


def event(data_type: DataType, document: dict, ts: int | None, op: Op = Op.INSERT) -> ChangeEvent:
    body = None if op is Op.DELETE else event_document(document)
    return ChangeEvent(op=op, type=data_type, entry_id=str(document["_id"]), document=body, ts=ts)


def cli(settings: Settings, *args: str, port: int | None = None) -> subprocess.CompletedProcess:
    env = settings_env(settings) | ({} if port is None else {"QUERY_PORT": str(port)})
    return subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", "export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def indexed(settings: Settings) -> dict[str, DocumentChange]:
    """Six posts (versions 10..15; one deleted, one only in the course's unversioned shape) and
    a repository, applied by the real sync; the changes by entry id."""
    events = [event(DataType.POSTS, doc, ts=10 + i) for i, doc in enumerate(POSTS)]
    events[4] = event(DataType.POSTS, POSTS[4], ts=None)
    events.append(event(DataType.POSTS, POSTS[5], ts=20, op=Op.DELETE))
    events.append(event(DataType.REPOSITORIES, REPOSITORIES[0], ts=7))
    processor = DocumentProcessor(settings)
    changes = [processor.process_event(e) for e in events]
    build_sync(settings).apply(changes)
    close_stores()  # the CLI under test opens the embedded store itself
    return {c.entry_id: c for c in changes}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_cleaned_document_once_with_the_training_fields(
    settings: Settings, indexed: dict[str, DocumentChange], tmp_path: Path
) -> None:
    out = tmp_path / "posts.jsonl"
    done = cli(settings, "--type", "posts", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 5 posts documents" in done.stdout
    rows = {row["id"]: row for row in read_lines(out)}
    assert sorted(rows) == sorted(str(doc["_id"]) for doc in POSTS[:5])
    first = rows[str(POSTS[0]["_id"])]
    assert first["type"] == "posts" and first["version"] == 10
    assert first["platform"] == POSTS[0]["platform"]
    assert first["author_id"] == POSTS[0]["author_id"] and first["link"] is None
    cleaned = indexed[first["id"]].cleaned
    assert cleaned is not None and first["cleaned_content"] == cleaned.cleaned_content
    assert rows[str(POSTS[4]["_id"])]["version"] is None  # the unversioned one
    assert set(json.loads(first["metadata"])) <= {"image"}

    repo = tmp_path / "repositories.jsonl"
    assert cli(settings, "--type", "repositories", "-o", str(repo)).returncode == 0
    (row,) = read_lines(repo)
    assert (
        row["author_id"] == REPOSITORIES[0]["owner_id"] and row["link"] == REPOSITORIES[0]["link"]
    )
    assert "files" in json.loads(row["metadata"])


def test_since_and_author_narrow_the_export(
    settings: Settings, indexed: dict[str, DocumentChange], tmp_path: Path
) -> None:
    out = tmp_path / "recent.jsonl"
    assert cli(settings, "--type", "posts", "--since", "12", "-o", str(out)).returncode == 0
    assert sorted(row["version"] for row in read_lines(out)) == [12, 13]

    author = POSTS[0]["author_id"]
    mine = [str(d["_id"]) for d in POSTS[:5] if d["author_id"] == author]
    assert cli(settings, "--type", "posts", "--author", author, "-o", str(out)).returncode == 0
    assert sorted(row["id"] for row in read_lines(out)) == sorted(mine)
    nobody = cli(settings, "--type", "posts", "--author", "nobody", "-o", str(out))
    assert nobody.returncode == 0 and read_lines(out) == []


def test_parquet_holds_the_same_rows(
    settings: Settings, indexed: dict[str, DocumentChange], tmp_path: Path
) -> None:
    assert cli(settings, "--type", "posts", "-o", str(tmp_path / "p.jsonl")).returncode == 0
    done = cli(settings, "--type", "posts", "--format", "parquet", "-o", str(tmp_path / "p.pq"))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "p.pq")
    assert table.column_names == [
        "id",
        "type",
        "version",
        "cleaned_content",
        "platform",
        "author_id",
        "link",
        "metadata",
    ]
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    assert by_id(table.to_pylist()) == by_id(read_lines(tmp_path / "p.jsonl"))


def test_an_empty_store_says_what_to_do(settings: Settings, tmp_path: Path) -> None:
    done = cli(settings, "--type", "articles", "-o", str(tmp_path / "a.jsonl"))
    assert done.returncode == 1
    assert "no cleaned_articles collection" in done.stderr and "backfill" in done.stderr
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.slow
def test_through_the_running_pipeline_page_by_page(settings: Settings, tmp_path: Path) -> None:
    posts = read_jsonl(SAMPLES / "posts.jsonl")
    events = [event(DataType.POSTS, doc, ts=1) for doc in posts]
    with EventPublisher(settings) as publisher:
        publisher.publish(events)
    pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
    try:
        pipeline.wait_for(
            lambda p: p.counts().get("cleaned_posts") == len(posts), what="every post indexed"
        )
        out = tmp_path / "posts.jsonl"
        # Pages of 10: nine requests to the pipeline's query service.
        done = cli(
            settings, "--type", "posts", "--page-size", "10", "-o", str(out), port=pipeline.port
        )
        assert done.returncode == 0, done.stderr
    finally:
        pipeline.stop()
    ids = [row["id"] for row in read_lines(out)]
    assert len(ids) == len(set(ids)) == len(posts)
