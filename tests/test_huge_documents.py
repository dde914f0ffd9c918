"""Huge documents: size limits dead-letter as `too_large`; sliced writes stay complete and
crash-safe (the real embedded store and the real model, on documents small enough to be fast)."""

from __future__ import annotations

import json

from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl

ARTICLE = read_jsonl(SAMPLES / "articles.jsonl")[0]


def article_message(entry_id: str, text: str) -> InboundMessage:
    document = {k: v for k, v in ARTICLE.items() if k != "_id"}
    document["content"] = {**document["content"], "Content": text}
    body = {"op": "insert", "type": "articles", "entry_id": entry_id, "document": document, "ts": 1}
    return InboundMessage(source="test", body=json.dumps(body).encode())


def test_a_body_over_max_document_bytes_is_dead_lettered_with_its_size(
    settings: Settings,
) -> None:
    message = article_message("big", "word " * 5_000)
    limited = settings.model_copy(update={"max_document_bytes": len(message.body) - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"{len(message.body):,} bytes" in outcome.reason
    assert f"MAX_DOCUMENT_BYTES ({len(message.body) - 1:,})" in outcome.reason
    # At the limit it passes.
    exact = settings.model_copy(update={"max_document_bytes": len(message.body)})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_a_document_over_max_chunks_is_dead_lettered_with_its_chunk_count(
    settings: Settings,
) -> None:
    message = article_message("many", ARTICLE["content"]["Content"])
    change = DocumentProcessor(settings).process(message)
    assert isinstance(change, DocumentChange)
    count = len(change.chunks)
    assert count >= 8
    limited = settings.model_copy(update={"max_chunks_per_document": count - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"makes {count:,} chunks" in outcome.reason
    assert f"MAX_CHUNKS_PER_DOCUMENT ({count - 1:,})" in outcome.reason
    exact = settings.model_copy(update={"max_chunks_per_document": count})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_the_default_limits_admit_a_10_mb_article(settings: Settings) -> None:
    assert settings.max_document_bytes >= 10 * 1024 * 1024 * 4
    # A 10 MB article makes ~15,000 chunks.
    assert settings.max_chunks_per_document >= 15_000 * 10
