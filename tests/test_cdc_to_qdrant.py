"""The whole path on real parts: PostgreSQL -> `feature-pipeline cdc postgres` (subprocess) ->
RabbitMQ -> `feature-pipeline run` (subprocess) -> embedded Qdrant.

Rows of the posts/articles/repositories tables (the layout of docs/cdc.md, real sample
documents) are inserted before the service's first start (its snapshot), then inserted,
edited and deleted while it streams, while it is killed with SIGKILL and while it is down. At
the end the store must equal a from-scratch index of the tables' final state.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore, close_stores
from feature_pipeline.domain.events import ChangeEvent, Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, queue_depth, read_jsonl
from .pipeline_process import PipelineProcess
from .test_pipeline_e2e import stored_chunks
from .warehouse import (
    Warehouse,
    ensure_logical_postgres,
    start_cli,
    temporary_warehouse,
    wait_until,
)

pytestmark = pytest.mark.slow

#: Repository files kept per sample repository: whole real files, only the small ones, so the
#: test embeds a few chunks per repository instead of a hundred.
MAX_REPOSITORY_FILE_CHARS = 4000


@pytest.fixture
def warehouse() -> Iterator[Warehouse]:
    ensure_logical_postgres()
    with temporary_warehouse() as warehouse:
        yield warehouse


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; whatever still runs at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def split(document: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A warehouse document -> (id column, document column): the row of docs/cdc.md."""
    body = dict(document)
    return str(body.pop("_id")), body


def edited_post(post: dict[str, Any], note: str) -> dict[str, Any]:
    return {**post, "content": {**post["content"], "text": f"{post['content']['text']}\n{note}"}}


def expected_index(
    settings: Settings, rows: dict[tuple[DataType, str], dict[str, Any]]
) -> tuple[dict[DataType, dict[str, Any]], dict[DataType, set[tuple[str, int, str]]]]:
    """Cleaned snapshots and (entry_id, chunk_index, content) of a from-scratch index of `rows`."""
    processor = DocumentProcessor(settings)
    cleaned: dict[DataType, dict[str, Any]] = {t: {} for t in DataType}
    chunks: dict[DataType, set[tuple[str, int, str]]] = {t: set() for t in DataType}
    for (data_type, entry_id), document in rows.items():
        change = processor.process_event(
            ChangeEvent(op=Op.INSERT, type=data_type, entry_id=entry_id, document=document)
        )
        assert change.cleaned is not None
        cleaned[data_type][entry_id] = change.cleaned.model_dump(mode="json")
        chunks[data_type] |= {(c.entry_id, c.chunk_index, c.content) for c in change.chunks}
    return cleaned, chunks


class Settled:
    """The pipeline has written everything the broker holds for it, twice in a row >= 1 s apart.

    Written = applied + superseded + stale + dead-lettered; once that equals what the source
    read and no queue holds a ready message, the only thing left could be deliveries in the
    consumer's buffer, which an idle worker hands out within milliseconds: a second look a
    second later with nothing new read rules them out.
    """

    def __init__(self, settings: Settings, counts: dict[str, int]) -> None:
        self.settings = settings
        self.counts = counts
        self._seen: tuple[float, float] | None = None  # (when, events_received)

    def __call__(self, pipeline: PipelineProcess) -> bool:
        counts = pipeline.counts()
        metrics = pipeline.metrics()
        written = sum(
            metrics[name]
            for name in ("events_applied", "events_superseded", "events_stale", "dead_letters")
        )
        queues = [self.settings.rabbitmq_queue, *self.settings.shard_queues]
        idle = (
            all(counts.get(k, 0) == v for k, v in self.counts.items())
            and written == metrics["events_received"]
            and all(queue_depth(self.settings, q) == 0 for q in queues)
        )
        if not idle:
            self._seen = None
            return False
        now, received = time.monotonic(), metrics["events_received"]
        if self._seen is None or self._seen[1] != received:
            self._seen = (now, received)
            return False
        return now - self._seen[0] >= 1.0


