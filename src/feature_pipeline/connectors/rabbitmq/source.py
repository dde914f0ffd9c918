"""Bytewax source reading RabbitMQ queues, acknowledging only what the dataflow has written.

Parallelism: one partition per queue (the main queue and each shard queue); Bytewax spreads the
partitions over the workers, and each partition owns its own pika connection.

Delivery guarantee: at least once. Bytewax calls a partition's `snapshot()` at the end of each
epoch, and calls `next_batch()` of the next epoch only after the whole dataflow, sinks
included, has finished the closed one. So the first `next_batch()` after a `snapshot()` acks
every delivery tag read before that snapshot: by then their features are durably written. A
crash before that ack redelivers them; writes are idempotent, so nothing is doubled.

Connection health while busy: each partition's connection is served by an I/O thread of its own
(`_Consumer`), which answers heartbeats and buffers deliveries while the worker spends minutes on
a batch; the worker thread touches the connection only through `add_callback_threadsafe`
(acks, cancel), pika's one thread-safe call. The broker's channel-wide basic.qos count keeps
the buffer to about one batch (BATCH_SIZE) beyond what the worker was handed, and the unacked
deliveries under RABBITMQ_PREFETCH_BYTES (adapted to the sizes seen): a queue of large messages
cannot fill the memory, and a crash or stop sends back only what was delivered and not handled.

One consumer per queue: each partition consumes its queue exclusively, so per-document order
holds even if a second pipeline is started on the same queues by mistake (plain replicas). That
one stands by: it retries every few seconds and takes over when the active consumer goes away.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import partial

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPConnectionError, AMQPError, ChannelClosedByBroker
from pika.spec import Basic, BasicProperties

from feature_pipeline.connectors.rabbitmq.publisher import (
    CONTINUED_HEADER,
    PUBLISHED_AT_HEADER,
    connect,
)
from feature_pipeline.connectors.rabbitmq.topology import consumed_queues, declare_topology
from feature_pipeline.connectors.retry import RetryInterrupted, describe_error
from feature_pipeline.domain.changes import InboundMessage
from feature_pipeline.metrics import metrics
from feature_pipeline.redaction import redact
from feature_pipeline.settings import Settings
from feature_pipeline.status import readiness

log = logging.getLogger(__name__)

ACCESS_REFUSED = 403  # what the broker answers when another consumer holds the queue exclusively
STANDBY_RETRY_S = 2.0
#: How long the I/O thread waits for the broker per turn; also how soon it notices a close.
IO_TURN_S = 0.2


class _Consumer:
    """One queue's connection, served by an I/O thread: heartbeats are answered and deliveries
    buffered however long the worker is busy.

    Everything that touches the connection runs on the I/O thread once `start` is called; the
    worker thread only takes buffered messages (under a lock) and asks for acks and the cancel
    through `add_callback_threadsafe`, which pika runs on the I/O thread in order.
    """

    def __init__(
        self,
        settings: Settings,
        queue: str,
        connection: BlockingConnection,
        channel: BlockingChannel,
    ) -> None:
        self._queue = queue
        self._connection = connection
        self._channel = channel
        self._max_prefetch = settings.rabbitmq_prefetch
        # Deliveries buffered beyond those handed out: enough for the next batch to be ready
        # when the worker asks; more would only be redelivered after a crash or a stop.
        self._lookahead = settings.batch_size
        self._unacked_gauge = metrics.messages_unacked.labels(queue)
        self._budget = settings.rabbitmq_prefetch_bytes
        # One message until sizes are known: the first delivery sets the limit the budget allows
        # (a round trip), where a larger start could put far more than the budget on the wire.
        self._prefetch = 1
        self._lock = threading.Lock()
        self._buffer: deque[tuple[int, InboundMessage]] = deque()  # guarded by _lock
        self.first_buffered_at: datetime | None = None  # guarded by _lock
        # The I/O thread's own: (tag, size) delivered and not acked, oldest first.
        self._unacked: deque[tuple[int, int]] = deque()
        self._unacked_bytes = 0
        self._seen_messages = 0
        self._seen_bytes = 0
        self._serving = True
        #: What ended the I/O thread, if the connection failed; the worker then reconnects.
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"amqp {queue}", daemon=True)

    def set_prefetch(self) -> None:
        """The first limit, channel-wide (`global_qos`): unlike a consumer's own, RabbitMQ
        applies a changed channel limit to the consumer that already runs."""
        self._channel.basic_qos(prefetch_count=self._prefetch, global_qos=True)

    def start(self) -> None:
        self._unacked_gauge.set(0)
        self._thread.start()

    def on_message(
        self, _ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes
    ) -> None:
        message = InboundMessage(
            source=self._queue,
            body=body,
            published_at=_published_at(props),
            stamp=_stamp(props),
            redelivered=bool(method.redelivered),
            continued=_continued(props),
        )
        with self._lock:
            if not self._buffer:
                self.first_buffered_at = datetime.now(UTC)
            self._buffer.append((method.delivery_tag, message))
        self._unacked.append((method.delivery_tag, len(body)))
        self._unacked_bytes += len(body)
        self._seen_messages += 1
        self._seen_bytes += len(body)
        self._adapt_prefetch()
        self._unacked_gauge.set(len(self._unacked))

    def take(self, limit: int) -> list[tuple[int, InboundMessage]]:
        """Up to `limit` buffered messages, oldest first (worker thread)."""
        with self._lock:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), limit))]
            self.first_buffered_at = datetime.now(UTC) if self._buffer else None
        if batch:  # room for the next batch's deliveries
            self._connection.add_callback_threadsafe(self._adapt_prefetch)
        return batch

    def buffered(self) -> tuple[int, datetime | None]:
        with self._lock:
            return len(self._buffer), self.first_buffered_at

    def drop_buffered(self) -> None:
        """Forget what was never handed out: the broker redelivers it after the close."""
        with self._lock:
            self._buffer.clear()
            self.first_buffered_at = None

    def ack_upto(self, tag: int) -> None:
        """Ack every delivery up to `tag` (worker thread; sent by the I/O thread)."""
        self._connection.add_callback_threadsafe(partial(self._ack, tag))

    def cancel(self, consumer_tag: str) -> None:
        self._connection.add_callback_threadsafe(partial(self._channel.basic_cancel, consumer_tag))

    def close(self) -> None:
        """Stop the I/O thread after the requests already made (acks) and close the connection."""
        if self._thread.is_alive():
            # Already closed: the thread is ending by itself.
            with contextlib.suppress(AMQPError):
                self._connection.add_callback_threadsafe(self._stop_serving)
            self._thread.join(timeout=30)
        elif self._connection.is_open:  # never started (stopped while standing by)
            self._close_connection()

    def _ack(self, tag: int) -> None:
        self._channel.basic_ack(delivery_tag=tag, multiple=True)
        while self._unacked and self._unacked[0][0] <= tag:
            self._unacked_bytes -= self._unacked.popleft()[1]
        self._adapt_prefetch()
        self._unacked_gauge.set(len(self._unacked))

    def _adapt_prefetch(self) -> None:
        """Keep the channel's count limit at the handed-out deliveries plus one batch's
        lookahead, and within what the byte budget allows by the mean size seen.

        Over budget, the limit is what is unacked now: the broker sends nothing until an ack.
        Deliveries already on the wire when the limit changes still arrive, so the budget can be
        passed by those (at most one limit's worth of messages).
        """
        unacked = len(self._unacked)
        with self._lock:
            handed_out = unacked - len(self._buffer)
        over = self._unacked_bytes >= self._budget
        if over:
            wanted = max(1, unacked)
        else:
            mean = self._seen_bytes / self._seen_messages if self._seen_messages else 1.0
            room = int((self._budget - self._unacked_bytes) / max(mean, 1.0))
            wanted = max(1, min(self._max_prefetch, unacked + room, handed_out + self._lookahead))
        # Small drifts of the mean are not worth a round trip each; a pause always is.
        if wanted != self._prefetch and (over or abs(wanted - self._prefetch) * 8 > self._prefetch):
            self._channel.basic_qos(prefetch_count=wanted, global_qos=True)
            self._prefetch = wanted

    def _stop_serving(self) -> None:
        self._serving = False

    def _serve(self) -> None:
        try:
            while self._serving:
                self._connection.process_data_events(time_limit=IO_TURN_S)
        except Exception as exc:  # handed to the worker, which reconnects
            self.error = exc
        self._close_connection()

    def _close_connection(self) -> None:
        try:
            if self._connection.is_open:
                self._connection.close()
        except AMQPError:
            pass
        # Closed, the connection holds nothing unacked: the broker requeued it.
        self._unacked_gauge.set(0)


class _QueuePartition(StatefulSourcePartition[InboundMessage, None]):
    def __init__(self, settings: Settings, queue: str, stop: threading.Event) -> None:
        self._settings = settings
        self._queue = queue
        self._stop = stop
        self._max_wait = timedelta(milliseconds=settings.batch_max_wait_ms)
        self._last_read_tag: int | None = None  # last tag handed to the dataflow
        self._ack_upto: int | None = None  # every tag <= this is in a closed epoch
        self._stopping = False
        self._consumer: _Consumer | None = None  # set once consuming
        self._open()

    def _open(self) -> None:
        """Connect and consume, retrying while the broker is down or drops the connection."""
        while not self._stop.is_set():
            try:
                self._open_once()
                return
            except AMQPConnectionError as exc:  # lost while declaring or standing by
                log.warning("lost the broker on %s (%s); reconnecting", self._queue, exc)
                self._stop.wait(1.0)

    def _open_once(self) -> None:
        if self._stop.is_set():  # stopped before this partition connected: nothing to read
            return
        readiness.waiting(self._part, "connecting to RabbitMQ")
        try:
            connection = connect(
                self._settings, attempts=None, stop=self._stop, on_error=_broker_down
            )
        except RetryInterrupted:  # stopped while the broker was down: nothing read, nothing to ack
            log.info("stopped while waiting for the broker (%s)", self._queue)
            return
        try:
            self._consume(connection)
        finally:
            if self._consumer is None and connection.is_open:  # failed or stopped: not used
                with contextlib.suppress(AMQPError):
                    connection.close()

    def _consume(self, connection: BlockingConnection) -> None:
        channel = connection.channel()
        declare_topology(channel, self._settings)
        standing_by = False
        while not self._stop.is_set():
            if channel.is_closed:  # the broker closes the channel on a refused consume
                channel = connection.channel()
            consumer = _Consumer(self._settings, self._queue, connection, channel)
            consumer.set_prefetch()
            try:
                self._consumer_tag = channel.basic_consume(
                    self._queue, consumer.on_message, auto_ack=False, exclusive=True
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
                # Serve heartbeats while waiting (this thread owns the connection until then).
                connection.sleep(STANDBY_RETRY_S)
                continue
            consumer.start()
            self._consumer = consumer
            readiness.ready(self._part)
            readiness.ready("broker")  # `run` waits for the first queue it consumes
            log.info("consuming %s", self._queue)
            return

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
        consumer = self._consumer
        if consumer is None:  # stopped while standing by: nothing was read, nothing to ack
            self.close()
            raise StopIteration
        if consumer.error is not None:
            if isinstance(consumer.error, AMQPError):
                raise consumer.error
            raise AMQPError(f"the connection's I/O thread failed: {consumer.error!r}")
        self._ack_closed_epoch(consumer)
        if self._stop.is_set():
            return self._drain_for_stop(consumer)
        if not self._batch_ready(consumer):
            return []
        batch = consumer.take(self._batch_size)
        self._last_read_tag = batch[-1][0]
        metrics.add("events_received", len(batch), label=self._queue)
        return [message for _, message in batch]

    @property
    def _batch_size(self) -> int:
        return self._settings.batch_size

    def _batch_ready(self, consumer: _Consumer) -> bool:
        """Hold a small batch back up to the max wait, so chunks of many events embed together."""
        count, first_at = consumer.buffered()
        if not count:
            return False
        if count >= self._batch_size:
            return True
        assert first_at is not None
        return datetime.now(UTC) - first_at >= self._max_wait

    def next_awake(self) -> datetime | None:
        if self._consumer is not None:
            count, first_at = self._consumer.buffered()
            if count and first_at is not None:
                return first_at + self._max_wait
        # Idle: look at the buffer again soon, without spinning a core.
        return datetime.now(UTC) + max(self._max_wait, timedelta(milliseconds=5))

    def snapshot(self) -> None:
        self._ack_upto = self._last_read_tag
        return None

    def _ack_closed_epoch(self, consumer: _Consumer) -> None:
        if self._ack_upto is not None:
            consumer.ack_upto(self._ack_upto)
            if self._ack_upto == self._last_read_tag:
                self._last_read_tag = None
            self._ack_upto = None

    def _drain_for_stop(self, consumer: _Consumer) -> list[InboundMessage]:
        """Stop consuming; once everything handed out is acked, end this partition."""
        if not self._stopping:
            self._stopping = True
            consumer.cancel(self._consumer_tag)
            # Buffered but never handed out: the broker redelivers them after we close.
            consumer.drop_buffered()
            log.info("stopping %s after the epoch in flight", self._queue)
        if self._last_read_tag is None:
            self.close()  # the I/O thread sends the acks asked for before it closes
            raise StopIteration
        return []

    def _reconnect(self, exc: Exception) -> None:
        # Unacked messages of the lost channel go back to the queue and are redelivered:
        # forget their tags, they mean nothing on a new channel.
        log.warning("lost the broker on %s (%s); reconnecting", self._queue, describe_error(exc))
        readiness.waiting(self._part, f"reconnecting to RabbitMQ after {type(exc).__name__}")
        _broker_down(exc)
        self._last_read_tag = None
        self._ack_upto = None
        self.close()
        self._consumer = None
        self._stop.wait(1.0)
        self._open()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def _broker_down(exc: BaseException) -> None:
    """`/ready` says the broker is down, and why, until a queue is consumed again."""
    readiness.waiting("broker", redact(describe_error(exc)))


def _stamp(props: BasicProperties) -> str | None:
    """The producer's identity of this message: its message-id, else our publish-time header."""
    if props.message_id:
        return str(props.message_id)
    stamp = (props.headers or {}).get(PUBLISHED_AT_HEADER)
    return None if stamp is None else str(stamp)


def _continued(props: BasicProperties) -> bool:
    """Queued again by the pipeline for a long document's next turn."""
    return (props.headers or {}).get(CONTINUED_HEADER) is True


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
