"""Backfill's dead-letter files: one per run, created only on a reject (the CLI run that rejects
lines is `tests/test_cli.py::test_backfill_then_search`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feature_pipeline.connectors.files import (
    DEAD_LETTER_FOLDER,
    DeadLetterFileSink,
    dead_letter_file_for_run,
    dead_letter_path,
    newest_dead_letter_file,
)
from feature_pipeline.domain.changes import DeadLetter


def test_a_run_without_rejects_writes_no_dead_letter_file(tmp_path: Path) -> None:
    sink = DeadLetterFileSink(tmp_path / "dead" / "run.jsonl")
    part = sink.build_part("dead_letters", "dead-letters", None)
    part.write_batch([])
    part.close()
    assert not (tmp_path / "dead").exists() and sink.rejected == []


def test_each_run_gets_a_new_file_named_by_its_start(tmp_path: Path) -> None:
    now = datetime(2026, 11, 28, 9, 5, 7, tzinfo=UTC)
    first = dead_letter_file_for_run(tmp_path, now)
    assert first.name == "backfill-20261128T090507Z.jsonl"
    sink = DeadLetterFileSink(first)
    sink.write([DeadLetter(source="a.jsonl:1", body=b"{", reason="r", error_type="e")])
    sink.close()
    second = dead_letter_file_for_run(tmp_path, now)
    assert second.name == "backfill-20261128T090507Z-2.jsonl"
    second.write_text("")
    assert newest_dead_letter_file(tmp_path) == second
    with pytest.raises(FileNotFoundError, match="backfill-"):
        newest_dead_letter_file(tmp_path / "dead")


def test_the_default_or_a_folder_gets_a_file_per_run_any_other_path_is_that_file(
    tmp_path: Path,
) -> None:
    assert re.fullmatch(
        r"data/dead_letters/backfill-\d{8}T\d{6}Z\.jsonl",
        str(dead_letter_path(DEAD_LETTER_FOLDER)),
    )
    assert dead_letter_path(tmp_path).parent == tmp_path
    assert dead_letter_path(tmp_path / "mine.jsonl") == tmp_path / "mine.jsonl"
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"earlier": "run"}\n')
    sink = DeadLetterFileSink(dead_letter_path(mine))
    sink.write([DeadLetter(source="a.jsonl:1", body=b"\xff", reason="r", error_type="e")])
    sink.close()
    assert [line[:11] for line in mine.read_text().splitlines()] == ['{"earlier":', '{"source": ']