def test_inserts_updates_deletes_reach_qdrant_through_cdc_across_a_kill_9(
    warehouse: Warehouse,
    settings: Settings,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    # Real samples: the ten shortest posts (one chunk each), the shortest article, and two
    # repositories cut down to their small files.
    posts = sorted(read_jsonl(SAMPLES / "posts.jsonl"), key=lambda d: len(d["content"]["text"]))
    posts = posts[:10]
    article = min(read_jsonl(SAMPLES / "articles.jsonl"), key=lambda d: len(str(d["content"])))
    repositories = {
        r["name"]: {
            **r,
            "content": {
                path: text
                for path, text in r["content"].items()
                if len(text) <= MAX_REPOSITORY_FILE_CHARS
            },
        }
        for r in read_jsonl(SAMPLES / "repositories.jsonl")
        if r["name"] in ("tomllib", "json")
    }
    post_ids = [str(p["_id"]) for p in posts]

    # Before the service's first start: its snapshot publishes these.
    for post in posts[:6]:
        warehouse.upsert("posts", *split(post))
    warehouse.upsert("articles", *split(article))
    warehouse.upsert("repositories", *split(repositories["tomllib"]))

    cdc_log = tmp_path / "cdc.log"
    processes.append(start_cli(warehouse, settings, cdc_log))
    pipeline = PipelineProcess(settings, tmp_path / "pipeline.log").start()
    assert pipeline.process is not None
    processes.append(pipeline.process)

    def wait_for_cdc(condition: Callable[[], bool], what: str) -> None:
        try:
            wait_until(condition, timeout=120)
        except AssertionError:
            raise AssertionError(
                f"timed out waiting for {what}; CDC log:\n{cdc_log.read_text()}"
            ) from None

    wait_for_cdc(warehouse.streaming, "the snapshot")

    # Streamed: inserts, edits, a delete, and one transaction changing a row twice plus a row
    # inserted and deleted again (PostgreSQL CDC publishes one event per row: its last state).
    for post in posts[6:8]:
        warehouse.upsert("posts", *split(post))
    warehouse.upsert("posts", *split(edited_post(posts[0], "Edited: the event was a success.")))
    edited_article = {
        **article,
        "content": {
            **article["content"],
            "Content": article["content"]["Content"] + "\n\nUpdate: a follow-up article is out.",
        },
    }
    warehouse.upsert("articles", *split(edited_article))
    warehouse.delete("posts", post_ids[1])
    with warehouse.conn.transaction():
        warehouse.upsert("posts", *split(edited_post(posts[2], "First draft of an edit.")))
        warehouse.upsert("posts", *split(edited_post(posts[2], "Second, final edit.")))
        warehouse.upsert("repositories", *split(repositories["json"]))
        warehouse.upsert("posts", "short-lived", {"platform": "linkedin", "content": {}})
        warehouse.delete("posts", "short-lived")

    # A stream of edits; SIGKILL the service once it has published part of it, keep writing
    # while it is down, restart it, write more.
    revision = 0

    def write_revisions(count: int) -> None:
        nonlocal revision
        for _ in range(count):
            post = posts[(3, 5, 6)[revision % 3]]
            warehouse.upsert("posts", *split(edited_post(post, f"(revision {revision})")))
            revision += 1
            time.sleep(0.005)

    before_burst = warehouse.wal_lsn()
    write_revisions(15)
    wait_for_cdc(lambda: warehouse.confirmed_lsn() > before_burst, "part of the burst")
    write_revisions(15)
    processes[0].send_signal(signal.SIGKILL)  # no chance to finish a batch or save anything
    processes[0].wait(timeout=30)

    write_revisions(6)
    warehouse.upsert("posts", *split(edited_post(posts[5], "Edited while the CDC was down.")))
    warehouse.delete("posts", post_ids[4])
    warehouse.upsert("posts", *split(posts[8]))
    tomllib = repositories["tomllib"]
    warehouse.upsert(
        "repositories",
        *split(
            {
                **tomllib,
                "content": {
                    **tomllib["content"],
                    "_types.py": tomllib["content"]["_types.py"] + "\n# edited in the warehouse\n",
                },
            }
        ),
    )

    restarted = start_cli(warehouse, settings, cdc_log)
    processes.append(restarted)
    warehouse.upsert("posts", *split(posts[9]))
    write_revisions(3)
    warehouse.delete("repositories", str(repositories["json"]["_id"]))
    last_write = warehouse.wal_lsn()

    # Every change published (the slot is confirmed past the last write), then indexed.
    wait_for_cdc(lambda: warehouse.confirmed_lsn() >= last_write, "every change published")
    rows = warehouse.rows()
    cleaned, chunks = expected_index(settings, rows)
    counts = {t.cleaned_collection: len(cleaned[t]) for t in DataType} | {
        t.vector_collection: len(chunks[t]) for t in DataType
    }
    pipeline.wait_for(Settled(settings, counts), timeout_s=240, what="the final table state")
    assert pipeline.metrics()["dead_letters"] == 0

    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(timeout=30) == 0, cdc_log.read_text()
    assert "stopped: published" in cdc_log.read_text()
    assert pipeline.stop() == 0

    # The store equals a from-scratch index of the final tables, deleted documents included.
    assert {post_ids[1], post_ids[4], "short-lived"}.isdisjoint(
        entry_id for data_type, entry_id in rows if data_type is DataType.POSTS
    )
    close_stores()
    store = FeatureStore.open(settings)
    for data_type in DataType:
        snapshots = {
            p.payload["entry_id"]: p.payload for p in store.scroll(data_type.cleaned_collection)
        }
        assert snapshots == cleaned[data_type], f"{data_type.cleaned_collection} differs"
    for data_type in DataType:
        stored = stored_chunks(settings, [data_type])
        assert len(stored) == len(set(stored)), f"duplicate points in {data_type.vector_collection}"
        assert set(stored) == chunks[data_type], f"{data_type.vector_collection} differs"
