"""Both message shapes parse into one ChangeEvent; every malformed message says what is wrong."""

import json

import pytest

from feature_pipeline.domain.events import InvalidEvent, Op, event_document, parse_event
from feature_pipeline.domain.types import DataType


def test_course_shape_is_an_upsert_of_the_whole_document() -> None:
    body = {
        "platform": "linkedin",
        "content": {"text": "hi"},
        "author_id": "a",
        "type": "posts",
        "entry_id": "p1",
    }
    event = parse_event(json.dumps(body))
    assert event.op is Op.INSERT
    assert event.type is DataType.POSTS
    assert event.entry_id == "p1"
    assert event.document == {"platform": "linkedin", "content": {"text": "hi"}, "author_id": "a"}
    assert event.ts is None


def test_an_event_carries_every_field_of_a_warehouse_document_but_its_id() -> None:
    warehouse = {"_id": "p1", "platform": "linkedin", "content": {"text": "hi"}}
    assert event_document(warehouse) == {"platform": "linkedin", "content": {"text": "hi"}}
    assert warehouse["_id"] == "p1"  # the warehouse's copy is left as it was


def test_envelope_round_trips() -> None:
    body = {"op": "update", "type": "articles", "entry_id": "a1", "document": {"x": 1}, "ts": 42}
    event = parse_event(json.dumps(body).encode())
    assert (event.op, event.type, event.entry_id, event.ts) == (
        Op.UPDATE,
        DataType.ARTICLES,
        "a1",
        42,
    )
    assert parse_event(event.to_json()) == event


def test_delete_needs_no_document() -> None:
    event = parse_event(b'{"op": "delete", "type": "repositories", "entry_id": "r", "ts": 1}')
    assert event.is_delete and event.document is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "body is not UTF-8 at byte 0 \\(0xff\\)"),
        (b'{"type": "posts", "entry_id": "\xe9"}', "body is not UTF-8 at byte 31 \\(0xe9\\)"),
        (b'{"type": "posts",\x00 "entry_id": "x"}\n', "body has a NUL byte at byte 17"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"type": "tweets", "entry_id": "x"}', "type"),
        (b'{"type": "posts"}', "entry_id"),
        (b'{"op": "insert", "type": "posts", "entry_id": "x"}', "needs a 'document'"),
        (b'{"op": "delete", "type": "posts", "entry_id": "x", "document": {}}', "carries no"),
        (b'{"op": "upsert", "type": "posts", "entry_id": "x", "document": {}}', "op"),
        (b'{"op": "insert", "type": "posts", "entry_id": "x", "document": {}, "ts": -1}', "ts"),
        (
            b'{"op": "insert", "type": "posts", "entry_id": "x", "document": {}, "ts": %d}' % 2**63,
            "ts",
        ),
        (
            b'{"op": "insert", "type": "posts", "entry_id": "x", "document": {}, "extra": 1}',
            "unknown keys",
        ),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidEvent, match=fragment):
        parse_event(body)
