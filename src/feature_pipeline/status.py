"""What the status page, `/status` and `/ready` show: readiness, queue depths, recent dead
letters, collection sizes, the model, rates' raw counters and freshness.

Nothing here can stall the pipeline: it reads counters, asks the broker on a connection of its
own (never the source's), and caches every outside read for a moment, so a page refreshing every
second costs the broker and the store one small read each per interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pika.exceptions import AMQPError, ChannelClosedByBroker

from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.connectors.rabbitmq.topology import consumed_queues
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import COUNTERS, FRESHNESS_WINDOW_S, Metrics
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)

#: Seconds an outside read (queue depths, collection sizes) is reused before it is read again.
CACHE_S = 2.0
NOT_FOUND = 404
#: Dead letters this process produced that the page lists, newest first.
RECENT_DEAD_LETTERS = 20


class Readiness:
    """Whether each part the pipeline needs is up; `/ready` answers 503 with the reasons."""

    def __init__(self) -> None:
        self._waiting: dict[str, str] = {}
        self._lock = threading.Lock()

    def waiting(self, part: str, reason: str) -> None:
        with self._lock:
            self._waiting[part] = reason

    def ready(self, part: str) -> None:
        with self._lock:
            self._waiting.pop(part, None)

    def reasons(self) -> dict[str, str]:
        """The parts not ready, with why; empty when everything is."""
        with self._lock:
            return dict(self._waiting)


readiness = Readiness()


class RecentDeadLetters:
    """The last dead letters this process sent, with their reasons (for the page)."""

    def __init__(self) -> None:
        self._letters: deque[dict[str, Any]] = deque(maxlen=RECENT_DEAD_LETTERS)
        self._lock = threading.Lock()

    def add(self, letters: list[DeadLetter]) -> None:
        now = time.time()
        with self._lock:
            for letter in letters:
                self._letters.appendleft(
                    {
                        "at": now,
                        "error_type": letter.error_type,
                        "reason": letter.reason,
                        "source": letter.source,
                        "size": len(letter.body),
                    }
                )

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._letters)


recent_dead_letters = RecentDeadLetters()


class _Cached:
    """A value read at most every CACHE_S seconds; a failed read is shown as an error."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read
        self._value: Any = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if time.monotonic() - self._read_at >= CACHE_S:
                try:
                    self._value = self._read()
                except Exception as exc:  # shown on the page; the pipeline goes on regardless
                    self._value = {"error": f"{type(exc).__name__}: {exc}"}
                self._read_at = time.monotonic()
            return self._value


def describe_models(settings: Settings) -> dict[str, Any]:
    """Each data type's model as it runs (once loaded: asking earlier would load it here)."""
    if "model" in readiness.reasons():
        return {}
    from feature_pipeline.processing.embedding import embedder_for

    described = {}
    for data_type in DataType:
        embedder = embedder_for(settings, data_type)
        described[data_type.value] = {
            "model": embedder.name,
            "backend": embedder.backend,
            "device": embedder.device,
            "batch_size": settings.embedding_batch_size_for(embedder.device, embedder.backend),
        }
    return described


class StatusReader:
    """Builds `/status` for the running pipeline."""

    def __init__(self, settings: Settings, store: FeatureStore, counters: Metrics) -> None:
        self._settings = settings
        self._metrics = counters
        self._started = time.time()
        self._connection: Any = None
        self._queues = _Cached(self._read_queue_depths)
        self._counts = _Cached(store.counts)

    def queue_depths(self) -> Any:
        """[{"name", "role", "depth"}] read from the broker (also sets the depth gauges)."""
        return self._queues.get()

    def _read_queue_depths(self) -> list[dict[str, Any]]:
        from feature_pipeline.connectors.rabbitmq.publisher import connect

        settings = self._settings
        roles = {settings.rabbitmq_queue: "main", settings.dead_letter_queue: "dead letters"}
        try:
            if self._connection is None or not self._connection.is_open:
                self._connection = connect(settings)
            channel = self._connection.channel()
            depths = []
            for queue in [*consumed_queues(settings), settings.dead_letter_queue]:
                try:
                    declared = channel.queue_declare(queue, passive=True)
                except ChannelClosedByBroker as exc:  # 404: not declared (yet), or deleted
                    if exc.reply_code != NOT_FOUND:
                        raise
                    channel = self._connection.channel()
                    depth = None
                else:
                    depth = int(declared.method.message_count)
                    self._metrics.queue_depth.labels(queue).set(depth)
                depths.append({"name": queue, "role": roles.get(queue, "shard"), "depth": depth})
            channel.close()
            return depths
        except AMQPError:
            self._connection = None
            raise

    def status(self) -> dict[str, Any]:
        counters = self._metrics.snapshot()
        return {
            "now": time.time(),
            "uptime_s": time.time() - self._started,
            "ready": readiness.reasons(),
            "queue": self._settings.rabbitmq_queue,
            "models": describe_models(self._settings),
            "counters": counters,
            "received_by_queue": self._metrics.by_label("events_received"),
            "applied_by_type": self._metrics.by_label("events_applied"),
            "embedded_by_type": self._metrics.by_label("chunks_embedded"),
            "reused_by_type": self._metrics.by_label("chunks_reused"),
            "in_flight": self._metrics.in_flight(),
            "last_applied_age_s": self._metrics.last_applied_age(),
            "freshness": {**self._metrics.freshness(), "window_s": FRESHNESS_WINDOW_S},
            "queues": self.queue_depths(),
            "collections": self._counts.get(),
            "dead_letters": recent_dead_letters.list(),
            "data_types": [t.value for t in DataType],
            "counter_help": COUNTERS,
        }


def start_progress_log(status: StatusReader, counters: Metrics, interval_s: float) -> None:
    """One log line every `interval_s` while work flows: rates, backlog, dead letters, freshness.
    Quiet while nothing moves, so an idle pipeline does not fill its log."""

    def run() -> None:
        before = counters.snapshot()
        while True:
            time.sleep(interval_s)
            now = counters.snapshot()
            if now == before:
                continue
            log.info(describe_progress(before, now, interval_s, status.queue_depths(), counters))
            before = now

    threading.Thread(target=run, name="progress-log", daemon=True).start()


def describe_progress(
    before: dict[str, float],
    now: dict[str, float],
    seconds: float,
    queues: Any,
    counters: Metrics,
) -> str:
    def per_s(name: str) -> float:
        return (now[name] - before[name]) / seconds

    if isinstance(queues, list):
        backlog = str(sum(q["depth"] or 0 for q in queues if q["role"] != "dead letters"))
    else:
        backlog = "unknown (broker unreachable)"
    freshness = counters.freshness()
    fresh = (
        f"freshness p50 {freshness['p50_s']:.2f} s, p99 {freshness['p99_s']:.2f} s"
        if freshness["count"]
        else "no freshness sample"
    )
    new_dead = now["dead_letters"] - before["dead_letters"]
    return (
        f"progress: {per_s('events_applied'):.1f} events/s applied, "
        f"{per_s('chunks_embedded'):.1f} chunks/s embedded, {per_s('chunks_reused'):.1f} reused; "
        f"backlog {backlog} messages; {now['dead_letters']:.0f} dead letters (+{new_dead:.0f}); "
        f"{fresh}"
    )
