"""The broker topology both producers and the pipeline declare, and how events are routed.

Messages for one document must be applied in publish order. Producers of ours publish to a
consistent-hash exchange keyed by the document id, which sends every event of a document to the
same shard queue; each queue is read by exactly one source partition. The course's CDC service
publishes straight to the main queue (default exchange, routing key = queue name), which is one
more partition of its own, so its messages keep their order too.

    producer (ours) --key=type:entry_id--> <queue>.router (x-consistent-hash)
                                              |-> <queue>.shard.0 --> partition 0
                                              |-> <queue>.shard.N --> partition N
    course CDC --------------------------------> <queue>        --> partition "main"
"""

from __future__ import annotations

from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import ChannelClosedByBroker, ConnectionClosedByBroker

from feature_pipeline.settings import Settings, SettingsError

ROUTER_EXCHANGE_TYPE = "x-consistent-hash"


class TopologyError(SettingsError):
    """The broker refused the topology; the message says what to change (one line, exit 2)."""


def router_exchange(settings: Settings) -> str:
    return f"{settings.rabbitmq_queue}.router"


def routing_key(data_type: str, entry_id: str) -> str:
    return f"{data_type}:{entry_id}"


def declare_topology(
    channel: BlockingChannel, settings: Settings, *, router_type: str | None = None
) -> None:
    """Declare the sharded router, the main queue and the dead-letter queue (idempotent).

    The router comes first: without the consistent-hash plugin RabbitMQ refuses its type by
    closing the whole connection (503 COMMAND_INVALID), and nothing is left half-declared.
    The main queue is declared exactly as the course's publisher declares it (durable, no
    arguments), or that publisher's declaration would fail against ours. `router_type` replaces
    the exchange type (tests: a type the broker lacks, as if the plugin were off).
    """
    exchange = router_exchange(settings)
    if settings.shard_queues:
        exchange_type = router_type or ROUTER_EXCHANGE_TYPE
        try:
            channel.exchange_declare(exchange=exchange, exchange_type=exchange_type, durable=True)
        except (ChannelClosedByBroker, ConnectionClosedByBroker) as exc:
            raise TopologyError(
                f"the broker refused exchange {exchange!r} of type {exchange_type} "
                f"({exc.reply_code} {exc.reply_text}). Enable the plugin with `rabbitmq-plugins "
                "enable rabbitmq_consistent_hash_exchange`, or set RABBITMQ_SHARDS=0 to use the "
                "main queue only."
            ) from None
    channel.queue_declare(queue=settings.rabbitmq_queue, durable=True)
    channel.queue_declare(queue=settings.dead_letter_queue, durable=True)
    for queue in settings.shard_queues:
        channel.queue_declare(queue=queue, durable=True)
        # The binding key of a consistent-hash exchange is the queue's weight.
        channel.queue_bind(queue=queue, exchange=exchange, routing_key="1")


def delete_topology(channel: BlockingChannel, settings: Settings) -> None:
    """Remove every queue and the router of this topology, messages included (tests, benches,
    tearing a deployment down)."""
    for queue in [settings.rabbitmq_queue, settings.dead_letter_queue, *settings.shard_queues]:
        channel.queue_delete(queue=queue)
    channel.exchange_delete(exchange=router_exchange(settings))


def consumed_queues(settings: Settings) -> list[str]:
    """Every queue the pipeline reads, one Bytewax partition each."""
    return [settings.rabbitmq_queue, *settings.shard_queues]
