"""Files of warehouse documents or events (JSON Lines) as a Bytewax source; dead letters to a file.

A line is either a change event (it has `entry_id`: the course's shape or our envelope) or a
warehouse document as the crawlers store it (it has `_id`), which becomes an upsert event of the
file's data type.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from feature_pipeline.domain.changes import DeadLetter, InboundMessage
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.status import recent_dead_letters


def infer_type(path: Path) -> DataType | None:
    """`posts.jsonl` holds posts, and so on; None when the name says nothing."""
    stem = path.name.split(".", 1)[0]
    try:
        return DataType(stem)
    except ValueError:
        return None


def line_to_body(line: str, data_type: DataType | None) -> bytes:
    """An event line passes as is; a document line becomes the course's upsert message."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return line.encode()  # the processing step dead-letters it with the parse error
    if not isinstance(data, dict) or "entry_id" in data or "_id" not in data or data_type is None:
        return line.encode()
    document = {k: v for k, v in data.items() if k != "_id"}
    return json.dumps({**document, "type": data_type.value, "entry_id": str(data["_id"])}).encode()


def count_lines(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with path.open("rb") as f:
            total += sum(1 for line in f if line.strip())
    return total


class _FilePartition(StatefulSourcePartition[InboundMessage, int]):
    def __init__(self, path: Path, data_type: DataType | None, batch_size: int, start: int) -> None:
        self._path = path
        self._type = data_type
        self._batch_size = batch_size
        self._file = path.open(encoding="utf-8")
        self._line_no = 0
        for _ in range(start):
            self._file.readline()
            self._line_no += 1

    def next_batch(self) -> list[InboundMessage]:
        batch = []
        while len(batch) < self._batch_size:
            line = self._file.readline()
            if not line:
                if batch:
                    return batch
                self._file.close()
                raise StopIteration
            self._line_no += 1
            if line.strip():
                body = line_to_body(line, self._type)
                batch.append(InboundMessage(source=f"{self._path}:{self._line_no}", body=body))
        return batch

    def snapshot(self) -> int:
        return self._line_no

    def close(self) -> None:
        self._file.close()


class JsonLinesSource(FixedPartitionedSource[InboundMessage, int]):
    """Reads each file once, a partition per file, lines in order; finite (the dataflow ends).

    `data_type` applies to document lines of every file; without it the file name must say
    (`posts.jsonl`, `articles.jsonl`, `repositories.jsonl`).
    """

    def __init__(
        self, paths: list[Path], data_type: DataType | None = None, batch_size: int = 64
    ) -> None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no such file: {', '.join(missing)}")
        self._types = {str(p): data_type or infer_type(p) for p in paths}
        self._batch_size = batch_size

    def list_parts(self) -> list[str]:
        return list(self._types)

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _FilePartition:
        return _FilePartition(
            Path(for_part), self._types[for_part], self._batch_size, resume_state or 0
        )


class _DeadLetterFilePartition(StatefulSinkPartition[DeadLetter, None]):
    def __init__(self, path: Path, on_written: Callable[[int], None] | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        self._on_written = on_written
        self._lock = threading.Lock()

    def write_batch(self, items: list[DeadLetter]) -> None:
        with self._lock:
            for item in items:
                record = {
                    "source": item.source,
                    "error_type": item.error_type,
                    "reason": item.reason,
                    "body": item.body.decode("utf-8", errors="replace"),
                    "dead_lettered_at": int(time.time()),
                }
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        metrics.add("dead_letters", len(items))
        recent_dead_letters.add(items)
        if self._on_written is not None:
            self._on_written(len(items))

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._file.close()


class DeadLetterFileSink(FixedPartitionedSink[DeadLetter, None]):
    """Appends dead letters as JSON Lines (for backfills, which run without a broker)."""

    def __init__(self, path: Path, on_written: Callable[[int], None] | None = None) -> None:
        self._path = path
        self._on_written = on_written

    def list_parts(self) -> list[str]:
        return ["dead-letters"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _DeadLetterFilePartition:
        return _DeadLetterFilePartition(self._path, self._on_written)
