"""Bytewax source reading RabbitMQ queues, acknowledging only what the dataflow has written.

Parallelism: one partition per queue (the main queue and each shard queue); Bytewax spreads the
partitions over the workers, and each partition owns its own pika connection.

Delivery guarantee: at least once. Bytewax calls a partition's `snapshot()` at the end of each
epoch, and calls `next_batch()` of the next epoch only after the whole dataflow, sinks
included, has finished the closed one. So the first `next_batch()` after a `snapshot()` acks
every delivery tag read before that snapshot: by then their features are durably written. A
crash before that ack redelivers them; writes are idempotent, so nothing is doubled.

One consumer per queue: each partition consumes its queue exclusively, so per-document order
holds even if a second pipeline is started on the same queues by mistake (plain replicas). That
one stands by: it retries every few seconds and takes over when the active consumer goes away.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime, timedelta

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError, ChannelClosedByBroker
from pika.spec import Basic, BasicProperties

from feature_pipeline.connectors.rabbitmq.publisher import PUBLISHED_AT_HEADER, connect
from feature_pipeline.connectors.rabbitmq.topology import consumed_queues, declare_topology
from feature_pipeline.connectors.retry import RetryInterrupted
from feature_pipeline.domain.changes import InboundMessage
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings
from feature_pipeline.status import readiness

log = logging.getLogger(__name__)

ACCESS_REFUSED = 403  # what the broker answers when another consumer holds the queue exclusively
STANDBY_RETRY_S = 2.0


class _QueuePartition(StatefulSourcePartition[InboundMessage, None]):
    def __init__(self, settings: Settings, queue: str, stop: threading.Event) -> None:
        self._settings = settings
        self._queue = queue
        self._stop = stop
        self._max_wait = timedelta(milliseconds=settings.batch_max_wait_ms)
        self._buffer: deque[tuple[int, InboundMessage]] = deque()
        self._first_buffered_at: datetime | None = None
        self._last_read_tag: int | None = None  # last tag handed to the dataflow
        self._ack_upto: int | None = None  # every tag <= this is in a closed epoch
        self._stopping = False
        self._consuming = False
        self._connection: BlockingConnection
        self._channel: BlockingChannel
        self._open()

    def _open(self) -> None:
        if self._stop.is_set():  # stopped before this partition connected: nothing to read
            return
        readiness.waiting(self._part, "connecting to RabbitMQ")
        try:
            self._connection = connect(self._settings, attempts=None, stop=self._stop)
        except RetryInterrupted:  # stopped while the broker was down: nothing read, nothing to ack
            log.info("stopped while waiting for the broker (%s)", self._queue)
            return
        self._channel = self._connection.channel()
        declare_topology(self._channel, self._settings)
        standing_by = False
        while not self._stop.is_set():
            if self._channel.is_closed:  # the broker closes the channel on a refused consume
                self._channel = self._connection.channel()
            self._channel.basic_qos(prefetch_count=self._settings.rabbitmq_prefetch)
            try:
                self._consumer_tag = self._channel.basic_consume(
                    self._queue, self._on_message, auto_ack=False, exclusive=True
                )
            except ChannelClosedByBroker as exc:
                if exc.reply_code != ACCESS_REFUSED:
                    raise
                if not standing_by:
                    readiness.waiting(self._part, "standing by: another pipeline consumes it")
                    log.warning(
                        "%s is consumed by another pipeline (a second `feature-pipeline run` on "
                        "RABBITMQ_QUEUE=%s?); standing by until it stops",
                        self._queue,
                        self._settings.rabbitmq_queue,
                    )
                    standing_by = True
                self._stop.wait(STANDBY_RETRY_S)
                continue
            self._consuming = True
            readiness.ready(self._part)
            readiness.ready("broker")  # `run` waits for the first queue it consumes
            log.info("consuming %s", self._queue)
            return

    def _on_message(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        if not self._buffer:
            self._first_buffered_at = datetime.now(UTC)
        message = InboundMessage(source=self._queue, body=body, published_at=_published_at(props))
        self._buffer.append((method.delivery_tag, message))

    @property
    def _part(self) -> str:
        """This partition's name in the readiness report."""
        return f"queue {self._queue}"

    def next_batch(self) -> list[InboundMessage]:
        try:
            return self._next_batch()
        except AMQPError as exc:
            self._reconnect(exc)
            return []

    def _next_batch(self) -> list[InboundMessage]:
        if not self._consuming:  # stopped while standing by: nothing was read, nothing to ack
            self.close()
            raise StopIteration
        self._ack_closed_epoch()
        if self._stop.is_set():
            return self._drain_for_stop()
        self._connection.process_data_events(time_limit=0)
        if not self._batch_ready():
            return []
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self._batch_size))]
        self._first_buffered_at = datetime.now(UTC) if self._buffer else None
        self._last_read_tag = batch[-1][0]
        metrics.add("events_received", len(batch), label=self._queue)
        return [message for _, message in batch]

    @property
    def _batch_size(self) -> int:
        return self._settings.batch_size

    def _batch_ready(self) -> bool:
        """Hold a small batch back up to the max wait, so chunks of many events embed together."""
        if not self._buffer:
            return False
        if len(self._buffer) >= self._batch_size:
            return True
        assert self._first_buffered_at is not None
        return datetime.now(UTC) - self._first_buffered_at >= self._max_wait

    def next_awake(self) -> datetime | None:
        if self._buffer and self._first_buffered_at is not None:
            return self._first_buffered_at + self._max_wait
        # Idle: poll the broker again soon, without spinning a core.
        return datetime.now(UTC) + max(self._max_wait, timedelta(milliseconds=5))

    def snapshot(self) -> None:
        self._ack_upto = self._last_read_tag
        return None

    def _ack_closed_epoch(self) -> None:
        if self._ack_upto is not None:
            self._channel.basic_ack(delivery_tag=self._ack_upto, multiple=True)
            if self._ack_upto == self._last_read_tag:
                self._last_read_tag = None
            self._ack_upto = None

    def _drain_for_stop(self) -> list[InboundMessage]:
        """Stop consuming; once everything handed out is acked, end this partition."""
        if not self._stopping:
            self._stopping = True
            self._channel.basic_cancel(self._consumer_tag)
            # Buffered but never handed out: the broker redelivers them after we close.
            self._buffer.clear()
            log.info("stopping %s after the epoch in flight", self._queue)
        if self._last_read_tag is None:
            self.close()
            raise StopIteration
        self._connection.process_data_events(time_limit=0)
        return []

    def _reconnect(self, exc: Exception) -> None:
        # Unacked messages of the lost channel go back to the queue and are redelivered:
        # forget their tags, they mean nothing on a new channel.
        log.warning("lost the broker on %s (%r); reconnecting", self._queue, exc)
        readiness.waiting(self._part, f"reconnecting to RabbitMQ after {type(exc).__name__}")
        self._buffer.clear()
        self._first_buffered_at = None
        self._last_read_tag = None
        self._ack_upto = None
        self._consuming = False
        self.close()
        self._stop.wait(1.0)
        self._open()

    def close(self) -> None:
        connection = getattr(self, "_connection", None)  # none if stopped before connecting
        try:
            if connection is not None and connection.is_open:
                connection.close()
        except AMQPError:
            pass


def _published_at(props: BasicProperties) -> float | None:
    """When the producer published it: our header (microseconds), else the AMQP timestamp
    property (whole seconds, as other producers may set it), else unknown."""
    stamp = (props.headers or {}).get(PUBLISHED_AT_HEADER)
    if isinstance(stamp, int):
        return stamp / 1_000_000
    if isinstance(props.timestamp, int):
        return float(props.timestamp)
    return None


class RabbitMQSource(FixedPartitionedSource[InboundMessage, None]):
    """Reads the pipeline's queues (see `topology`); at-least-once, acked after the write.

    Messages come out in queue order per partition. No Bytewax recovery store is needed: the
    broker holds every unacknowledged message, and redelivers it after a crash.
    """

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        """`stop`, once set (from a signal handler), makes every partition finish the epoch in
        flight, ack it, and end."""
        self._settings = settings
        self._stop = stop or threading.Event()

    def list_parts(self) -> list[str]:
        return consumed_queues(self._settings)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _QueuePartition:
        if for_part not in self.list_parts():
            raise ValueError(
                f"unknown queue partition {for_part!r}; expected one of {self.list_parts()}"
            )
        return _QueuePartition(self._settings, for_part, self._stop)
