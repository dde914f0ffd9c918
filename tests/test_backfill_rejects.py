"""Backfill with rejected lines: exit status 1, a dead-letter file per run, clear byte-level reasons."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from feature_pipeline.connectors.files import (
    DeadLetterFileSink,
    dead_letter_file_for_run,
    newest_dead_letter_file,
)
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, settings_env


def run_cli(settings: Settings, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", *args],
        env=settings_env(settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_rejected_lines_fail_the_backfill_and_land_in_a_file_of_their_own(
    settings: Settings, tmp_path: Path
) -> None:
    posts = SAMPLES.joinpath("posts.jsonl").read_bytes().splitlines()[:2]
    source = tmp_path / "posts.jsonl"
    bad = [
        b'{"_id": "x1", "content": {"text": "caf\xe9"}}',  # Latin-1, not UTF-8
        b'{"_id": "x2",\x00 "content": {}}',  # a NUL byte: json.loads would guess UTF-16
        b"{broken",
    ]
    source.write_bytes(b"\n".join([posts[0], *bad, posts[1], b""]))

    done = run_cli(settings, tmp_path, "backfill", str(source), "--no-progress")
    assert done.returncode == 1, done.stderr
    assert "2 applied" in done.stdout and "3 rejected" in done.stdout
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, done.stderr
    assert "3 lines rejected" in error[0]
    assert all(f"{source}:{n}" in error[0] for n in (2, 3, 4))
    written = list((tmp_path / "data" / "dead_letters").iterdir())
    assert len(written) == 1 and str(written[0].relative_to(tmp_path)) in error[0]
    assert re.fullmatch(r"backfill-\d{8}T\d{6}Z\.jsonl", written[0].name)
    reasons = [json.loads(line)["reason"] for line in written[0].read_text().splitlines()]
    assert reasons[0] == "body is not UTF-8 at byte 38 (0xe9)"
    assert reasons[1] == "body has a NUL byte at byte 13: not JSON text"
    assert reasons[2].startswith("body is not valid JSON")

    # `dlq list --file` given the folder reads its newest file.
    listed = run_cli(settings, tmp_path, "dlq", "list", "--file", "data/dead_letters", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["reason"] for line in listed.stdout.splitlines()] == reasons


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
