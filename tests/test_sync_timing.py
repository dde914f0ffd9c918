"""Where a change's time goes: the sync step counts seconds in the model and in store reads and
writes, and uses the embedder factory it is given (the benchmark's ceiling seam)."""

from __future__ import annotations

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing.embedding import EmbeddingModel, embedder_for
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl


def test_apply_counts_model_and_store_seconds_with_the_given_embedders(
    settings: Settings,
) -> None:
    asked: list[DataType] = []

    def embedders(s: Settings, data_type: DataType) -> EmbeddingModel:
        asked.append(data_type)
        return embedder_for(s, data_type)

    counters = Metrics()
    sync = build_sync(settings, counters, embedders=embedders)
    assert set(asked) == set(DataType)
    document = read_jsonl(SAMPLES / "articles.jsonl")[0]
    body = event_document(document)
    event = ChangeEvent(op=Op.INSERT, type=DataType.ARTICLES, entry_id="a", document=body, ts=1)
    change = DocumentProcessor(settings).process_event(event)
    report = sync.apply([change])
    assert report.embedded == len(change.chunks) > 1
    seconds = counters.snapshot()
    for name in ("embedding_seconds", "store_read_seconds", "store_write_seconds"):
        assert seconds[name] > 0, name
    parts = sum(
        seconds[n] for n in ("embedding_seconds", "store_read_seconds", "store_write_seconds")
    )
    assert parts <= seconds["apply_seconds"]
    # A second apply of the same change reads the store and embeds nothing.
    embedding_before = seconds["embedding_seconds"]
    assert sync.apply([change]).embedded == 0
    assert counters.get("embedding_seconds") == embedding_before
