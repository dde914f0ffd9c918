"""Start-up failures as a user meets them: the real CLI in a subprocess, one `error:` line naming
the variable, exit status 2 (1 for an empty store), no traceback, before any model loads, and
never a planted password or API key in any output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import SAMPLES, free_port

SECRET_PASSWORD = "hunter2-planted-7f3a"
SECRET_API_KEY = "s3cr3t-planted-91c2"
#: Logged by sentence-transformers when a model starts loading: must not appear before a
#: start-up check fails.
MODEL_LOADING = "Loading SentenceTransformer"


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def cli(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> Result:
    """Run `feature-pipeline ARGS` in `tmp_path` (no `.env` of the repository) with planted
    secrets in the broker URL and the API key; assert that no output shows them."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RABBITMQ_", "QDRANT_", "LOG_", "CHUNK_", "MODEL_", "QUERY_"))
    }
    base |= {
        "RABBITMQ_URL": f"amqp://guest:{SECRET_PASSWORD}@127.0.0.1:{free_port()}/",
        "QDRANT_API_KEY": SECRET_API_KEY,
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "QUERY_PORT": "0",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", *args],
        env=base | env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result = Result(done.returncode, done.stdout, done.stderr, time.monotonic() - started)
    assert SECRET_PASSWORD not in result.output, result.output
    assert SECRET_API_KEY not in result.output, result.output
    return result


def assert_one_line_error(result: Result, status: int, *names: str) -> None:
    assert result.status == status, result.output
    assert "Traceback" not in result.output, result.output
    assert MODEL_LOADING not in result.output, result.output
    lines = result.error_lines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]


# -- settings ---------------------------------------------------------------------------------
def test_a_bad_log_level_names_the_variable(tmp_path: Path) -> None:
    result = cli(tmp_path, "counts", LOG_LEVEL="verbose")
    assert_one_line_error(result, 2, "LOG_LEVEL", "verbose")


def test_settings_come_from_dotenv_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LOG_LEVEL=chatty\n")
    assert_one_line_error(cli(tmp_path, "counts"), 2, "LOG_LEVEL", "chatty")


def test_json_log_lines(tmp_path: Path) -> None:
    result = cli(tmp_path, "publish", str(SAMPLES / "posts.jsonl"), LOG_FORMAT="json")
    logged = [line for line in result.stderr.splitlines() if not line.startswith("error:")]
    assert logged, result.stderr
    records = [json.loads(line) for line in logged]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("RABBITMQ_URL" in r["message"] for r in records)


def test_a_cross_field_error_shows_no_other_setting(tmp_path: Path) -> None:
    result = cli(tmp_path, "counts", CHUNK_OVERLAP="300")
    assert_one_line_error(result, 2, "CHUNK_OVERLAP")
    assert "rabbitmq_url" not in result.output.lower()


def test_a_malformed_broker_url_is_shown_masked(tmp_path: Path) -> None:
    result = cli(tmp_path, "counts", RABBITMQ_URL=f"amqp:/guest:{SECRET_PASSWORD}@localhost")
    assert_one_line_error(result, 2, "RABBITMQ_URL", "amqp:/guest:***@localhost")


# -- what the settings point at ---------------------------------------------------------------
@pytest.mark.parametrize("command", ["backfill", "run"])
@pytest.mark.parametrize("where", ["under_a_file", "under_proc"])
def test_an_unusable_store_folder_fails_before_the_model_loads(
    tmp_path: Path, command: str, where: str
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    path = a_file / "qdrant" if where == "under_a_file" else Path("/proc/feature-pipeline/qdrant")
    args = [str(SAMPLES / "posts.jsonl")] if command == "backfill" else []
    result = cli(tmp_path, command, *args, QDRANT_PATH=str(path))
    assert_one_line_error(result, 2, f"QDRANT_PATH={path}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_store_folder_fails_before_the_model_loads(tmp_path: Path) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    result = cli(tmp_path, "backfill", str(SAMPLES / "posts.jsonl"), QDRANT_PATH=str(folder))
    assert_one_line_error(result, 2, "QDRANT_PATH")


def test_an_unreachable_qdrant_server_fails_counts_in_seconds(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(tmp_path, "counts", QDRANT_URL=url)
    assert_one_line_error(result, 2, f"QDRANT_URL={url}")
    assert result.seconds < 30  # 3 s of retries, plus a slow start on a loaded machine


def test_run_retries_an_unreachable_qdrant_server_then_names_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(tmp_path, "run", QDRANT_URL=url, QDRANT_STARTUP_WAIT_S="2")
    assert_one_line_error(result, 2, f"QDRANT_URL={url}")
    assert "retrying" in result.stderr  # the retry helper's own line, before giving up


def test_a_query_port_in_use_fails_before_the_model_loads(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli(tmp_path, "run", QUERY_PORT=str(port))
    assert_one_line_error(result, 2, f"QUERY_PORT={port}")


def test_chunks_longer_than_the_model_reads_fail_before_it_loads(tmp_path: Path) -> None:
    result = cli(
        tmp_path, "backfill", str(SAMPLES / "articles.jsonl"), CHUNK_SIZE_ARTICLES="100000"
    )
    assert_one_line_error(result, 2, "CHUNK_SIZE_ARTICLES=100000", "at most 254")


def test_a_model_that_is_not_a_local_folder_names_its_variable(tmp_path: Path) -> None:
    result = cli(tmp_path, "search", "x", "--type", "articles", MODEL_ARTICLES="BAAI/bge-small")
    assert_one_line_error(result, 2, "MODEL_ARTICLES", "BAAI/bge-small")


def test_publish_to_a_broker_that_does_not_answer_is_one_quick_line(tmp_path: Path) -> None:
    result = cli(tmp_path, "publish", str(SAMPLES / "posts.jsonl"))
    assert_one_line_error(result, 2, "RABBITMQ_URL", "amqp://guest:***@127.0.0.1:")
    assert " ERROR " not in result.stderr  # pika's own connection errors stay quiet
    assert result.seconds < 30


# -- an empty store ---------------------------------------------------------------------------
def test_search_on_an_empty_store_hints_at_backfill_without_loading_the_model(
    tmp_path: Path,
) -> None:
    result = cli(tmp_path, "search", "streaming pipelines", "--type", "articles")
    assert_one_line_error(result, 1, "QDRANT_PATH", "feature-pipeline backfill")
    assert not (tmp_path / "qdrant").exists()  # asking created nothing


def test_counts_on_an_empty_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    result = cli(tmp_path, "counts")
    assert result.status == 0, result.output
    assert "is empty" in result.stdout and "feature-pipeline backfill" in result.stdout
    assert not (tmp_path / "qdrant").exists()


def test_a_store_held_by_another_process_fails_before_the_model_loads(tmp_path: Path) -> None:
    folder = tmp_path / "qdrant"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; "
            "from feature_pipeline.settings import load_settings; "
            "from feature_pipeline.connectors.qdrant.store import FeatureStore; "
            f"FeatureStore.open(load_settings(_env_file=None, qdrant_path=Path({str(folder)!r}))); "
            "print('open', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        result = cli(tmp_path, "backfill", str(SAMPLES / "posts.jsonl"), QDRANT_PATH=str(folder))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert_one_line_error(result, 2, "QDRANT_PATH", "open in another process")
