"""The CLI as a user runs it: backfill with a bad line, counts, search, and start-up errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from feature_pipeline.settings import Settings

from .conftest import SAMPLES, settings_env

pytestmark = pytest.mark.slow


def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", *args],
        env=env or settings_env(settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_backfill_then_search(settings: Settings, tmp_path: Path) -> None:
    posts = SAMPLES.joinpath("posts.jsonl").read_bytes().splitlines()[:5]
    source = tmp_path / "posts.jsonl"
    bad = [
        b'{"_id": "x1", "content": {"text": "caf\xe9"}}',  # Latin-1, not UTF-8
        b'{"_id": "x2",\x00 "content": {}}',  # a NUL byte: json.loads would guess UTF-16
        b"{broken",
    ]
    source.write_bytes(b"\n".join([*posts[:2], *bad, *posts[2:], b""]))
    # Rejected lines go to a file of this run's own under ./data/dead_letters, and fail the run.
    done = cli(settings, "backfill", str(source), "--no-progress", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "5 applied" in done.stdout and "3 rejected" in done.stdout
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, done.stderr
    written = list((tmp_path / "data" / "dead_letters").iterdir())
    assert len(written) == 1 and re.fullmatch(r"backfill-\d{8}T\d{6}Z\.jsonl", written[0].name)
    where = f"{source}:3, {source}:4, {source}:5"
    assert (
        f"3 lines rejected ({where}); their reasons are in {written[0].relative_to(tmp_path)}"
        in error[0]
    )
    reasons = [json.loads(line)["reason"] for line in written[0].read_text().splitlines()]
    assert reasons[0] == "body is not UTF-8 at byte 38 (0xe9)"
    assert reasons[1] == "body has a NUL byte at byte 13: not JSON text"
    assert reasons[2].startswith("body is not valid JSON")
    listed = cli(settings, "dlq", "list", "--file", "data/dead_letters", "--json", cwd=tmp_path)
    assert [json.loads(line)["reason"] for line in listed.stdout.splitlines()] == reasons

    counts = cli(settings, "counts")
    assert "cleaned_posts" in counts.stdout and " 5\n" in counts.stdout

    search = cli(settings, "search", "MLOps webinar", "--type", "posts", "-k", "2", "--json")
    hits = json.loads(search.stdout)
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    assert {json.loads(p)["_id"] for p in posts} >= {h["entry_id"] for h in hits}

    listed = cli(settings, "points", "cleaned_posts", "--type", "posts", "--limit", "3")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(rows) == 3 and all(set(row) == {"id", "payload"} for row in rows)
    first = json.loads(posts[0])["_id"]
    listed = cli(settings, "points", "vector_posts", "--entry-id", first, "--with-vectors")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert rows and all(r["payload"]["entry_id"] == first and len(r["vector"]) == 384 for r in rows)
    unknown = cli(settings, "points", "nope")
    assert unknown.returncode == 1 and "'nope'" in unknown.stderr


def test_a_bad_setting_fails_at_start_naming_it(settings: Settings) -> None:
    env = settings_env(settings) | {"RABBITMQ_PREFETCH": "0"}
    done = cli(settings, "counts", env=env)
    assert done.returncode == 2
    assert "RABBITMQ_PREFETCH" in done.stderr


def test_a_hub_model_name_fails_fast_without_network(settings: Settings) -> None:
    env = settings_env(settings) | {"MODEL_POSTS": "BAAI/bge-small-en-v1.5"}
    done = cli(settings, "search", "x", "--type", "posts", env=env)
    assert done.returncode == 2
    assert "MODEL_POSTS" in done.stderr or "BAAI/bge-small-en-v1.5" in done.stderr


def test_chunks_longer_than_the_model_reads_are_refused_at_start(settings: Settings) -> None:
    env = settings_env(settings) | {"CHUNK_SIZE_ARTICLES": "300"}
    done = cli(settings, "backfill", str(SAMPLES / "articles.jsonl"), env=env)
    assert done.returncode == 2
    assert "CHUNK_SIZE_ARTICLES=300" in done.stderr and "at most 254" in done.stderr
