"""Queues a long document's event again, so the documents queued behind it go first.

The feature store sink ends a long document's turn after `LONG_DOCUMENT_TURN_S` (see sync.py):
its progress is in the store (the document's sync state says how many of its chunks are
written), and its event goes back to the queue it came from, unchanged, to resume there on its
next turn. The publish is confirmed before the sink returns, so the original message is
acknowledged (with its epoch) only once its continuation is safely queued.

A crash between the publish and the ack redelivers the original as well: two turns of one
version then run, each resuming from the store's progress, and whichever finishes first makes
the other stale. A duplicate costs work, never correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pika.exceptions import AMQPError

from feature_pipeline.connectors.rabbitmq.publisher import LazyPublisher
from feature_pipeline.connectors.retry import retry_with_backoff
from feature_pipeline.domain.changes import DocumentChange
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)


class ContinuationPublisher:
    """Publishes unfinished long documents' events to their queues, on a connection of its own."""

    def __init__(self, settings: Settings) -> None:
        self._publisher = LazyPublisher(settings)

    def send(self, changes: Sequence[DocumentChange]) -> None:
        """Returns once the broker confirmed each event; retries while it is unreachable."""
        for change in changes:
            if not change.source or not change.body:
                raise ValueError(f"{change.key}: no source queue or body to queue it again")
            retry_with_backoff(
                lambda change=change: self._publisher.call(  # type: ignore[misc]
                    lambda publisher: publisher.publish_again(
                        change.body,
                        queue=change.source,
                        stamp=change.stamp,
                        published_at=change.published_at,
                    )
                ),
                "queueing a long document for its next turn",
                retry_on=(AMQPError,),
            )
            log.info(
                "long document %s: queued again on %s for its next turn", change.key, change.source
            )

    def close(self) -> None:
        self._publisher.close()
