"""Process-wide counters (events applied, chunks embedded, dead letters...), in Prometheus text."""

from __future__ import annotations

import threading
from collections import Counter

_DESCRIPTIONS = {
    "events_received": "Messages read from the sources.",
    "events_applied": "Document changes written to the feature store.",
    "events_superseded": "Changes skipped because a newer change of the document was in the batch.",
    "events_stale": "Changes skipped because the store already holds a newer or equal version.",
    "dead_letters": "Messages sent to the dead-letter queue.",
    "chunks_embedded": "Chunks run through an embedding model.",
    "chunks_reused": "Chunks whose stored vector was kept (same text, same model).",
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, value: int = 1) -> None:
        if name not in _DESCRIPTIONS:
            raise KeyError(f"unknown metric {name!r}")
        with self._lock:
            self._counts[name] += value

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
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
