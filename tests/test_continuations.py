"""A long document's event queued again for its next turn (real broker): unchanged body, to the
queue it came from, its producer stamp and publish time kept (dead-letter ids and freshness stay
those of the original message), confirmed before `send` returns."""

from __future__ import annotations

import json

import pika
import pytest

from feature_pipeline.connectors.rabbitmq.continuations import ContinuationPublisher
from feature_pipeline.connectors.rabbitmq.publisher import CONTINUED_HEADER, EventPublisher
from feature_pipeline.connectors.rabbitmq.source import _continued, _published_at, _stamp
from feature_pipeline.domain.changes import DocumentChange
from feature_pipeline.domain.events import Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings


def _change(settings: Settings, **fields: object) -> DocumentChange:
    body = json.dumps({"op": "delete", "type": "posts", "entry_id": "p", "ts": 7}).encode()
    values = {
        "op": Op.DELETE,
        "type": DataType.POSTS,
        "entry_id": "p",
        "ts": 7,
        "source": settings.rabbitmq_queue,
        "body": body,
    }
    return DocumentChange(**{**values, **fields})


def _get_one(settings: Settings) -> tuple[pika.BasicProperties, bytes]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    try:
        method, properties, body = connection.channel().basic_get(
            settings.rabbitmq_queue, auto_ack=True
        )
        assert method is not None, "nothing was queued"
        return properties, body
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("stamp", "published_at"), [("msg-42", 1_700_000_000.123456), (None, None)]
)
def test_an_event_goes_back_to_its_queue_as_it_came(
    settings: Settings, stamp: str | None, published_at: float | None
) -> None:
    EventPublisher(settings).close()  # declares the topology
    change = _change(settings, stamp=stamp, published_at=published_at)
    continuations = ContinuationPublisher(settings)
    try:
        continuations.send([change])
    finally:
        continuations.close()
    properties, body = _get_one(settings)
    assert body == change.body
    assert (properties.headers or {}).get(CONTINUED_HEADER) is True
    assert _continued(properties)  # the source marks it, to take the change kept in memory
    assert not _continued(pika.BasicProperties(headers={CONTINUED_HEADER: "yes"}))
    assert properties.delivery_mode == 2
    assert _stamp(properties) == stamp
    if published_at is None:
        assert _published_at(properties) is None
    else:
        assert _published_at(properties) == pytest.approx(published_at, abs=1e-6)


def test_a_change_without_a_queue_or_body_is_refused(settings: Settings) -> None:
    continuations = ContinuationPublisher(settings)
    with pytest.raises(ValueError, match="no source queue or body"):
        continuations.send([_change(settings, source="")])
    continuations.close()
