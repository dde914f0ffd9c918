"""SIGTERM stops `run` within seconds at any time: while the broker is unreachable (its retry
waits wake on the stop request) and while the model is still loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import free_port
from .pipeline_process import STARTED

pytestmark = pytest.mark.slow

#: What a supervisor can count on (README, "Errors and signals").
STOP_WITHIN_S = 10


def start_run(tmp_path: Path, password: str = "guest") -> tuple[subprocess.Popen[bytes], Path]:
    """`feature-pipeline run` against a closed loopback port, logging to a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "QDRANT_"))}
    env |= {
        "RABBITMQ_URL": f"amqp://guest:{password}@127.0.0.1:{free_port()}/",
        "RABBITMQ_QUEUE": "signals-test",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "QUERY_PORT": "0",
        "LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "run.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "feature_pipeline.cli", "run"],
        env=env,
        cwd=tmp_path,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    STARTED.append(process)
    return process, log_path


def wait_for_line(process: subprocess.Popen[bytes], log_path: Path, text: str) -> None:
    deadline = time.monotonic() + 240  # the model loads first: 15-60 s on a busy machine
    while text not in log_path.read_text():
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


def stop_and_time(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=60)
    return status, time.monotonic() - started


def test_sigterm_stops_run_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    process, log_path = start_run(tmp_path, password="hunter2-planted-5d1e")
    wait_for_line(process, log_path, "retrying in")
    time.sleep(1.5)  # inside a backoff wait, not just after a failed attempt
    status, seconds = stop_and_time(process)
    log = log_path.read_text()
    assert status == 0, log
    assert seconds < STOP_WITHIN_S, log
    assert "stopped while waiting for the broker" in log
    assert "hunter2-planted-5d1e" not in log and "guest:***@127.0.0.1" in log
    assert "Traceback" not in log


def test_sigterm_during_start_up_exits_at_once(tmp_path: Path) -> None:
    process, log_path = start_run(tmp_path)
    wait_for_line(process, log_path, "Loading SentenceTransformer")
    status, seconds = stop_and_time(process)
    log = log_path.read_text()
    assert status == 128 + signal.SIGTERM, log
    assert seconds < STOP_WITHIN_S, log
    assert "Traceback" not in log
