"""The `dlq` command: list dead letters and replay the chosen ones (queue or backfill file)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from feature_pipeline.connectors.rabbitmq.redrive import (
    DeadLetterQueue,
    DeadLetterRecord,
    ReplayReport,
    Selection,
    read_dead_letter_file,
    replay_dead_letter_file,
)
from feature_pipeline.settings import get_settings

#: Characters of a reason shown in the table; `--json` prints it whole.
REASON_WIDTH = 100

FILE_HELP = (
    "a backfill's dead-letter file instead of the queue; a folder (e.g. data/dead_letters) "
    "means its newest backfill-*.jsonl"
)


def _dead_letter_file(path: Path) -> Path:
    """`--file`: the file itself, or a folder's newest backfill dead-letter file."""
    from feature_pipeline.connectors.files import newest_dead_letter_file

    return newest_dead_letter_file(path) if path.is_dir() else path


def add_dlq_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `dlq list` and `dlq replay` to an argparse subparsers object."""
    dlq = subparsers.add_parser(
        "dlq",
        help="list or replay dead letters",
        description="Dead letters of RABBITMQ_DLQ (or of a backfill's dead-letter file).",
    )
    actions = dlq.add_subparsers(dest="dlq_action", metavar="{list,replay}", required=True)

    listing = actions.add_parser("list", help="show dead letters, oldest first, without consuming")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--file", type=Path, help=FILE_HELP)
    listing.set_defaults(func=_cmd_list)

    replay = actions.add_parser(
        "replay",
        help="republish chosen dead letters through the normal routing",
        description="Republish dead letters as they are, routed by document; each leaves the "
        "dead letters only once the broker confirmed its republish. Pick them by filters, or "
        "--all. A message that fails again is dead-lettered again with its new reason.",
    )
    replay.add_argument("--error-type", help="only dead letters of this error type")
    replay.add_argument("--entry-id", help="only dead letters of this document")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--file", type=Path, help=FILE_HELP)
    replay.set_defaults(func=_cmd_replay)
    return dlq


def _cmd_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if args.file is not None:
        path = _dead_letter_file(args.file)
        records = []
        for _, record in read_dead_letter_file(path):
            if len(records) == args.limit:
                break
            records.append(record)
        where, total = str(path), None
    else:
        with DeadLetterQueue(get_settings()) as queue:
            total = queue.depth()
            records = queue.peek(args.limit)
            where = queue.name
    now = time.time()
    if args.json:
        for record in records:
            print(json.dumps(record.describe(now), ensure_ascii=False))
        return 0
    shown = f"{len(records)} dead letters" if total is None else f"{total} dead letters"
    if total is not None and total > len(records):
        shown += f" (the first {len(records)})"
    print(f"{shown} in {where}")
    if records:
        _print_table(records, now)
    return 0


def _print_table(records: list[DeadLetterRecord], now: float) -> None:
    rows = [("#", "age", "error type", "document", "bytes", "source", "reason")]
    for record in records:
        info = record.describe(now)
        document = f"{info['type']}:{info['entry_id']}" if info["type"] else "-"
        reason = " ".join(record.reason.split())
        if len(reason) > REASON_WIDTH:
            reason = reason[: REASON_WIDTH - 3] + "..."
        rows.append(
            (
                str(record.position),
                _age(info["age_s"]),
                record.error_type or "-",
                document,
                str(info["size"]),
                record.source or "-",
                reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cmd_replay(args: argparse.Namespace) -> int:
    from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher

    if not args.all and args.error_type is None and args.entry_id is None:
        raise ValueError("say which dead letters to replay: --error-type, --entry-id, or --all")
    if args.all and (args.error_type is not None or args.entry_id is not None):
        raise ValueError("--all replays every dead letter: leave out --error-type and --entry-id")
    selection = Selection(error_type=args.error_type, entry_id=args.entry_id)
    settings = get_settings()
    report: ReplayReport
    with EventPublisher(settings) as publisher:
        if args.file is not None:
            path = _dead_letter_file(args.file)
            report = replay_dead_letter_file(path, selection, publisher)
            where = str(path)
        else:
            with DeadLetterQueue(settings) as queue:
                report = queue.replay(selection, publisher)
                where = queue.name
    print(
        f"replayed {report.replayed} dead letters from {where} to {settings.rabbitmq_queue} "
        f"(routed by document); {report.kept} left there"
    )
    return 0
