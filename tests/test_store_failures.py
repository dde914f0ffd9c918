"""No store write can kill the pipeline: an unexpected error on one document dead-letters that
document (`store_error`) and the rest apply; a store that is down is retried, nothing lost.

The store is the real embedded one, wrapped so that it refuses the writes of one document the
way qdrant-client's serialiser refuses an unencodable payload."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from bytewax.testing import run_main
from pydantic_core import PydanticSerializationError
from qdrant_client.http.exceptions import UnexpectedResponse

from feature_pipeline.connectors.files import DeadLetterFileSink, JsonLinesSource
from feature_pipeline.connectors.qdrant import store as store_module
from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink
from feature_pipeline.connectors.qdrant.store import FeatureStore, Point, close_stores
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.dataflow import build_dataflow
from feature_pipeline.domain.events import event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, load_settings

from .conftest import SAMPLES, drain, read_jsonl
from .pipeline_process import InProcessPipeline

REFUSED = "refused-1"


#: What qdrant-client raises on a payload it cannot serialise, and a server's 400 answer.
SERIALISATION_ERROR = PydanticSerializationError(
    "Error serializing to JSON: 'utf-8' codec can't encode character"
)
BAD_REQUEST = UnexpectedResponse(400, "Bad Request", b'{"status":{"error":"bad payload"}}', None)
#: A server restarting: the connection refused, or 503 from a proxy in front of it.
OUTAGES = {
    "connection": ConnectionError("connection refused (server restarting)"),
    "503": UnexpectedResponse(503, "Service Unavailable", b"", None),
}


class RefusingStore:
    """The real store, except that every write carrying `refuse`'s points raises `error`, and
    the first `outages` writes raise `outage`."""

    def __init__(
        self,
        store: FeatureStore,
        refuse: str | None,
        error: Exception = SERIALISATION_ERROR,
        outages: int = 0,
        outage: Exception = OUTAGES["connection"],
    ) -> None:
        self._store = store
        self._refuse = refuse
        self._error = error
        self.outages = outages
        self._outage = outage

    def _check(self, points: Sequence[Any]) -> None:
        if self.outages:
            self.outages -= 1
            raise self._outage
        for point in points:
            if isinstance(point, Point) and point.payload.get("entry_id") == self._refuse:
                raise self._error

    def upsert(self, collection: str, points: Sequence[Any]) -> None:
        self._check(points)
        self._store.upsert(collection, points)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def wrap_store(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, refuse: str | None, **faults: Any
) -> RefusingStore:
    """Make FeatureStore.open (the process-wide registry) hand out the wrapped real store."""
    wrapped = RefusingStore(FeatureStore.open(settings), refuse, **faults)
    location = str(settings.qdrant_path.resolve())
    monkeypatch.setitem(store_module._stores, location, wrapped)  # type: ignore[arg-type]
    return wrapped


@pytest.fixture
def local_settings(tmp_path: Path) -> Iterator[Settings]:
    yield load_settings(
        _env_file=None, qdrant_path=tmp_path / "qdrant", query_port=0, embedding_backend="fp32"
    )
    close_stores()


def post_lines() -> list[str]:
    """Two good posts and two versions of the refused one, in one file (one source batch)."""
    posts = [  # a few sentences each: one chunk to embed, the test stays quick
        {
            **event_document(d),
            "content": {"text": d["content"]["text"][:300]},
        }
        for d in read_jsonl(SAMPLES / "posts.jsonl")
    ]
    return [
        json.dumps({**posts[0], "type": "posts", "entry_id": "good-1"}),
        json.dumps(
            {"op": "insert", "type": "posts", "entry_id": REFUSED, "document": posts[1], "ts": 1}
        ),
        json.dumps({**posts[2], "type": "posts", "entry_id": "good-2"}),
        json.dumps(
            {"op": "update", "type": "posts", "entry_id": REFUSED, "document": posts[3], "ts": 2}
        ),
    ]


def backfill(settings: Settings, tmp_path: Path, lines: list[str]) -> tuple[Path, list[int]]:
    """The backfill's dataflow, run in this process: (dead-letter file, progress counts)."""
    events = tmp_path / "posts.jsonl"
    events.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    dead_letters = tmp_path / "dead_letters.jsonl"
    progress: list[int] = []
    flow = build_dataflow(
        settings,
        JsonLinesSource([events], batch_size=settings.batch_size),
        FeatureStoreSink(settings, on_written=progress.append),
        DeadLetterFileSink(dead_letters, on_written=progress.append),
    )
    run_main(flow)
    return dead_letters, progress


