"""The broker's hard edges against the real RabbitMQ: a worker busy past the heartbeat keeps its
connection, the byte budget and one batch's lookahead bound what is buffered, a refused login or a missing exchange
plugin is a one-line error at start, and dead letters are sent once per message."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from feature_pipeline.connectors.rabbitmq import topology
from feature_pipeline.connectors.rabbitmq.dead_letters import DeadLetterQueueSink, dead_letter_id
from feature_pipeline.connectors.rabbitmq.publisher import DEAD_LETTER_ID_HEADER
from feature_pipeline.connectors.rabbitmq.source import RabbitMQSource
from feature_pipeline.domain.changes import DeadLetter
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings, SettingsError
from feature_pipeline.startup import check_broker
from feature_pipeline.status import readiness

from .conftest import drain, queue_depth


def publish_plain(settings: Settings, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    channel = connection.channel()
    topology.declare_topology(channel, settings)
    for body in bodies:
        channel.basic_publish("", settings.rabbitmq_queue, body)
    connection.close()


def read_until(part, count: int, timeout_s: float = 30) -> list:
    """What Bytewax does: next_batch until `count` messages came out."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got.extend(part.next_batch())
        time.sleep(0.01)
    return got


def test_a_worker_busy_past_the_heartbeat_keeps_its_connection(settings: Settings) -> None:
    settings = settings.model_copy(update={"rabbitmq_heartbeat_s": 2})
    bodies = [f"message {i}".encode() for i in range(50)]
    publish_plain(settings, bodies)
    part = RabbitMQSource(settings).build_part("in", settings.rabbitmq_queue, None)
    try:
        first = read_until(part, 50)
        assert [m.body for m in first] == bodies
        # The worker is busy for 5 heartbeats: nobody calls next_batch.
        time.sleep(10)
        part.snapshot()  # the epoch closes
        assert part.next_batch() == []  # acks it
        time.sleep(1)
        assert part._consumer is not None and part._consumer.error is None
    finally:
        part.close()
    # Acked on the connection that read them: nothing comes back.
    assert queue_depth(settings, settings.rabbitmq_queue) == 0


def test_the_byte_budget_bounds_what_is_buffered(settings: Settings) -> None:
    size = 10_000
    settings = settings.model_copy(update={"rabbitmq_prefetch_bytes": 10 * size})
    bodies = [str(i).encode().ljust(size, b".") for i in range(200)]
    publish_plain(settings, bodies)
    part = RabbitMQSource(settings).build_part("in", settings.rabbitmq_queue, None)
    try:
        time.sleep(2)  # what the I/O thread takes while nobody reads
        consumer = part._consumer
        assert consumer is not None
        buffered, _ = consumer.buffered()
        assert 1 <= buffered <= 15, buffered  # budget / size = 10, plus what was on the wire
        seen: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(seen) < 200 and time.monotonic() < deadline:
            batch = part.next_batch()
            seen.extend(m.body for m in batch)
            if batch:
                part.snapshot()  # each batch its own epoch: acked by the next call
        assert seen == bodies  # all of them, once, in order
        part.snapshot()
        part.next_batch()
    finally:
        part.close()
    assert queue_depth(settings, settings.rabbitmq_queue) == 0


def test_about_one_batch_is_buffered_beyond_what_was_handed_out(settings: Settings) -> None:
    settings = settings.model_copy(update={"batch_size": 10, "batch_max_wait_ms": 0})
    bodies = [f"message {i}".encode() for i in range(200)]
    publish_plain(settings, bodies)
    part = RabbitMQSource(settings).build_part("in", settings.rabbitmq_queue, None)

    def unacked() -> float:
        value = metrics.registry.get_sample_value(
            "feature_pipeline_messages_unacked", {"queue": settings.rabbitmq_queue}
        )
        assert value is not None
        return value

    try:
        time.sleep(2)  # what the I/O thread takes while nobody reads
        consumer = part._consumer
        assert consumer is not None
        assert 1 <= consumer.buffered()[0] <= 12  # one batch, plus what was on the wire
        first = read_until(part, 10)
        assert len(first) == 10
        time.sleep(2)  # the next batch arrives while the worker holds the first
        assert 1 <= consumer.buffered()[0] <= 12
        assert 11 <= unacked() <= 22  # handed out and buffered: nothing else was delivered
        # A crash now would send back these few, not the whole backlog.
        assert queue_depth(settings, settings.rabbitmq_queue) >= 200 - 22
        seen = [m.body for m in first]
        deadline = time.monotonic() + 60
        part.snapshot()
        while len(seen) < 200 and time.monotonic() < deadline:
            batch = part.next_batch()
            seen.extend(m.body for m in batch)
            if batch:
                part.snapshot()
        assert seen == bodies
        part.next_batch()  # acks the last epoch
        deadline = time.monotonic() + 10
        while unacked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert unacked() == 0
    finally:
        part.close()
    assert queue_depth(settings, settings.rabbitmq_queue) == 0


