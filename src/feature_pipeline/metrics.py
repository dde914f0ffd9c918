"""Process-wide counters (events applied, chunks embedded, seconds in the model...), Prometheus text."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

_DESCRIPTIONS = {
    "events_received": "Messages read from the sources.",
    "events_applied": "Document changes written to the feature store.",
    "events_superseded": "Changes skipped because a newer change of the document was in the batch.",
    "events_stale": "Changes skipped because the store already holds a newer or equal version.",
    "dead_letters": "Messages sent to the dead-letter queue.",
    "chunks_embedded": "Chunks run through an embedding model.",
    "chunks_reused": "Chunks whose stored vector was kept (same text, same model).",
    "apply_seconds": "Seconds spent applying changes to the feature store, embedding included.",
    "embedding_seconds": "Seconds spent in the embedding model.",
    "processing_seconds": "Seconds spent parsing, cleaning and chunking messages.",
    "store_read_seconds": "Seconds spent reading the feature store (versions, stored chunks).",
    "store_write_seconds": "Seconds spent writing to the feature store (upserts, deletes).",
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()  # ints, and floats for *_seconds
        self._lock = threading.Lock()

    def add(self, name: str, value: float = 1) -> None:
        if name not in _DESCRIPTIONS:
            raise KeyError(f"unknown metric {name!r}")
        with self._lock:
            self._counts[name] += value

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to a `*_seconds` counter, even if it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def get(self, name: str) -> float:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {name: self._counts[name] for name in _DESCRIPTIONS}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def prometheus(self) -> str:
        lines = []
        for name, value in self.snapshot().items():
            full = f"feature_pipeline_{name}_total"
            lines += [
                f"# HELP {full} {_DESCRIPTIONS[name]}",
                f"# TYPE {full} counter",
                f"{full} {value}",
            ]
        return "\n".join(lines) + "\n"


metrics = Metrics()
