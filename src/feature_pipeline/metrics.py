"""Process-wide metrics on prometheus-client: counters (by data type where one is known),
histograms, gauges and the process's own, plus a recent-freshness window for the status page.

Names keep the pipeline's existing ones: `feature_pipeline_<counter>_total`, now with a `type`
label on the counters of changes and chunks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

# The `_created` series double every counter's output and nobody here reads them.
prometheus_client.disable_created_metrics()

PREFIX = "feature_pipeline_"
#: What a scraper is told the body is: the text exposition format, with its version.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Counters: name -> help. Those in COUNTER_LABELS carry that label.
COUNTERS = {
    "events_received": "Messages read from the sources.",
    "events_applied": "Document changes written to the feature store.",
    "events_superseded": "Changes skipped because a newer change of the document was in the batch.",
    "events_stale": "Changes skipped because the store already holds a newer or equal version.",
    "events_continued": "Long documents whose turn ended: their events were queued again to resume.",
    "dead_letters": "Messages sent to the dead-letter queue.",
    "dead_letters_repeated": "Redelivered poison messages not dead-lettered again (sent before).",
    "chunks_embedded": "Chunks run through an embedding model.",
    "chunks_reused": "Chunks whose stored vector was kept (same text, same model).",
    "apply_seconds": "Seconds spent applying changes to the feature store, embedding included.",
    "embedding_seconds": "Seconds spent in the embedding model.",
    "processing_seconds": "Seconds spent parsing, cleaning and chunking messages.",
    "store_read_seconds": "Seconds spent reading the feature store (versions, stored chunks).",
    "store_write_seconds": "Seconds spent writing to the feature store (upserts, deletes).",
}
#: The label of each labelled counter: per data type, or per queue read.
COUNTER_LABELS = {
    "events_received": "queue",
    **{
        name: "type"
        for name in (
            "events_applied",
            "events_superseded",
            "events_stale",
            "events_continued",
            "chunks_embedded",
            "chunks_reused",
        )
    },
}
#: Histograms: name -> (help, buckets).
HISTOGRAMS = {
    "apply_batch_seconds": (
        "Seconds to apply one batch of changes to the feature store, embedding included.",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    ),
    "batch_changes": (
        "Document changes per applied batch.",
        (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
    ),
    "freshness_seconds": (
        "Seconds from an event's publish to its features being written.",
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
    ),
}
#: How far back the status page's freshness percentiles look, and how many samples they keep.
FRESHNESS_WINDOW_S = 300.0
FRESHNESS_SAMPLES = 10_000


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = {
            name: Counter(
                PREFIX + name,
                help_text,
                [COUNTER_LABELS[name]] if name in COUNTER_LABELS else [],
                registry=self.registry,
            )
            for name, help_text in COUNTERS.items()
        }
        self._histograms = {
            name: Histogram(PREFIX + name, help_text, buckets=buckets, registry=self.registry)
            for name, (help_text, buckets) in HISTOGRAMS.items()
        }
        self.queue_depth = Gauge(
            PREFIX + "queue_depth",
            "Messages ready in a queue (read from the broker when scraped or shown).",
            ["queue"],
            registry=self.registry,
        )
        self.messages_unacked = Gauge(
            PREFIX + "messages_unacked",
            "Messages the broker delivered to this process and that are not yet acknowledged "
            "(buffered, in flight, or written and awaiting the epoch's ack).",
            ["queue"],
            registry=self.registry,
        )
        Gauge(
            PREFIX + "messages_in_flight",
            "Messages read from the sources and not yet applied, skipped or dead-lettered.",
            registry=self.registry,
        ).set_function(self.in_flight)
        Gauge(
            PREFIX + "last_applied_age_seconds",
            "Seconds since the last change was applied (-1 before the first).",
            registry=self.registry,
        ).set_function(self.last_applied_age)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._last_applied: float | None = None
        self._freshness: deque[tuple[float, float]] = deque(maxlen=FRESHNESS_SAMPLES)

    # -- recording ----------------------------------------------------------------------------
    def add(self, name: str, value: float = 1, *, label: str | None = None) -> None:
        """Add to a counter; a labelled one (COUNTER_LABELS) needs its label's value: the data
        type (`DataType` value) or the queue."""
        if name not in self._counters:
            raise KeyError(f"unknown metric {name!r}")
        if value == 0:
            return
        counter = self._counters[name]
        if name in COUNTER_LABELS:
            if label is None:
                raise ValueError(f"metric {name!r} is counted per {COUNTER_LABELS[name]}")
            counter.labels(label).inc(value)
        else:
            counter.inc(value)
        if name == "events_applied":
            with self._lock:
                self._last_applied = time.time()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to a `*_seconds` counter, even if it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def observe(self, name: str, value: float) -> None:
        """One sample of a histogram; freshness samples also feed the status page's window."""
        self._histograms[name].observe(value)
        if name == "freshness_seconds":
            with self._lock:
                self._freshness.append((time.monotonic(), value))

    # -- reading ------------------------------------------------------------------------------
    def get(self, name: str) -> float:
        """A counter's total over every label value."""
        return sum(
            sample.value
            for metric in self._counters[name].collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    def by_label(self, name: str) -> dict[str, float]:
        """A labelled counter's total per label value (data type or queue)."""
        label = COUNTER_LABELS[name]
        return {
            sample.labels[label]: sample.value
            for metric in self._counters[name].collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    def snapshot(self) -> dict[str, float]:
        return {name: self.get(name) for name in COUNTERS}

    def in_flight(self) -> float:
        handled = sum(
            self.get(n)
            for n in (
                "events_applied",
                "events_superseded",
                "events_stale",
                "events_continued",
                "dead_letters",
                "dead_letters_repeated",
            )
        )
        return max(0.0, self.get("events_received") - handled)

    def last_applied_age(self) -> float:
        with self._lock:
            last = self._last_applied
        return -1.0 if last is None else time.time() - last

    def freshness(self, window_s: float = FRESHNESS_WINDOW_S) -> dict[str, float | int | None]:
        """p50/p99 of the freshness samples of the last `window_s` seconds."""
        since = time.monotonic() - window_s
        with self._lock:
            values = sorted(v for t, v in self._freshness if t >= since)
        if not values:
            return {"count": 0, "p50_s": None, "p99_s": None}
        return {
            "count": len(values),
            "p50_s": values[(len(values) - 1) // 2],
            "p99_s": values[min(len(values) - 1, round(0.99 * (len(values) - 1)))],
        }

    def prometheus(self) -> str:
        return generate_latest(self.registry).decode()


def totals_from_text(text: str) -> dict[str, float]:
    """`{name: total}` from Prometheus text: every `feature_pipeline_*_total` counter and every
    `feature_pipeline_*` gauge, summed over its labels (for scripts and tests that read a
    running pipeline's /metrics)."""
    totals: dict[str, float] = {}
    gauges: set[str] = set()
    for line in text.splitlines():
        declared = line.split()
        if declared[:2] == ["#", "TYPE"] and declared[2].startswith(PREFIX):
            if declared[3] == "counter":  # 0 until a labelled counter's first sample
                totals.setdefault(declared[2].removeprefix(PREFIX).removesuffix("_total"), 0.0)
            elif declared[3] == "gauge":
                gauges.add(declared[2])
            continue
        if not line.startswith(PREFIX):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        if name.endswith("_total") or name in gauges:
            key = name.removeprefix(PREFIX).removesuffix("_total")
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


metrics = Metrics()