def cleaned_ids(settings: Settings) -> set[str]:
    store = FeatureStore.open(settings)
    return {p.payload["entry_id"] for p in store.scroll(DataType.POSTS.cleaned_collection)}


def chunk_entry_ids(settings: Settings) -> set[str]:
    store = FeatureStore.open(settings)
    return {p.payload["entry_id"] for p in store.scroll(DataType.POSTS.vector_collection)}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SERIALISATION_ERROR, "PydanticSerializationError: Error serializing to JSON"),
        (BAD_REQUEST, "StoreRefused: UnexpectedResponse: Unexpected Response: 400 (Bad Request)"),
    ],
)
def test_a_document_the_store_refuses_is_dead_lettered_and_the_rest_apply(
    local_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    reason: str,
) -> None:
    wrap_store(monkeypatch, local_settings, refuse=REFUSED, error=error)
    lines = post_lines()
    with caplog.at_level(logging.INFO, logger="feature_pipeline"):
        dead_letters, progress = backfill(local_settings, tmp_path, lines)

    assert cleaned_ids(local_settings) == {"good-1", "good-2"}
    assert chunk_entry_ids(local_settings) == {"good-1", "good-2"}
    records = read_jsonl(dead_letters)
    # Both versions of the refused document, as they came (replayable), in order.
    assert [json.loads(r["body"]) for r in records] == [json.loads(lines[i]) for i in (1, 3)]
    assert {r["error_type"] for r in records} == {"store_error"}
    assert all(r["reason"].startswith(reason) for r in records), records[0]["reason"]
    assert all("\n" not in r["reason"] for r in records)
    assert all(r["source"].endswith(("posts.jsonl:2", "posts.jsonl:4")) for r in records)
    assert sum(progress) == len(lines)  # 2 written + 2 dead-lettered: each line counted once
    assert "Traceback" not in caplog.text
    refused_lines = [r for r in caplog.records if f"dead-lettering posts:{REFUSED}" in r.message]
    assert len(refused_lines) == 1 and refused_lines[0].exc_info is None


@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_a_store_outage_is_retried_not_dead_lettered(
    local_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    outage: str,
) -> None:
    wrapped = wrap_store(
        monkeypatch, local_settings, refuse=None, outages=2, outage=OUTAGES[outage]
    )
    with caplog.at_level(logging.WARNING, logger="feature_pipeline"):
        dead_letters, progress = backfill(local_settings, tmp_path, post_lines())

    assert wrapped.outages == 0
    assert cleaned_ids(local_settings) == {"good-1", "good-2", REFUSED}
    assert not dead_letters.exists() or read_jsonl(dead_letters) == []
    assert sum(progress) == 4
    retries = [r for r in caplog.records if "writing to the feature store failed" in r.message]
    assert len(retries) == 2, caplog.text
    assert "document by document" not in caplog.text


def test_the_running_pipeline_sends_a_refused_document_to_the_dlq(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrap_store(monkeypatch, settings, refuse=REFUSED)
    lines = post_lines()
    pipeline = InProcessPipeline(settings).start()
    try:
        with EventPublisher(settings) as publisher:
            for line in lines:
                publisher.publish_raw(line.encode())
        deadline = time.monotonic() + 120
        while cleaned_ids(settings) != {"good-1", "good-2"}:
            pipeline.check_alive()
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.1)
        dlq: list[tuple[dict, bytes]] = []
        while len(dlq) < 2:
            pipeline.check_alive()
            assert time.monotonic() < deadline, "timed out"
            dlq += drain(settings, settings.dead_letter_queue)
            time.sleep(0.1)
    finally:
        pipeline.stop()
    assert sorted(body for _, body in dlq) == sorted([lines[1].encode(), lines[3].encode()])
    for headers, _ in dlq:
        assert headers["x-error-type"] == "store_error"
        assert headers["x-error"].startswith("PydanticSerializationError: ")
