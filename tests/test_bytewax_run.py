"""`python -m bytewax.run feature_pipeline.flow:flow`, as the course starts it, on the real broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, queue_depth, read_jsonl, settings_env
from .pipeline_process import STARTED, PipelineProcess

pytestmark = pytest.mark.slow

COMMAND = ("-m", "bytewax.run", "feature_pipeline.flow:flow")


class BytewaxRunProcess(PipelineProcess):
    """The pipeline started by Bytewax's own runner instead of `feature-pipeline run`."""

    def start(self) -> BytewaxRunProcess:
        env = settings_env(self.settings) | {"QUERY_PORT": str(self.port), "LOG_LEVEL": "INFO"}
        self.process = subprocess.Popen(
            [sys.executable, *COMMAND],
            env=env,
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        STARTED.append(self.process)
        self.wait_ready()
        return self


def test_bytewax_runner_indexes_a_published_document_and_stops_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    post = read_jsonl(SAMPLES / "posts.jsonl")[0]
    entry_id = str(post.pop("_id"))
    pipeline = BytewaxRunProcess(settings, tmp_path / "flow.log").start()
    with EventPublisher(settings) as publisher:
        publisher.publish(
            [ChangeEvent(op=Op.INSERT, type=DataType.POSTS, entry_id=entry_id, document=post, ts=1)]
        )
    pipeline.wait_for(lambda p: p.counts().get("cleaned_posts") == 1, what="the post indexed")
    hits = pipeline.search("MLOps", "posts", k=1)
    assert hits and hits[0]["entry_id"] == entry_id

    assert pipeline.stop() == 0, pipeline.log()
    assert "consuming" in pipeline.log() and "Traceback" not in pipeline.log()
    # Acknowledged on the way out: nothing left to redeliver.
    queues = [settings.rabbitmq_queue, *settings.shard_queues]
    assert sum(queue_depth(settings, q) for q in queues) == 0
    stored = FeatureStore.open(settings).scroll(DataType.POSTS.cleaned_collection)
    assert [p.payload["entry_id"] for p in stored] == [entry_id]


def test_a_bad_setting_stops_the_bytewax_runner_in_one_line(settings: Settings) -> None:
    env = settings_env(settings) | {"CHUNK_SIZE_POSTS": "100000"}
    done = subprocess.run(
        [sys.executable, *COMMAND], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.splitlines() if line.startswith("error: CHUNK_SIZE_POSTS")
    ]
