"""The loop both CDC sources share: read changes, publish with confirms, only then save the position.

A source is a small state machine (`ChangeSource`) that hands out `Batch`es: the events to
publish and the position that becomes safe to save once they are confirmed. The runner owns the
ordering that makes the service at-least-once:

    read batch -> publish every event (broker confirms each) -> source.save(position)

A crash between publish and save republishes the batch on restart (the pipeline's version guard
absorbs the duplicates); a crash can never save a position past an unconfirmed event. Transient
failures (broker or database connection lost) close both ends and reopen them with exponential
backoff, resuming from the last saved position. A `FatalCdcError` (position lost, stream
invalidated) ends the run: retrying could only skip changes.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Generic, Protocol, TypeVar

from pika.exceptions import AMQPError

from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent
from feature_pipeline.domain.types import DataType
from feature_pipeline.redaction import redact
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)

P = TypeVar("P")
P_co = TypeVar("P_co", covariant=True)

#: How many events one batch holds at most (bounded memory, bounded redelivery after a crash).
DEFAULT_BATCH_EVENTS = 500
#: A summary line of the counters is logged this often.
STATS_EVERY_S = 30.0
MAX_BACKOFF_S = 30.0


class FatalCdcError(RuntimeError):
    """The source cannot continue without losing changes; the message says what to do."""


class PositionLost(FatalCdcError):
    """The saved position can no longer be resumed (slot dropped, oplog rolled over, ...)."""


@dataclass(frozen=True)
class Batch(Generic[P]):
    """Events to publish, and the position that is safe to save once all of them are confirmed.

    `position` is None when there is nothing new to save (e.g. the middle of a snapshot, which
    restarts from scratch if interrupted).
    """

    events: list[ChangeEvent]
    position: P | None = None


class ChangeSource(Protocol[P]):
    """One warehouse's change feed. `open` decides from the saved state whether to snapshot."""

    #: Short name for logs: "postgres" or "mongo".
    name: str
    #: Exceptions after which closing, waiting and reopening may succeed.
    transient_errors: tuple[type[BaseException], ...]

    def open(self) -> None: ...

    def read(self, max_events: int) -> Batch[P]:
        """The next batch; an empty batch without position means "nothing new right now"."""
        ...

    def save(self, position: P) -> None: ...

    def close(self) -> None: ...


PublisherFactory = Callable[[Settings], EventPublisher]


@dataclass
class CdcStats:
    """Counters of one run, logged periodically and at exit."""

    published: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    positions_saved: int = 0
    reconnects: int = 0

    def record(self, events: list[ChangeEvent]) -> None:
        self.batches += 1
        for event in events:
            self.published[f"{event.type.value}.{event.op.value}"] += 1

    @property
    def total_published(self) -> int:
        return sum(self.published.values())

    def summary(self) -> str:
        per_kind = ", ".join(f"{k}={v}" for k, v in sorted(self.published.items())) or "none"
        return (
            f"published {self.total_published} events ({per_kind}) in {self.batches} batches; "
            f"{self.positions_saved} positions saved; {self.reconnects} reconnects"
        )


def run_cdc(
    source: ChangeSource[P],
    settings: Settings,
    stop: threading.Event,
    *,
    publisher_factory: PublisherFactory = EventPublisher,
    batch_events: int = DEFAULT_BATCH_EVENTS,
    idle_wait_s: float = 0.2,
    stats: CdcStats | None = None,
) -> CdcStats:
    """Run until `stop` is set; raise `FatalCdcError` when the source cannot go on safely."""
    stats = stats if stats is not None else CdcStats()
    transient = (*source.transient_errors, AMQPError, ConnectionError, TimeoutError)
    backoff_s = 1.0
    last_summary = time.monotonic()
    while not stop.is_set():
        publisher: EventPublisher | None = None
        try:
            source.open()
            publisher = publisher_factory(settings)
            log.info("%s CDC connected; publishing to %s", source.name, settings.rabbitmq_queue)
            while not stop.is_set():
                batch = source.read(batch_events)
                if batch.events:
                    publisher.publish(batch.events)  # returns once the broker confirmed each
                    stats.record(batch.events)
                    log.debug("%s: published %d events", source.name, len(batch.events))
                if batch.position is not None:
                    source.save(batch.position)
                    stats.positions_saved += 1
                backoff_s = 1.0
                if time.monotonic() - last_summary >= STATS_EVERY_S:
                    log.info("%s CDC: %s", source.name, stats.summary())
                    last_summary = time.monotonic()
                if not batch.events and batch.position is None:
                    # Nothing new: keep the broker connection's heartbeats served while waiting.
                    publisher.process_events()
                    stop.wait(idle_wait_s)
        except FatalCdcError:
            raise
        except transient as exc:
            stats.reconnects += 1
            log.warning(
                "%s CDC: %s: %s; reconnecting in %.0fs from the last saved position",
                source.name,
                type(exc).__name__,
                redact(str(exc)),  # driver errors may quote the DSN or URI
                backoff_s,
            )
            stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
        finally:
            _close_quietly(source.close, "source")
            if publisher is not None:
                _close_quietly(publisher.close, "publisher")
    log.info("%s CDC stopped: %s", source.name, stats.summary())
    return stats


def _close_quietly(close: Callable[[], None], what: str) -> None:
    # Closing a connection that already broke raises; the run's outcome is decided elsewhere.
    try:
        close()
    except Exception as exc:
        log.debug("closing the %s failed: %r", what, exc)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop`: the current batch finishes (publish, save), then we exit."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping after the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def parse_sources(spec: str) -> dict[str, DataType]:
    """Parse `posts,articles` or `posts=blog_posts,...` into {source name: data type}.

    The part before `=` is the data type, the part after it the table or collection; without
    `=` both are the same.
    """
    mapping: dict[str, DataType] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        type_name, _, source_name = item.partition("=")
        try:
            data_type = DataType(type_name.strip())
        except ValueError:
            known = ", ".join(t.value for t in DataType)
            raise ValueError(
                f"unknown data type {type_name!r} in {spec!r} (known: {known})"
            ) from None
        name = source_name.strip() or data_type.value
        if name in mapping:
            raise ValueError(f"{name!r} appears twice in {spec!r}")
        mapping[name] = data_type
    if not mapping:
        raise ValueError("no tables or collections given")
    return mapping
