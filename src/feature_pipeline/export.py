"""Export of the cleaned snapshots as a fine-tuning data set: streamed, page by page, to a file.

Each row holds what the course's training pipeline reads (`cleaned_content`, `platform`,
`author_id`, `link`), the document's `type`, `id` (its entry id) and `version` (the `ts` of the
change that made it), and, as JSON text, whatever else its cleaned snapshot carries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from feature_pipeline.connectors.qdrant.store import PointReader, sync_states_of
from feature_pipeline.domain.types import DataType

#: Payload fields that identify a document's author; repositories call theirs `owner_id`.
AUTHOR_FIELDS: tuple[str, ...] = ("author_id", "owner_id")
#: Columns of every row, in order; the rest of a snapshot goes to `metadata`.
COLUMNS: tuple[str, ...] = (
    "id",
    "type",
    "version",
    "cleaned_content",
    "platform",
    "author_id",
    "link",
    "metadata",
)
#: Documents read per page by default: memory is bounded by one page of snapshots.
PAGE_SIZE = 500


@dataclass(frozen=True)
class ExportFilter:
    """Which snapshots to export: all of a type, or those newer than `since` / by `author`."""

    data_type: DataType
    since: int | None = None
    author: str | None = None


def export_page(
    store: PointReader, wanted: ExportFilter, offset: str | None = None, limit: int = PAGE_SIZE
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of one page of the wanted snapshots from `offset`, and the next page's offset (None
    after the last). With `since`, a document whose version is unknown (it came only in the
    course's unversioned shape) is left out."""
    collection = wanted.data_type.cleaned_collection
    where = None
    if wanted.author is not None:
        where = {author_field(store, collection): wanted.author}
    page, next_offset = store.scroll_page(collection, offset=offset, limit=limit, where=where)
    states = sync_states_of(store, [point.id for point in page])
    rows = []
    for point in page:
        state = states.get(point.id)
        version = state.version if state is not None else None
        if wanted.since is not None and (version is None or version < wanted.since):
            continue
        rows.append(_row(wanted.data_type, dict(point.payload), version))
    return rows, next_offset


def author_field(store: PointReader, collection: str) -> str:
    """The payload field that names a document's author in this collection (from one point;
    the first of AUTHOR_FIELDS when the collection is empty)."""
    sample, _ = store.scroll_page(collection, offset=None, limit=1)
    payload = sample[0].payload if sample else {}
    return next((f for f in AUTHOR_FIELDS if f in payload), AUTHOR_FIELDS[0])


def all_pages(
    read_page: Callable[[str | None], tuple[list[dict[str, Any]], str | None]],
) -> Iterator[list[dict[str, Any]]]:
    """Every page `read_page(offset)` gives, from the start until it names no next page."""
    offset: str | None = None
    while True:
        rows, offset = read_page(offset)
        yield rows
        if offset is None:
            return


def _row(data_type: DataType, payload: dict[str, Any], version: int | None) -> dict[str, Any]:
    entry_id = str(payload.pop("entry_id"))
    payload.pop("type", None)
    author = next((payload.pop(f) for f in AUTHOR_FIELDS if f in payload), None)
    return {
        "id": entry_id,
        "type": data_type.value,
        "version": version,
        "cleaned_content": payload.pop("cleaned_content", ""),
        "platform": payload.pop("platform", None),
        "author_id": author,
        "link": payload.pop("link", None),
        "metadata": json.dumps(payload, ensure_ascii=False, sort_keys=True),
    }


class RowWriter(Protocol):
    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class _JsonLinesWriter:
    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class _ParquetWriter:
    """One row group per page, so memory stays at one page whatever the data set's size."""

    def __init__(self, path: Path) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                "--format parquet needs pyarrow: pip install 'feature-pipeline[parquet]'"
            ) from None
        self._pa = pa
        self._schema = pa.schema(
            [
                ("id", pa.string()),
                ("type", pa.string()),
                ("version", pa.int64()),
                ("cleaned_content", pa.string()),
                ("platform", pa.string()),
                ("author_id", pa.string()),
                ("link", pa.string()),
                ("metadata", pa.string()),
            ]
        )
        self._writer = pq.ParquetWriter(str(path), self._schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._writer.write_table(self._pa.Table.from_pylist(rows, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


#: Output formats by name; a new one registers its writer here.
WRITERS: dict[str, Callable[[Path], RowWriter]] = {
    "jsonl": _JsonLinesWriter,
    "parquet": _ParquetWriter,
}


def export(pages: Iterator[list[dict[str, Any]]], path: Path, output_format: str) -> int:
    """Write every page to `path` (through a temporary file, renamed when complete); the count."""
    if output_format not in WRITERS:
        raise ValueError(f"--format must be one of {sorted(WRITERS)}, got {output_format!r}")
    partial = path.with_name(path.name + ".partial")
    writer = WRITERS[output_format](partial)
    count = 0
    try:
        for rows in pages:
            writer.write(rows)
            count += len(rows)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return count