def test_a_refused_login_is_retried_and_shown_on_ready(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"rabbitmq_url": "amqp://guest:not-the-password@127.0.0.1:5672/"}
    )
    stop = threading.Event()
    built = threading.Thread(
        target=lambda: RabbitMQSource(settings, stop).build_part(
            "in", settings.rabbitmq_queue, None
        )
    )
    built.start()
    try:
        deadline = time.monotonic() + 20
        while "refused the credentials" not in readiness.reasons().get("broker", ""):
            assert time.monotonic() < deadline, readiness.reasons()
            time.sleep(0.1)
        assert "not-the-password" not in str(readiness.reasons())
    finally:
        stop.set()
        built.join(10)
        readiness.ready("broker")
        readiness.ready(f"queue {settings.rabbitmq_queue}")
    assert not built.is_alive()


def test_a_wrong_broker_password_is_one_line_at_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "QDRANT_"))}
    env |= {
        "RABBITMQ_URL": "amqp://guest:planted-secret-5e1@127.0.0.1:5672/",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "QUERY_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: RABBITMQ_URL: the broker refused the credentials for user 'guest' "
        "(amqp://guest:***@127.0.0.1:5672/)"
    ]
    assert "planted-secret" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "Loading SentenceTransformer" not in done.stderr


def test_a_missing_exchange_plugin_is_one_line_and_declares_no_queue(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An exchange type the broker lacks: RabbitMQ closes the whole connection, as it does for
    # x-consistent-hash when the plugin is off.
    monkeypatch.setattr(topology, "ROUTER_EXCHANGE_TYPE", "x-no-such-plugin")
    with pytest.raises(topology.TopologyError) as raised:
        check_broker(settings)
    assert isinstance(raised.value, SettingsError)  # the CLI prints it as one line, exit 2
    assert "\n" not in str(raised.value)
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in str(raised.value)
    assert "RABBITMQ_SHARDS=0" in str(raised.value)
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    for queue in [settings.rabbitmq_queue, settings.dead_letter_queue, *settings.shard_queues]:
        with pytest.raises(ChannelClosedByBroker):  # 404: never declared
            connection.channel().queue_declare(queue, passive=True)
    connection.close()
    monkeypatch.undo()
    check_broker(settings)  # with the plugin: fine, and the topology is there
    assert queue_depth(settings, settings.dead_letter_queue) == 0


def test_a_redelivered_poison_message_is_dead_lettered_once(settings: Settings) -> None:
    letters = [
        DeadLetter(source="q", body=b"{not json", reason="invalid_json", error_type="invalid_json"),
        DeadLetter(source="q", body=b"[]", reason="not an object", error_type="invalid_event"),
    ]
    before = metrics.get("dead_letters_repeated")
    sink = DeadLetterQueueSink(settings).build_part("dl", "dead-letters", None)
    sink.write_batch(letters)
    sink.write_batch([letters[0]])  # redelivered within this process's lifetime
    sink.close()
    # A new process: the redelivered one is known from the dead-letter queue's ids; a new one
    # with the same body but another producer stamp is another message.
    restarted = DeadLetterQueueSink(settings).build_part("dl", "dead-letters", None)
    again = replace(letters[1], redelivered=True)
    other = replace(letters[1], stamp="1700000000000000")
    restarted.write_batch([again, other])
    restarted.close()
    queued = drain(settings, settings.dead_letter_queue)
    ids = [headers[DEAD_LETTER_ID_HEADER] for headers, _ in queued]
    assert ids == [dead_letter_id(letters[0]), dead_letter_id(letters[1]), dead_letter_id(other)]
    assert [body for _, body in queued] == [b"{not json", b"[]", b"[]"]
    assert metrics.get("dead_letters_repeated") - before == 2
