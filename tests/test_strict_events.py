"""Strict event parsing: an integer `ts` only, too-deep JSON and too-long numbers are invalid
events (one log line, no traceback), and lone surrogates never reach the store."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.connectors.qdrant.store import SYNC_STATE_COLLECTION, close_stores
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.domain.events import MAX_JSON_DEPTH, InvalidEvent, event_document, parse_event
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings, load_settings

from .conftest import SAMPLES, read_jsonl


@pytest.fixture
def local_settings(tmp_path: Path) -> Iterator[Settings]:
    """An embedded store of this test's own; no broker needed."""
    yield load_settings(
        _env_file=None, qdrant_path=tmp_path / "qdrant", query_port=0, embedding_backend="fp32"
    )
    close_stores()


def envelope(**fields: Any) -> dict[str, Any]:
    return {"op": "insert", "type": "posts", "entry_id": "p1", "document": {}, **fields}


def nested(depth: int) -> str:
    """A course-shape post whose `extra` field makes the whole message `depth` levels deep."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return '{"type": "posts", "entry_id": "p1", "author_id": "a", "extra": ' + inner + "}"


@pytest.mark.parametrize("ts", ["123", True, False, 1.0, 12.5, "1e3"])
def test_ts_must_be_an_integer(ts: Any) -> None:
    with pytest.raises(InvalidEvent, match="ts"):
        parse_event(json.dumps(envelope(ts=ts)))


def test_integer_ts_is_accepted() -> None:
    assert parse_event(json.dumps(envelope(ts=123))).ts == 123


def test_nesting_up_to_the_limit_is_accepted() -> None:
    event = parse_event(nested(MAX_JSON_DEPTH))
    assert event.entry_id == "p1"


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 500, 10_000, 100_000])
def test_too_deep_json_is_an_invalid_event(depth: int) -> None:
    with pytest.raises(InvalidEvent, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        parse_event(nested(depth).encode())


def test_an_integer_beyond_the_digit_limit_is_an_invalid_event() -> None:
    digits = sys.get_int_max_str_digits() + 700  # 5,000 with Python's default of 4,300
    body = '{"type": "posts", "entry_id": "p1", "n": ' + "7" * digits + "}"
    with pytest.raises(InvalidEvent, match=f"integer longer than {sys.get_int_max_str_digits()}"):
        parse_event(body)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (nested(10_000).encode(), "nested deeper"),
        (nested(MAX_JSON_DEPTH + 1).encode(), "nested deeper"),
        (b'{"type": "posts", "entry_id": "p1", "n": ' + b"9" * 5000 + b"}", "integer longer"),
        (json.dumps(envelope(ts="123")).encode(), "ts"),
        (json.dumps(envelope(ts=True)).encode(), "ts"),
    ],
)
def test_processing_dead_letters_them_with_one_log_line(
    local_settings: Settings, caplog: pytest.LogCaptureFixture, body: bytes, fragment: str
) -> None:
    processor = DocumentProcessor(local_settings)
    with caplog.at_level(logging.DEBUG, logger="feature_pipeline"):
        result = processor.process(InboundMessage(source="q", body=body))
    assert isinstance(result, DeadLetter)
    assert result.error_type == "invalid_event"
    assert fragment in result.reason
    records = [r for r in caplog.records if r.name.startswith("feature_pipeline")]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "Traceback" not in caplog.text
    assert len(records[0].getMessage().splitlines()) == 1


def test_lone_surrogates_are_replaced_at_parse_time() -> None:
    body = (
        '{"type": "repositories", "entry_id": "r1", "name": "x\\ud800", "link": "l\\udfff",'
        ' "owner_id": "o", "content": {"a\\udc00.py": "print(\\"\\ud83d\\ude00\\ud800\\")"}}'
    )
    document = parse_event(body).document
    assert document == {
        "name": "x\ufffd",
        "link": "l\ufffd",
        "owner_id": "o",
        "content": {"a\ufffd.py": 'print("\U0001f600\ufffd")'},  # a valid pair stays an emoji
    }


def test_a_lone_surrogate_in_entry_id_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match="entry_id contains a lone surrogate"):
        parse_event('{"type": "posts", "entry_id": "p\\ud800", "author_id": "a"}')


def test_documents_with_lone_surrogates_are_indexed_as_valid_utf8(
    local_settings: Settings,
) -> None:
    post = event_document(read_jsonl(SAMPLES / "posts.jsonl")[0])
    article = event_document(read_jsonl(SAMPLES / "articles.jsonl")[0])
    article["content"] = {**article["content"], "Content": article["content"]["Content"][:1500]}
    post["platform"] = "linkedin\ud800"
    post["content"] = {**post["content"], "text": post["content"]["text"] + " tail \udfff"}
    article["link"] = article["link"] + "?x=\ud800"
    bodies = [
        json.dumps({**post, "type": "posts", "entry_id": "p-sur"}).encode(),
        json.dumps({**article, "type": "articles", "entry_id": "a-sur"}).encode(),
    ]
    assert b"\\ud800" in bodies[0] and b"\\ud800" in bodies[1]  # ASCII escapes: valid JSON
    processor = DocumentProcessor(local_settings)
    changes = [processor.process(InboundMessage(source="q", body=b)) for b in bodies]
    assert all(isinstance(c, DocumentChange) for c in changes), changes
    sync = build_sync(local_settings)
    sync.apply([c for c in changes if isinstance(c, DocumentChange)])

    store = sync._store
    collections = [
        DataType.POSTS.cleaned_collection,
        DataType.POSTS.vector_collection,
        DataType.ARTICLES.cleaned_collection,
        DataType.ARTICLES.vector_collection,
        SYNC_STATE_COLLECTION,
    ]
    payloads = {name: [p.payload for p in store.scroll(name)] for name in collections}
    assert all(payloads.values()), {k: len(v) for k, v in payloads.items()}
    for items in payloads.values():
        for payload in items:
            json.dumps(payload, ensure_ascii=False).encode("utf-8")  # raises on a surrogate
    (cleaned_post,) = payloads[DataType.POSTS.cleaned_collection]
    assert cleaned_post["platform"] == "linkedin\ufffd"
    (cleaned_article,) = payloads[DataType.ARTICLES.cleaned_collection]
    assert cleaned_article["link"].endswith("?x=\ufffd")
