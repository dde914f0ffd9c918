"""Bytewax sink sending dead letters to the dead-letter queue, confirmed before the source acks.

Idempotent per message: each dead letter carries `x-dead-letter-id`, a hash of where the
message came from, its producer's stamp (message-id, else its publish-time header) and its body,
so the same poison message always gets the same id. A message is dead-lettered and then acked
once its epoch closes; if the process loses the broker or dies in between, the message is
redelivered, and without care it would be dead-lettered a second time. Covered:

- Redelivery within one process lifetime (a lost connection, a closed channel): the ids sent
  are remembered (the last RECENT_IDS of them) and a repeat is skipped.
- A publish whose confirm was lost with its connection (the broker may have queued it): the
  retry first looks for its id among the first DLQ_SCAN_LIMIT dead letters in the queue.
- Redelivery after a restart: the broker marks it `redelivered`; on the first such message the
  sink reads the ids of the first DLQ_SCAN_LIMIT dead letters in the queue (putting them back,
  as `dlq list` does) and skips those. A dead letter already consumed or replayed from the
  queue, or beyond the scan, is not seen: then it is sent again (at least once, as before).

Two messages with the same source, stamp and body are one poison message to this sink: a
producer that stamps nothing and publishes the same bad body twice gets one dead letter.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from pika.exceptions import AMQPError

from feature_pipeline.connectors.rabbitmq.publisher import (
    DEAD_LETTER_ID_HEADER,
    LazyPublisher,
    connect,
)
from feature_pipeline.connectors.retry import retry_with_backoff
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings
from feature_pipeline.status import recent_dead_letters

log = logging.getLogger(__name__)

#: Dead-letter ids this process remembers (oldest forgotten first).
RECENT_IDS = 100_000
#: Dead letters read from the queue's head to learn what an earlier process sent.
DLQ_SCAN_LIMIT = 10_000


def dead_letter_id(letter: DeadLetter) -> str:
    """The same message (source queue, producer stamp, body) always gets the same id."""
    digest = hashlib.sha256()
    for part in (letter.source.encode(), (letter.stamp or "").encode(), letter.body):
        digest.update(len(part).to_bytes(8, "big"))  # lengths keep the parts apart
        digest.update(part)
    return digest.hexdigest()


class _RecentIds:
    """A bounded set, least recently seen forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, letter_id: str) -> bool:
        if letter_id in self._ids:
            self._ids.move_to_end(letter_id)
            return True
        return False

    def add(self, letter_id: str) -> None:
        self._ids[letter_id] = None
        self._ids.move_to_end(letter_id)
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)


def dead_letter_ids_in_queue(settings: Settings, limit: int = DLQ_SCAN_LIMIT) -> set[str]:
    """The `x-dead-letter-id` of the first `limit` messages of the dead-letter queue, which is
    left as it was (every message taken is put back in its place)."""
    connection = connect(settings)
    try:
        channel = connection.channel()
        queue = settings.dead_letter_queue
        depth = channel.queue_declare(queue, durable=True, passive=True).method.message_count
        ids = set()
        for _ in range(min(depth, limit)):
            method, properties, _body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            letter_id = (properties.headers or {}).get(DEAD_LETTER_ID_HEADER)
            if isinstance(letter_id, bytes):
                letter_id = letter_id.decode(errors="replace")
            if isinstance(letter_id, str):
                ids.add(letter_id)
        # Tag 0 with `multiple` puts back every message this channel took.
        channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)
        return ids
    finally:
        with contextlib.suppress(AMQPError):
            connection.close()


class _DeadLetterPartition(StatefulSinkPartition[DeadLetter, None]):
    def __init__(self, settings: Settings, on_written: Callable[[int], None] | None) -> None:
        self._settings = settings
        self._on_written = on_written
        self._publisher = LazyPublisher(settings)
        self._sent = _RecentIds(RECENT_IDS)
        self._queue_scanned = False

    def write_batch(self, items: list[DeadLetter]) -> None:
        sent: list[DeadLetter] = []
        for item in items:
            letter_id = dead_letter_id(item)
            if self._sent_before(item, letter_id):
                log.info(
                    "not dead-lettering a redelivered message from %s again (%s %s)",
                    item.source,
                    DEAD_LETTER_ID_HEADER,
                    letter_id[:16],
                )
                metrics.add("dead_letters_repeated")
                continue
            self._publish_once(item, letter_id)
            self._sent.add(letter_id)
            sent.append(item)
        metrics.add("dead_letters", len(sent))
        recent_dead_letters.add(sent)
        if self._on_written is not None:
            self._on_written(len(items))

    def _sent_before(self, item: DeadLetter, letter_id: str) -> bool:
        if letter_id in self._sent:
            return True
        if not item.redelivered:  # never delivered before: cannot have been dead-lettered
            return False
        if not self._queue_scanned:  # once per process: later ones are remembered here
            ids = retry_with_backoff(
                lambda: dead_letter_ids_in_queue(self._settings),
                "reading the dead-letter queue's ids",
                retry_on=(AMQPError,),
            )
            for known in ids:
                self._sent.add(known)
            self._queue_scanned = True
            return letter_id in self._sent
        return False

    def _publish_once(self, item: DeadLetter, letter_id: str) -> None:
        """Publish, retrying; a retry first looks for the letter in the queue, since a publish
        whose confirm was lost with its connection may have been queued all the same."""
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and letter_id in dead_letter_ids_in_queue(self._settings):
                return
            self._publish(item, letter_id)

        retry_with_backoff(attempt, "publishing a dead letter", retry_on=(AMQPError,))

    def _publish(self, item: DeadLetter, letter_id: str) -> None:
        self._publisher.call(
            lambda publisher: publisher.publish_dead_letter(
                item.body,
                reason=item.reason,
                error_type=item.error_type,
                source_queue=item.source,
                letter_id=letter_id,
            )
        )

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._publisher.close()


class DeadLetterQueueSink(FixedPartitionedSink[DeadLetter, None]):
    """Publishes each dead letter, with its reason in the `x-error` header and its id in
    `x-dead-letter-id`, to `<queue>.dlq`; a redelivered one already sent is skipped."""

    def __init__(self, settings: Settings, on_written: Callable[[int], None] | None = None) -> None:
        self._settings = settings
        self._on_written = on_written

    def list_parts(self) -> list[str]:
        return ["dead-letters"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DeadLetterPartition:
        return _DeadLetterPartition(self._settings, self._on_written)
