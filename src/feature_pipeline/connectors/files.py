"""Files of warehouse documents or events (JSON Lines) as a Bytewax source; dead letters to a file.

A line is either a change event (it has `entry_id`: the course's shape or our envelope) or a
warehouse document as the crawlers store it (it has `_id`), which becomes an upsert event of the
file's data type.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from feature_pipeline.domain.changes import DeadLetter, InboundMessage
from feature_pipeline.domain.events import InvalidEvent, decode_body, event_document
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


def line_to_body(line: bytes | str, data_type: DataType | None) -> bytes:
    """An event line passes as is; a document line becomes the course's upsert message.

    A line that is not UTF-8 JSON passes unchanged too: processing dead-letters it with the reason.
    """
    raw = line if isinstance(line, bytes) else line.encode()
    try:
        data = json.loads(decode_body(raw))
    except (InvalidEvent, json.JSONDecodeError):
        return raw
    if not isinstance(data, dict) or "entry_id" in data or "_id" not in data or data_type is None:
        return raw
    document = event_document(data)
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
        # Bytes, not text: a line that is not UTF-8 is one dead letter, not the end of the file.
        self._file = path.open("rb")
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


#: Where a backfill's dead-letter files go: one file per run that rejected anything.
DEAD_LETTER_FOLDER = Path("data/dead_letters")


def dead_letter_file_for_run(folder: Path, now: datetime | None = None) -> Path:
    """`folder/backfill-<UTC yyyymmddThhmmssZ>.jsonl`, with `-2`, `-3`... if that name is taken."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"backfill-{stamp}.jsonl"
    suffix = 2
    while path.exists():
        path = folder / f"backfill-{stamp}-{suffix}.jsonl"
        suffix += 1
    return path


def dead_letter_path(given: Path) -> Path:
    """Backfill's `--dead-letters`: the default or an existing folder gets a new file for this
    run; any other path is that file (appended to)."""
    if given == DEAD_LETTER_FOLDER or given.is_dir():
        return dead_letter_file_for_run(given)
    return given


def newest_dead_letter_file(folder: Path) -> Path:
    """The most recent backfill dead-letter file in `folder`, by the start time in its name."""
    runs = {}
    for path in folder.glob("backfill-*.jsonl"):
        match = _RUN_FILE.fullmatch(path.name)
        if match:
            runs[(match["stamp"], int(match["n"] or 1))] = path
    if not runs:
        raise FileNotFoundError(f"no backfill dead-letter file (backfill-*.jsonl) in {folder}")
    return runs[max(runs)]


_RUN_FILE = re.compile(r"backfill-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?\.jsonl")


class _DeadLetterFilePartition(StatefulSinkPartition[DeadLetter, None]):
    def __init__(self, sink: DeadLetterFileSink) -> None:
        self._sink = sink

    def write_batch(self, items: list[DeadLetter]) -> None:
        self._sink.write(items)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._sink.close()


class DeadLetterFileSink(FixedPartitionedSink[DeadLetter, None]):
    """Appends dead letters as JSON Lines (for backfills, which run without a broker).

    The file is created with the first dead letter only; `rejected` lists the source (file:line)
    of each, in the order written.
    """

    def __init__(self, path: Path, on_written: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.rejected: list[str] = []
        self._on_written = on_written
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def list_parts(self) -> list[str]:
        return ["dead-letters"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _DeadLetterFilePartition:
        return _DeadLetterFilePartition(self)

    def write(self, items: list[DeadLetter]) -> None:
        if not items:
            return
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            for item in items:
                record = {
                    "source": item.source,
                    "error_type": item.error_type,
                    "reason": item.reason,
                    "body": item.body.decode("utf-8", errors="replace"),
                    "dead_lettered_at": int(time.time()),
                }
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.rejected.append(item.source)
            self._file.flush()
        metrics.add("dead_letters", len(items))
        recent_dead_letters.add(items)
        if self._on_written is not None:
            self._on_written(len(items))

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
