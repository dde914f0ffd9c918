"""Shared fixtures: offline model loading, a fresh queue topology and store per test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from feature_pipeline.connectors.qdrant.store import close_stores
from feature_pipeline.connectors.rabbitmq import topology
from feature_pipeline.domain.events import ChangeEvent
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(autouse=True)
def _no_leftover_pipelines() -> Iterator[None]:
    """Kill any `feature-pipeline run` subprocess a (failed) test left behind."""
    yield
    from .pipeline_process import kill_leftovers

    kill_leftovers()


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings with a queue topology and an embedded store of this test's own."""
    queue = f"test-{uuid.uuid4().hex[:12]}"
    settings = load_settings(
        _env_file=None,
        rabbitmq_queue=queue,
        rabbitmq_shards=2,
        qdrant_path=tmp_path / "qdrant",
        batch_max_wait_ms=10,
        epoch_interval_ms=200,
        query_port=0,
    )
    yield settings
    close_stores()
    delete_topology(settings)


def delete_topology(settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    topology.delete_topology(connection.channel(), settings)
    connection.close()


def queue_depth(settings: Settings, queue: str) -> int:
    """Messages ready in a queue (not counting delivered, unacknowledged ones)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    depth = connection.channel().queue_declare(queue, passive=True).method.message_count
    connection.close()
    return int(depth)


def queue_depths(settings: Settings) -> int:
    """Messages ready in the pipeline's main and shard queues together."""
    return sum(queue_depth(settings, q) for q in [settings.rabbitmq_queue, *settings.shard_queues])


def drain(settings: Settings, queue: str) -> list[tuple[dict, bytes]]:
    """Consume every ready message of a queue: (headers, body) in queue order."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    channel = connection.channel()
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        messages.append((properties.headers or {}, body))
    connection.close()
    return messages


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "QDRANT_"))}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[name.upper()] = str(value)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def final_state(events: list[ChangeEvent]) -> dict[tuple[DataType, str], Any]:
    """What the pipeline holds after its version guard (`feature_pipeline.sync.is_stale`): per
    document, an event applies only when its ts is larger than the stored one."""
    versions: dict[tuple[DataType, str], tuple[int, Any]] = {}
    for event in events:
        key = (event.type, event.entry_id)
        assert event.ts is not None
        if key not in versions or event.ts > versions[key][0]:
            versions[key] = (event.ts, event.document)
    return {key: doc for key, (_ts, doc) in versions.items() if doc is not None}
