"""Runs `feature-pipeline run` as a real subprocess for end-to-end tests, and watches it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from feature_pipeline.metrics import totals_from_text
from feature_pipeline.settings import Settings

from .conftest import free_port, queue_depths, settings_env

#: Every pipeline subprocess a test started, so a failing test cannot leave one running.
STARTED: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> None:
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@dataclass
class PipelineProcess:
    settings: Settings
    log_path: Path
    workers: int = 1
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> PipelineProcess:
        env = settings_env(self.settings)
        env["QUERY_PORT"] = str(self.port)
        env["LOG_LEVEL"] = "INFO"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "feature_pipeline.cli", "run", "--workers", str(self.workers)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        STARTED.append(self.process)
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.counts()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"pipeline did not start; log:\n{self.log()}")

    def counts(self) -> dict[str, int]:
        return self._get("/counts")

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return totals_from_text(response.read().decode())

    def search(self, text: str, data_type: str, k: int = 5) -> list[dict]:
        query = urllib.parse.urlencode({"q": text, "type": data_type, "k": k})
        return self._get(f"/search?{query}")

    def _get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=60) as response:
            return json.loads(response.read())

    def drained(self) -> bool:
        """Nothing ready in its queues and nothing delivered to it left unacknowledged."""
        return queue_depths(self.settings) == 0 and self.metrics().get("messages_unacked") == 0

    def wait_for(self, predicate, timeout_s: float = 180, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if predicate(self):
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}; log tail:\n{self.log()[-4000:]}")

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"pipeline exited with {self.process.returncode}; log:\n{self.log()}"
            )

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM: finish the epoch in flight, ack it, exit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class InProcessPipeline:
    """The real dataflow (RabbitMQ source, Qdrant sink) on Bytewax workers in a thread of the test
    process, so a test can read the embedded store and the metrics directly while it runs."""

    def __init__(self, settings: Settings, workers: int = 1) -> None:
        from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink, build_sync
        from feature_pipeline.connectors.rabbitmq.dead_letters import DeadLetterQueueSink
        from feature_pipeline.connectors.rabbitmq.source import RabbitMQSource
        from feature_pipeline.dataflow import build_dataflow

        self.settings = settings
        self.stop_signal = threading.Event()
        build_sync(settings)
        self._flow = build_dataflow(
            settings,
            RabbitMQSource(settings, self.stop_signal),
            FeatureStoreSink(settings, partitions=workers),
            DeadLetterQueueSink(settings),
        )
        self._workers = workers
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> InProcessPipeline:
        from datetime import timedelta

        from bytewax.run import cli_main

        def run() -> None:
            try:
                cli_main(
                    self._flow,
                    workers_per_process=self._workers,
                    epoch_interval=timedelta(milliseconds=self.settings.epoch_interval_ms),
                )
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="pipeline", daemon=True)
        self._thread.start()
        return self

    def check_alive(self) -> None:
        assert self._thread is not None
        if not self._thread.is_alive():
            raise RuntimeError(f"the dataflow stopped: {self._error!r}")

    def stop(self, timeout_s: float = 60) -> None:
        assert self._thread is not None
        self.stop_signal.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("the dataflow did not stop")
        if self._error is not None:
            raise self._error
