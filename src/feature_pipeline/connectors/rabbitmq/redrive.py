"""Dead letters after the fact: list them without consuming them, and replay the chosen ones.

Both work on the dead-letter queue and on the backfill's dead-letter file. A replayed message is
republished as it was, through the normal routing (its document's shard queue), and leaves the
queue (or the file) only after the broker confirmed the republish: a crash mid-replay loses
nothing and at worst replays a message twice, which the store's idempotent writes absorb. A
message that fails again is dead-lettered again by the pipeline, with its new reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher, connect
from feature_pipeline.connectors.rabbitmq.topology import declare_topology
from feature_pipeline.settings import Settings


@dataclass(frozen=True)
class DeadLetterRecord:
    """One dead letter: the original body and why it was rejected."""

    position: int
    body: bytes
    reason: str
    error_type: str
    source: str
    #: Unix time it was dead-lettered, when the record says.
    dead_lettered_at: float | None

    @property
    def document(self) -> tuple[str, str] | None:
        """The (data type, entry id) the body names, when it is a JSON object naming both."""
        return document_of(self.body)

    def describe(self, now: float) -> dict[str, Any]:
        """What `dlq list --json` prints for it."""
        document = self.document
        return {
            "position": self.position,
            "error_type": self.error_type,
            "reason": self.reason,
            "source": self.source,
            "type": document[0] if document else None,
            "entry_id": document[1] if document else None,
            "age_s": None if self.dead_lettered_at is None else round(now - self.dead_lettered_at),
            "size": len(self.body),
        }


def document_of(body: bytes) -> tuple[str, str] | None:
    """(type, entry_id) of a message body in either accepted shape; None if it names neither."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    data_type, entry_id = data.get("type"), data.get("entry_id")
    if not isinstance(data_type, str) or entry_id is None or entry_id == "":
        return None
    return data_type, str(entry_id)


@dataclass(frozen=True)
class Selection:
    """Which dead letters to replay: every one, or those matching all the given filters."""

    error_type: str | None = None
    entry_id: str | None = None

    def matches(self, record: DeadLetterRecord) -> bool:
        if self.error_type is not None and record.error_type != self.error_type:
            return False
        if self.entry_id is not None:
            document = record.document
            return document is not None and document[1] == self.entry_id
        return True


@dataclass(frozen=True)
class ReplayReport:
    replayed: int
    kept: int


def _header_text(headers: dict[str, Any], name: str) -> str:
    value = headers.get(name, "")
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class DeadLetterQueue:
    """The dead-letter queue of the configured topology, read in order.

    Messages are taken with manual acks: a replayed one is acked after its republish is
    confirmed; every other one is put back (nack with requeue, which RabbitMQ returns to its
    original place) when the operation ends, and the broker puts them back by itself if this
    process dies first. Only the messages present when the operation starts are looked at.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.name = settings.dead_letter_queue
        self._connection: BlockingConnection = connect(settings)
        self._channel: BlockingChannel = self._connection.channel()
        declare_topology(self._channel, settings)

    def depth(self) -> int:
        declared = self._channel.queue_declare(self.name, durable=True, passive=True)
        return int(declared.method.message_count)

    def _take(self, limit: int) -> Iterator[tuple[int, DeadLetterRecord]]:
        for position in range(1, min(limit, self.depth()) + 1):
            method, properties, body = self._channel.basic_get(self.name, auto_ack=False)
            if method is None:
                return
            headers = getattr(properties, "headers", None) or {}
            at = headers.get("x-dead-lettered-at")
            yield (
                method.delivery_tag,
                DeadLetterRecord(
                    position=position,
                    body=body,
                    reason=_header_text(headers, "x-error"),
                    error_type=_header_text(headers, "x-error-type"),
                    source=_header_text(headers, "x-source-queue"),
                    dead_lettered_at=float(at) if isinstance(at, int | float) else None,
                ),
            )

    def _put_back(self) -> None:
        # Tag 0 with `multiple` covers every message this channel holds unacknowledged.
        self._channel.basic_nack(delivery_tag=0, multiple=True, requeue=True)

    def peek(self, limit: int) -> list[DeadLetterRecord]:
        """The first `limit` dead letters, oldest first; the queue is left as it was."""
        try:
            return [record for _, record in self._take(limit)]
        finally:
            self._put_back()

    def replay(self, selection: Selection, publisher: EventPublisher) -> ReplayReport:
        """Republish the selected dead letters through the routing; keep the rest, in order."""
        replayed = kept = 0
        try:
            for tag, record in self._take(self.depth()):
                if selection.matches(record):
                    publisher.publish_for_document(record.body, record.document)
                    self._channel.basic_ack(tag)
                    replayed += 1
                else:
                    kept += 1
        finally:
            self._put_back()
        return ReplayReport(replayed=replayed, kept=kept)

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def __enter__(self) -> DeadLetterQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the backfill's dead-letter file -----------------------------------------------------------
def read_dead_letter_file(path: Path) -> Iterator[tuple[str, DeadLetterRecord]]:
    """Each line of a dead-letter file with its record, in order (streamed)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such dead-letter file: {path}")
    with path.open(encoding="utf-8") as lines:
        position = 0
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            position += 1
            try:
                data = json.loads(line)
                record = DeadLetterRecord(
                    position=position,
                    body=str(data["body"]).encode(),
                    reason=str(data.get("reason", "")),
                    error_type=str(data.get("error_type", "")),
                    source=str(data.get("source", "")),
                    dead_lettered_at=data.get("dead_lettered_at"),
                )
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_no} is not a dead-letter record") from None
            yield line, record


def replay_dead_letter_file(
    path: Path, selection: Selection, publisher: EventPublisher
) -> ReplayReport:
    """Republish the selected lines of a dead-letter file, then drop them from the file.

    The file is rewritten (atomically) only after every selected line was confirmed, so a crash
    leaves it whole, and a rerun replays at most what was already replayed.
    """
    kept_path = path.with_name(path.name + ".replaying")
    replayed = kept = 0
    with kept_path.open("w", encoding="utf-8") as kept_lines:
        for line, record in read_dead_letter_file(path):
            if selection.matches(record):
                publisher.publish_for_document(record.body, record.document)
                replayed += 1
            else:
                kept_lines.write(line if line.endswith("\n") else line + "\n")
                kept += 1
        kept_lines.flush()
        os.fsync(kept_lines.fileno())
    os.replace(kept_path, path)
    return ReplayReport(replayed=replayed, kept=kept)
