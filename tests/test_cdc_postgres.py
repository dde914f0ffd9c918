"""PostgreSQL CDC against the real server and broker: changes, snapshot, kill -9, lost slot."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import psycopg
import pytest

from feature_pipeline.connectors.cdc.base import CdcStats, PositionLost, run_cdc
from feature_pipeline.connectors.cdc.postgres import (
    PostgresSource,
    lsn_to_int,
)
from feature_pipeline.domain.events import ChangeEvent, Op, parse_event
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, load_settings

from .conftest import delete_topology, final_state
from .warehouse import (
    DSN,
    TABLES,
    Warehouse,
    drop_slot,
    ensure_logical_postgres,
    start_cli,
    temporary_warehouse,
    wait_until,
)

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def logical_postgres() -> None:
    ensure_logical_postgres()


@pytest.fixture
def warehouse() -> Iterator[Warehouse]:
    with temporary_warehouse() as warehouse:
        yield warehouse


@pytest.fixture
def settings() -> Iterator[Settings]:
    settings = load_settings(
        _env_file=None, rabbitmq_queue=f"test-cdc-{uuid.uuid4().hex[:12]}", rabbitmq_shards=2
    )
    yield settings
    delete_topology(settings)


# --- reading the broker ----------------------------------------------------------------------


class QueueReader:
    """Drains every queue of the topology; events of a document keep their queue order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events: list[ChangeEvent] = []
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
        self._channel = self._connection.channel()

    def drain(self) -> list[ChangeEvent]:
        for queue in [self.settings.rabbitmq_queue, *self.settings.shard_queues]:
            while True:
                try:
                    method, _props, body = self._channel.basic_get(queue=queue, auto_ack=True)
                except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                    self._channel = self._connection.channel()
                    break
                if method is None:
                    break
                self.events.append(parse_event(body))
        return self.events

    def wait_for(self, done: Callable[[list[ChangeEvent]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.drain()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; {len(self.events)} events so far")
            time.sleep(0.05)

    def close(self) -> None:
        self._connection.close()


@pytest.fixture
def reader(settings: Settings) -> Iterator[QueueReader]:
    reader = QueueReader(settings)
    yield reader
    reader.close()


def per_document(events: list[ChangeEvent]) -> dict[tuple[DataType, str], list[ChangeEvent]]:
    grouped: dict[tuple[DataType, str], list[ChangeEvent]] = {}
    for event in events:
        grouped.setdefault((event.type, event.entry_id), []).append(event)
    return grouped


# --- running the service ---------------------------------------------------------------------


class InThread:
    """`run_cdc` on a thread, stopped like SIGTERM stops it; re-raises what the run raised."""

    def __init__(self, source: PostgresSource, settings: Settings) -> None:
        self.stop = threading.Event()
        self.stats = CdcStats()
        self.error: BaseException | None = None

        def target() -> None:
            try:
                run_cdc(source, settings, self.stop, stats=self.stats, idle_wait_s=0.05)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def finish(self) -> CdcStats:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.stats


# --- tests -----------------------------------------------------------------------------------


def test_inserts_updates_deletes_arrive_in_order_per_document(
    warehouse: Warehouse, settings: Settings, reader: QueueReader
) -> None:
    run = InThread(PostgresSource(warehouse.config()), settings)
    wait_until(
        lambda: (
            warehouse.slot_row(f"{warehouse.slot}_snapshot") is None
            and (warehouse.slot_row() is not None)
        )
    )

    warehouse.upsert("posts", "p1", {"_id": "p1", "platform": "linkedin", "v": 1})
    warehouse.upsert("articles", "a1", {"link": "https://x", "v": 1})
    warehouse.upsert("posts", "p1", {"platform": "linkedin", "v": 2})
    with warehouse.conn.transaction():  # two changes in one transaction: one event, the last
        warehouse.upsert("posts", "p2", {"v": 1})
        warehouse.upsert("posts", "p2", {"v": 2})
    warehouse.execute("update {s}.articles set id = 'a2' where id = 'a1'")  # key change
    warehouse.execute("delete from {s}.posts where id = 'p1'")
    warehouse.upsert("repositories", "r1", {"name": "repo", "content": {"a.py": "x"}})

    reader.wait_for(lambda events: any(e.type is DataType.REPOSITORIES for e in events))
    stats = run.finish()

    docs = per_document(reader.events)
    ops = {key: [(e.op, e.document) for e in events] for key, events in docs.items()}
    assert ops == {
        (DataType.POSTS, "p1"): [
            (Op.INSERT, {"platform": "linkedin", "v": 1}),  # `_id` is not part of the document
            (Op.UPDATE, {"platform": "linkedin", "v": 2}),
            (Op.DELETE, None),
        ],
        (DataType.ARTICLES, "a1"): [
            (Op.INSERT, {"link": "https://x", "v": 1}),
            (Op.DELETE, None),
        ],
        (DataType.ARTICLES, "a2"): [(Op.UPDATE, {"link": "https://x", "v": 1})],
        (DataType.POSTS, "p2"): [(Op.INSERT, {"v": 2})],
        (DataType.REPOSITORIES, "r1"): [(Op.INSERT, {"name": "repo", "content": {"a.py": "x"}})],
    }
    all_ts = [e.ts for e in reader.events]
    for events in docs.values():
        ts = [e.ts for e in events]
        assert ts == sorted(set(ts)), "ts strictly increases per document"
    # The delete of a1 and the insert of a2 come from one transaction: one commit LSN.
    assert docs[(DataType.ARTICLES, "a1")][1].ts == docs[(DataType.ARTICLES, "a2")][0].ts
    assert stats.published == {
        "posts.insert": 2,
        "posts.update": 1,
        "posts.delete": 1,
        "articles.insert": 1,
        "articles.update": 1,
        "articles.delete": 1,
        "repositories.insert": 1,
    }
    # Confirmed events were followed by advancing the slot past the last of them.
    slot = warehouse.slot_row()
    assert slot is not None and lsn_to_int(slot[0]) >= max(t for t in all_ts if t is not None)


def test_snapshot_then_stream_has_no_gap(
    warehouse: Warehouse, settings: Settings, reader: QueueReader
) -> None:
    for i in range(300):
        warehouse.upsert(list(TABLES)[i % 3], f"d{i}", {"v": 0, "i": i})

    # Keep writing while the service starts, snapshots and hands over to the stream.
    writing = threading.Event()
    writer_conn = psycopg.connect(DSN, autocommit=True)
    writer = Warehouse(warehouse.schema, warehouse.slot, writer_conn)

    def write() -> None:
        step = 1
        while not writing.is_set() or step < 200:
            i = step % 400  # updates existing rows and inserts new ones
            writer.upsert(list(TABLES)[i % 3], f"d{i}", {"v": step, "i": i})
            if step % 7 == 0:
                writer.execute(
                    f"delete from {{s}}.{list(TABLES)[(step // 7) % 3]} where id = %s",
                    (f"d{(step // 7) % 300}",),
                )
            step += 1
            time.sleep(0.002)

    thread = threading.Thread(target=write)
    thread.start()
    run = InThread(PostgresSource(warehouse.config()), settings)
    wait_until(
        lambda: (
            warehouse.slot_row(f"{warehouse.slot}_snapshot") is None
            and (warehouse.slot_row() is not None)
        )
    )
    time.sleep(0.3)
    writing.set()
    thread.join()
    writer_conn.close()

    expected = warehouse.rows()
    reader.wait_for(lambda events: final_state(events) == expected)
    run.finish()

    # The snapshot: every row then present, as inserts stamped with the slot's consistent point.
    snapshot = [e for e in reader.events if e.ts == min(ev.ts or 0 for ev in reader.events)]
    assert len(snapshot) > 250 and all(e.op is Op.INSERT for e in snapshot)
    assert len(reader.events) > len(snapshot)  # and the writes after it were streamed


def test_kill_9_mid_stream_then_restart_publishes_every_change(
    warehouse: Warehouse, settings: Settings, reader: QueueReader, tmp_path: Path
) -> None:
    log = tmp_path / "cdc.log"
    process = start_cli(warehouse, settings, log)
    wait_until(
        lambda: (
            warehouse.slot_row() is not None
            and (warehouse.slot_row(f"{warehouse.slot}_snapshot") is None)
        )
    )

    written: set[tuple[str, int]] = set()
    killed = False
    for step in range(600):
        entry_id = f"k{step % 50}"
        warehouse.upsert("posts", entry_id, {"v": step})
        written.add((entry_id, step))
        if step == 250:
            # Kill it mid-stream: only once it has published part of what was written.
            reader.wait_for(lambda events: len(events) > 0, timeout=30)
            process.send_signal(signal.SIGKILL)  # no chance to save anything
            process.wait()
            killed = True
        if step == 400:
            process = start_cli(warehouse, settings, log)
    assert killed

    def all_seen(events: list[ChangeEvent]) -> bool:
        seen = {(e.entry_id, (e.document or {}).get("v")) for e in events}
        return written <= seen

    reader.wait_for(all_seen, timeout=30)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0, log.read_text()
    assert "stopped: published" in log.read_text()


def test_dropped_slot_fails_loudly(
    warehouse: Warehouse, settings: Settings, reader: QueueReader, tmp_path: Path
) -> None:
    log = tmp_path / "cdc.log"
    process = start_cli(warehouse, settings, log)
    warehouse.upsert("posts", "p1", {"v": 1})
    reader.wait_for(lambda events: len(events) == 1)

    drop_slot(warehouse.conn, warehouse.slot)
    assert process.wait(timeout=20) == 2
    output = log.read_text()
    assert "no longer exists" in output and "--snapshot" in output


def test_interrupted_snapshot_is_redone_and_invalidated_slot_is_refused(
    warehouse: Warehouse, settings: Settings
) -> None:
    warehouse.upsert("posts", "p1", {"v": 1})
    source = PostgresSource(warehouse.config())
    source.open()  # first start: marker slot + logical slot, snapshot pending
    first = source.read(100)
    assert [e.entry_id for e in first.events] == ["p1"]
    source.close()  # "crash" before the snapshot completed

    source = PostgresSource(warehouse.config())
    source.open()
    batches = [source.read(100)]
    while batches[-1].position is None:
        batches.append(source.read(100))
    assert [e.entry_id for b in batches for e in b.events] == ["p1"]  # redone, once
    done = batches[-1].position
    assert done is not None and done.snapshot_done
    source.save(done)
    assert warehouse.slot_row(f"{warehouse.slot}_snapshot") is None
    source.close()

    source = PostgresSource(warehouse.config())
    source.open()  # marker gone: streams from the slot, no third snapshot
    assert source.read(100).events == []

    # Invalidating a real slot needs a cluster-wide max_slot_wal_keep_size that would also
    # hit other users' slots on a shared server, so the check runs on the row it reads:
    # pg_replication_slots reports an invalidated slot as wal_status 'lost'.
    database = warehouse.conn.info.dbname
    lost = {
        "slot_type": "logical",
        "plugin": "pgoutput",
        "database": database,
        "wal_status": "lost",
    }
    with pytest.raises(PositionLost, match="--snapshot"):
        source._check_slot(lost)
    source.close()
