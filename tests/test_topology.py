"""The broker topology stays compatible with the course's publisher, and routes per document."""

from __future__ import annotations

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.connectors.rabbitmq.topology import declare_topology
from feature_pipeline.domain.events import ChangeEvent, Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings


def channel(settings: Settings) -> tuple[pika.BlockingConnection, object]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    return connection, connection.channel()


def test_the_course_publishers_declaration_still_works_on_our_queue(settings: Settings) -> None:
    connection, ch = channel(settings)
    declare_topology(ch, settings)
    # What the course's CDC service runs before each publish: durable, no other arguments.
    ch.queue_declare(queue=settings.rabbitmq_queue, durable=True)
    # A queue declared with other arguments would make that declaration fail (the check bites).
    other = f"{settings.rabbitmq_queue}.quorum"
    ch.queue_declare(queue=other, durable=True, arguments={"x-queue-type": "quorum"})
    with pytest.raises(ChannelClosedByBroker):
        ch.queue_declare(queue=other, durable=True)
    _, ch2 = channel(settings)
    ch2.queue_delete(other)
    connection.close()


def test_every_event_of_a_document_lands_in_the_same_shard(settings: Settings) -> None:
    events = [
        ChangeEvent(op=Op.DELETE, type=DataType.POSTS, entry_id=f"doc-{i % 10}", ts=i)
        for i in range(100)
    ]
    with EventPublisher(settings) as publisher:
        publisher.publish(events)
    connection, ch = channel(settings)
    shard_of: dict[str, set[str]] = {}
    order: dict[str, list[int]] = {}
    for queue in settings.shard_queues:
        while True:
            method, _, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            event = ChangeEvent.model_validate_json(body)
            shard_of.setdefault(event.entry_id, set()).add(queue)
            order.setdefault(event.entry_id, []).append(event.ts or 0)
    connection.close()
    assert sum(len(v) for v in order.values()) == 100
    assert all(len(queues) == 1 for queues in shard_of.values())
    assert all(ts == sorted(ts) for ts in order.values())
    assert len(set().union(*shard_of.values())) > 1, "all documents went to one shard"
