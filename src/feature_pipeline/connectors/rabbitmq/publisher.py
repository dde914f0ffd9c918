"""Publishes change events and dead letters: persistent messages, publisher confirms, one connection."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

import pika
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from feature_pipeline.connectors.rabbitmq.topology import (
    declare_topology,
    router_exchange,
    routing_key,
)
from feature_pipeline.connectors.retry import describe_error, retry_with_backoff
from feature_pipeline.domain.events import ChangeEvent
from feature_pipeline.redaction import redact
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)

JSON = "application/json"
#: When the message was published, in microseconds since the epoch (the pipeline's freshness).
PUBLISHED_AT_HEADER = "x-published-at-us"
#: Who a dead letter is: the same poison message always gets the same id (see dead_letters.py).
DEAD_LETTER_ID_HEADER = "x-dead-letter-id"
#: Marks a long document's event queued again for its next turn (for people reading the queue).
CONTINUED_HEADER = "x-continued"
#: AMQP short strings cap header values; a reason longer than this is cut.
MAX_REASON_CHARS = 4_000


class BrokerRefused(AMQPConnectionError):
    """The broker answered and refused RABBITMQ_URL's credentials or virtual host: retrying
    helps only once someone fixes the URL or the broker's users. One line, with no password."""

    def __init__(self, reason: str, url: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = redact(url)

    def __str__(self) -> str:
        return f"RabbitMQ at {self.url} (RABBITMQ_URL): {self.reason}"


def refusal(settings: Settings, exc: AMQPConnectionError) -> BrokerRefused | None:
    """What a failed connect means when the broker refused the login or the virtual host."""
    params = pika.URLParameters(settings.rabbitmq_url)
    user = getattr(params.credentials, "username", "?")
    if isinstance(exc, ProbableAuthenticationError):
        reason = f"the broker refused the credentials for user {user!r}"
    elif isinstance(exc, ProbableAccessDeniedError):
        reason = f"the broker refused user {user!r} access to virtual host {params.virtual_host!r}"
    else:
        return None
    return BrokerRefused(reason, settings.rabbitmq_url)


def connect(
    settings: Settings,
    *,
    attempts: int | None = 1,
    stop: threading.Event | None = None,
    on_error: Callable[[AMQPConnectionError], None] | None = None,
) -> BlockingConnection:
    """Open a blocking connection, retrying with backoff while the broker is down (`attempts`
    None: until it answers or `stop` is set, which raises `RetryInterrupted`). A refused login
    is retried too (someone may fix the broker's users), logged as such on each attempt;
    `on_error` hears of every failed attempt (the readiness report)."""
    params = pika.URLParameters(settings.rabbitmq_url)
    params.heartbeat = settings.rabbitmq_heartbeat_s
    params.blocked_connection_timeout = 300
    # Named, so an operator (or a test) can tell this process's connections apart on the broker.
    params.client_properties = {"connection_name": f"feature-pipeline pid {os.getpid()}"}

    def attempt() -> BlockingConnection:
        try:
            return pika.BlockingConnection(params)
        except AMQPConnectionError as exc:
            error = refusal(settings, exc) or exc
            if on_error is not None:
                on_error(error)
            raise error from None

    try:
        return retry_with_backoff(
            attempt,
            f"connecting to RabbitMQ at {redact(settings.rabbitmq_url)} (RABBITMQ_URL)",
            retry_on=(AMQPConnectionError,),
            first_delay_s=0.5,
            attempts=attempts,
            stop=stop,
        )
    except BrokerRefused:
        raise
    except AMQPConnectionError as exc:
        raise AMQPConnectionError(
            f"cannot reach RabbitMQ at {redact(settings.rabbitmq_url)} (RABBITMQ_URL) after "
            f"{attempts} attempt(s): {redact(describe_error(exc))}"
        ) from None


class EventPublisher:
    """Publishes to the pipeline's topology; returns only once the broker confirmed each message."""

    def __init__(self, settings: Settings, *, connect_attempts: int = 3) -> None:
        self._settings = settings
        self._connection = connect(settings, attempts=connect_attempts)
        self._channel: BlockingChannel = self._connection.channel()
        declare_topology(self._channel, settings)
        self._channel.confirm_delivery()

    def publish(self, events: Iterable[ChangeEvent], *, to_main_queue: bool = False) -> int:
        """Publish events routed by document (or, like the course's CDC, to the main queue)."""
        count = 0
        for event in events:
            self.publish_raw(event.to_json(), routing=None if to_main_queue else event)
            count += 1
        return count

    def publish_raw(self, body: bytes, *, routing: ChangeEvent | None = None) -> None:
        """Publish a body as is; routed by `routing`'s document when given, else to the main queue."""
        document = None if routing is None else (routing.type.value, routing.entry_id)
        self.publish_for_document(body, document)

    def publish_for_document(self, body: bytes, document: tuple[str, str] | None) -> None:
        """Publish a body as is to the shard of its (type, entry_id), or to the main queue."""
        if document is not None and self._settings.shard_queues:
            exchange = router_exchange(self._settings)
            key = routing_key(*document)
        else:
            exchange, key = "", self._settings.rabbitmq_queue
        self._channel.basic_publish(
            exchange=exchange,
            routing_key=key,
            body=body,
            properties=pika.BasicProperties(
                content_type=JSON,
                delivery_mode=2,
                headers={PUBLISHED_AT_HEADER: time.time_ns() // 1_000},
            ),
            mandatory=True,
        )

    def publish_again(
        self, body: bytes, *, queue: str, stamp: str | None, published_at: float | None
    ) -> None:
        """Queue a message again, as it came (its stamp and publish time kept), at the back of the
        queue it was read from: a long document's next turn."""
        headers: dict[str, str | int | bool] = {CONTINUED_HEADER: True}
        if published_at is not None:
            headers[PUBLISHED_AT_HEADER] = round(published_at * 1_000_000)
        self._channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(
                content_type=JSON, delivery_mode=2, message_id=stamp, headers=headers
            ),
            mandatory=True,
        )

    def publish_dead_letter(
        self,
        body: bytes,
        *,
        reason: str,
        error_type: str,
        source_queue: str,
        letter_id: str | None = None,
    ) -> None:
        """Send an unprocessable message to the dead-letter queue with why, in its headers."""
        headers: dict[str, str | int] = {
            "x-error": reason[:MAX_REASON_CHARS],
            "x-error-type": error_type,
            "x-source-queue": source_queue,
            "x-dead-lettered-at": int(time.time()),
        }
        if letter_id is not None:
            headers[DEAD_LETTER_ID_HEADER] = letter_id
        self._channel.basic_publish(
            exchange="",
            routing_key=self._settings.dead_letter_queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=2, headers=headers),
            mandatory=True,
        )

    def process_events(self) -> None:
        """Serve heartbeats while idle."""
        self._connection.process_data_events(time_limit=0)

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyPublisher:
    """An `EventPublisher` opened on first use (most runs of a sink need none) and dropped after
    a broker error, so that the caller's retry starts on a fresh connection."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._publisher: EventPublisher | None = None

    def call(self, action: Callable[[EventPublisher], None]) -> None:
        try:
            if self._publisher is None:
                self._publisher = EventPublisher(self._settings, connect_attempts=1)
            action(self._publisher)
        except AMQPError:
            self.close()
            raise

    def close(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(AMQPError):
                self._publisher.close()
            self._publisher = None
