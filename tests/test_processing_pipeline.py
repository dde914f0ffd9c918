"""Message -> DocumentChange or DeadLetter: every failure of a message is a dead letter."""

from __future__ import annotations

import json

import pytest

from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.domain.events import event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.processing.registry import Step, registry
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl


def message(body: dict) -> InboundMessage:
    return InboundMessage(source="q", body=json.dumps(body).encode())


def test_a_valid_post_becomes_a_change_with_chunks(settings: Settings) -> None:
    post = read_jsonl(SAMPLES / "posts.jsonl")[0]
    body = event_document(post) | {"type": "posts", "entry_id": "p"}
    result = DocumentProcessor(settings).process(message(body))
    assert isinstance(result, DocumentChange)
    assert result.cleaned is not None and result.chunks
    assert all(c.entry_id == "p" and c.type is DataType.POSTS for c in result.chunks)


def test_a_handler_raising_becomes_a_dead_letter_with_the_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_cleaner(raw: object, entry_id: str) -> None:
        raise ZeroDivisionError("cleaner bug")

    monkeypatch.setitem(registry._handlers, (DataType.POSTS, Step.CLEAN), broken_cleaner)
    body = {
        "type": "posts",
        "entry_id": "p",
        "platform": "x",
        "author_id": "a",
        "content": {"text": "hello"},
    }
    result = DocumentProcessor(settings).process(message(body))
    assert isinstance(result, DeadLetter)
    assert result.error_type == "handler_error"
    assert result.reason == "ZeroDivisionError: cleaner bug"
    assert result.body == message(body).body and result.source == "q"


def test_a_mistyped_field_is_named_in_the_reason(settings: Settings) -> None:
    body = {
        "type": "repositories",
        "entry_id": "r",
        "name": "n",
        "link": "l",
        "owner_id": "o",
        "content": {"a.py": 5},
    }
    result = DocumentProcessor(settings).process(message(body))
    assert isinstance(result, DeadLetter) and result.error_type == "invalid_document"
    assert "content.a.py" in result.reason
