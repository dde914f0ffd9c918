"""Bytewax sink sending dead letters to the dead-letter queue, confirmed before the source acks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from pika.exceptions import AMQPError

from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.connectors.retry import retry_with_backoff
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings
from feature_pipeline.status import recent_dead_letters

log = logging.getLogger(__name__)


class _DeadLetterPartition(StatefulSinkPartition[DeadLetter, None]):
    def __init__(self, settings: Settings, on_written: Callable[[int], None] | None) -> None:
        self._settings = settings
        self._on_written = on_written
        self._publisher: EventPublisher | None = None

    def write_batch(self, items: list[DeadLetter]) -> None:
        for item in items:
            retry_with_backoff(
                lambda item=item: self._publish(item),
                "publishing a dead letter",
                retry_on=(AMQPError,),
            )
        metrics.add("dead_letters", len(items))
        recent_dead_letters.add(items)
        if self._on_written is not None:
            self._on_written(len(items))

    def _publish(self, item: DeadLetter) -> None:
        try:
            if self._publisher is None:
                self._publisher = EventPublisher(self._settings, connect_attempts=1)
            self._publisher.publish_dead_letter(
                item.body, reason=item.reason, error_type=item.error_type, source_queue=item.source
            )
        except AMQPError:
            self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(AMQPError):
                self._publisher.close()
            self._publisher = None

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._drop_connection()


class DeadLetterQueueSink(FixedPartitionedSink[DeadLetter, None]):
    """Publishes each dead letter, with its reason in the `x-error` header, to `<queue>.dlq`."""

    def __init__(self, settings: Settings, on_written: Callable[[int], None] | None = None) -> None:
        self._settings = settings
        self._on_written = on_written

    def list_parts(self) -> list[str]:
        return ["dead-letters"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DeadLetterPartition:
        return _DeadLetterPartition(self._settings, self._on_written)
