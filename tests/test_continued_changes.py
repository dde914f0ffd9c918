"""A long document's change is kept between its turns: its continued event takes it back instead
of being parsed, cleaned and chunked again; anything else is processed as before, in order."""

from __future__ import annotations

import json

from feature_pipeline import dataflow
from feature_pipeline.domain.changes import DocumentChange, InboundMessage
from feature_pipeline.domain.events import event_document
from feature_pipeline.processing.continued import ContinuedChanges, continued_changes
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import load_settings

from .conftest import SAMPLES, read_jsonl


def _message(entry_id: str, *, continued: bool = False, source: str = "q") -> InboundMessage:
    post = read_jsonl(SAMPLES / "posts.jsonl")[0]
    document = event_document(post)
    body = {"op": "insert", "type": "posts", "entry_id": entry_id, "document": document, "ts": 1}
    return InboundMessage(source=source, body=json.dumps(body).encode(), continued=continued)


def _change(message: InboundMessage) -> DocumentChange:
    change = DocumentProcessor(load_settings(_env_file=None)).process(message)
    assert isinstance(change, DocumentChange)
    return change


def test_a_continued_message_takes_its_change_once() -> None:
    kept = ContinuedChanges()
    change = _change(_message("a"))
    kept.remember(change)
    assert kept.take(_message("a")) is None  # not marked continued: processed as usual
    assert kept.take(_message("a", continued=True, source="other")) is None  # another queue
    assert kept.take(_message("b", continued=True)) is None  # another body
    assert kept.take(_message("a", continued=True)) is change
    assert kept.take(_message("a", continued=True)) is None  # given once
    assert len(kept) == 0


def test_the_kept_chunks_are_bounded_oldest_first() -> None:
    changes = [_change(_message(name)) for name in "abc"]
    size = len(changes[0].chunks)
    kept = ContinuedChanges(max_chunks=2 * size)
    for change in changes:
        kept.remember(change)
    assert len(kept) == 2
    assert kept.take(_message("a", continued=True)) is None
    assert kept.take(_message("c", continued=True)) is changes[2]
    ContinuedChanges(max_chunks=size - 1).remember(changes[0])  # too long to keep: not kept


def test_the_process_step_uses_a_kept_change_and_keeps_the_batch_order() -> None:
    settings = load_settings(_env_file=None)
    messages = [_message("a"), _message("b", continued=True), _message("c", continued=True)]
    kept = _change(_message("b"))
    continued_changes.remember(kept)
    try:
        results = dataflow._process_source_batch(settings, messages)
    finally:
        continued_changes.take(messages[1])
    assert results[1] is kept
    assert [r.entry_id for r in results if isinstance(r, DocumentChange)] == ["a", "b", "c"]
    # "c" was continued but not kept (another process's turn, a restart): processed again.
    assert results[2] == _change(_message("c"))
