"""MongoDB CDC against a scripted change stream of real-format events, and the real broker.

No MongoDB server can be installed here, so `ScriptedMongo` plays the server's part: an oplog
of change events in MongoDB's exact format (`_id` resume tokens, `clusterTime` BSON
Timestamps, `ns`, `documentKey`, `fullDocument` looked up at read time like "updateLookup"),
resume semantics (resumeAfter / startAtOperationTime, code 286 once a token left the oplog).
The broker, the publisher and the position file are the real ones.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest
from bson import Binary, Int64, Timestamp
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId
from pymongo.errors import OperationFailure

from feature_pipeline.connectors.cdc.base import (
    DEFAULT_BATCH_EVENTS,
    CdcStats,
    PositionLost,
    run_cdc,
)
from feature_pipeline.connectors.cdc.mongo import (
    MongoSource,
    StreamInvalidated,
    classify_mongo_error,
    collapse_transaction,
    entry_id_of,
    int_to_timestamp,
    map_change,
    timestamp_to_int,
    transaction_key,
)
from feature_pipeline.connectors.cdc.position import FilePositionStore, PositionFileError
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.connectors.rabbitmq.topology import declare_topology
from feature_pipeline.domain.events import ChangeEvent, Op, event_document, parse_event
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, load_settings

from .conftest import delete_topology, final_state

COLLECTIONS = {t.value: t for t in DataType}
NS_DB = "twin"
WALL = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def token(ts: Timestamp, n: int = 0) -> dict[str, str]:
    """A resume token shaped like the server's: KeyString hex starting with the cluster time."""
    return {"_data": f"82{ts.time:08X}{ts.inc:08X}2B0229296E04{n:04X}5A1004"}


# --- the scripted server ---------------------------------------------------------------------


class ScriptedMongo:
    """An oplog of change events plus the collections' current documents."""

    def __init__(self) -> None:
        self.oplog: list[dict[str, Any]] = []
        self.docs: dict[str, dict[Any, dict[str, Any]]] = {c: {} for c in [*COLLECTIONS, "other"]}
        self.time = 1_700_000_000
        self.inc = 0
        self.rolled_over = 0  # oplog entries before this index are gone
        self.watch_calls: list[dict[str, Any]] = []
        #: Called once per document the snapshot copies: writes "during" the snapshot.
        self.on_copy: Callable[[], None] | None = None
        #: The session of every transaction: `lsid` as drivers send it (a UUID, a user hash).
        self.lsid = {
            "id": Binary.from_uuid(uuid.UUID("7b3c1e2a-9f0d-4c5b-8a6e-1d2f3a4b5c6d")),
            "uid": Binary(hashlib.sha256(b"").digest()),
        }
        self.txn_number = 0
        #: The open transaction: its events and its view of the documents, until it commits.
        self._txn: tuple[list[dict[str, Any]], dict[str, dict[Any, dict[str, Any]]]] | None = None

    def now(self) -> Timestamp:
        self.inc += 1
        return Timestamp(self.time, self.inc)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A multi-document transaction: nothing of it is visible until it commits; then its
        events enter the oplog at once, sharing one clusterTime, each with `lsid`, `txnNumber`
        and a resume token of its own."""
        self.txn_number += 1
        self._txn = ([], copy.deepcopy(self.docs))
        yield
        events, docs = self._txn
        self._txn = None
        commit = self.now()
        for n, event in enumerate(events):
            event["_id"] = token(commit, len(self.oplog) + n)
            event["clusterTime"] = commit
            event["txnNumber"] = Int64(self.txn_number)
            event["lsid"] = self.lsid
        self.docs = docs
        self.oplog.extend(events)  # one step: a reader thread never sees half of it

    @property
    def _current(self) -> dict[str, dict[Any, dict[str, Any]]]:
        """The documents writes go to: the open transaction's, or the committed ones."""
        return self._txn[1] if self._txn is not None else self.docs

    def _log(self, op: str, coll: str | None, **fields: Any) -> None:
        event: dict[str, Any] = {"operationType": op, "wallTime": WALL}
        if coll is not None:
            event["ns"] = {"db": NS_DB, "coll": coll}
        event.update(fields)
        if self._txn is not None:
            self._txn[0].append(event)  # stamped when it commits
            return
        ts = self.now()
        self.oplog.append({"_id": token(ts, len(self.oplog)), "clusterTime": ts, **event})

    def insert(self, coll: str, doc: dict[str, Any]) -> None:
        self._current[coll][doc["_id"]] = dict(doc)
        self._log("insert", coll, fullDocument=dict(doc), documentKey={"_id": doc["_id"]})

    def update(self, coll: str, _id: Any, **fields: Any) -> None:
        self._current[coll][_id].update(fields)
        self._log(
            "update",
            coll,
            documentKey={"_id": _id},
            updateDescription={"updatedFields": fields, "removedFields": [], "truncatedArrays": []},
        )

    def replace(self, coll: str, doc: dict[str, Any]) -> None:
        self._current[coll][doc["_id"]] = dict(doc)
        self._log("replace", coll, fullDocument=dict(doc), documentKey={"_id": doc["_id"]})

    def delete(self, coll: str, _id: Any) -> None:
        del self._current[coll][_id]
        self._log("delete", coll, documentKey={"_id": _id})

    def drop(self, coll: str) -> None:
        self.docs[coll] = {}
        self._log("drop", coll)

    def connect(self) -> ScriptedWarehouse:
        return ScriptedWarehouse(self)


class ScriptedStream:
    def __init__(self, server: ScriptedMongo, position: int) -> None:
        self.server = server
        self.position = position
        self._token: Mapping[str, Any] | None = None

    def try_next(self) -> Mapping[str, Any] | None:
        if self.position >= len(self.server.oplog):
            return None
        event = dict(self.server.oplog[self.position])
        self.position += 1
        if event["operationType"] == "update":  # updateLookup: the document as it is now
            coll, _id = event["ns"]["coll"], event["documentKey"]["_id"]
            current = self.server.docs[coll].get(_id)
            event["fullDocument"] = dict(current) if current is not None else None
        self._token = event["_id"]
        return event

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        # Idle: the post-batch token, i.e. the newest oplog entry the stream has passed.
        if self.position >= len(self.server.oplog) and self.server.oplog:
            return self.server.oplog[-1]["_id"]
        return self._token

    def close(self) -> None:
        pass


class ScriptedWarehouse:
    def __init__(self, server: ScriptedMongo) -> None:
        self.server = server

    def cluster_time(self) -> Timestamp:
        return self.server.now()

    def watch(
        self, *, resume_after: Mapping[str, Any] | None, start_at: Timestamp | None
    ) -> ScriptedStream:
        server = self.server
        server.watch_calls.append({"resume_after": resume_after, "start_at": start_at})
        oplog = server.oplog
        if resume_after is not None:
            index = next((i for i, e in enumerate(oplog) if e["_id"] == resume_after), None)
            if index is None or index < server.rolled_over:
                raise OperationFailure(
                    "Executor error during getMore :: caused by :: Resume of change stream was "
                    "not possible, as the resume point may no longer be in the oplog.",
                    code=286,
                )
            return ScriptedStream(server, index + 1)
        assert start_at is not None
        index = next((i for i, e in enumerate(oplog) if e["clusterTime"] >= start_at), len(oplog))
        return ScriptedStream(server, index)

    def documents(self, collection: str) -> Iterator[Mapping[str, Any]]:
        for doc in list(self.server.docs[collection].values()):
            yield dict(doc)
            if self.server.on_copy is not None:
                self.server.on_copy()

    def existing_ids(self, collection: str, entry_ids: Sequence[str]) -> set[str]:
        return {entry_id_of(_id) for _id in self.server.docs[collection]} & set(entry_ids)

    def close(self) -> None:
        pass


# --- broker helpers --------------------------------------------------------------------------


@pytest.fixture
def settings() -> Iterator[Settings]:
    settings = load_settings(
        _env_file=None, rabbitmq_queue=f"test-cdc-{uuid.uuid4().hex[:12]}", rabbitmq_shards=2
    )
    # Declared up front, as the pipeline would have: the tests drain queues before any publish.
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    declare_topology(connection.channel(), settings)
    connection.close()
    yield settings
    delete_topology(settings)


def drain(settings: Settings) -> list[ChangeEvent]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    channel = connection.channel()
    events = []
    for queue in [settings.rabbitmq_queue, *settings.shard_queues]:
        while True:
            method, _props, body = channel.basic_get(queue=queue, auto_ack=True)
            if method is None:
                break
            events.append(parse_event(body))
    connection.close()
    return events


def warehouse_state(server: ScriptedMongo) -> dict[tuple[DataType, str], Any]:
    return {
        (COLLECTIONS[coll], str(_id)): event_document(doc)
        for coll, docs in server.docs.items()
        if coll in COLLECTIONS
        for _id, doc in docs.items()
    }


def run_until(
    source: MongoSource,
    settings: Settings,
    done: Callable[[], bool],
    *,
    publisher_factory: Callable[[Settings], EventPublisher] = EventPublisher,
    batch_events: int = DEFAULT_BATCH_EVENTS,
) -> CdcStats:
    """Run the real loop on a thread until `done()`, then stop it like SIGTERM does."""
    stop = threading.Event()
    stats = CdcStats()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_cdc(
                source,
                settings,
                stop,
                publisher_factory=publisher_factory,
                batch_events=batch_events,
                stats=stats,
                idle_wait_s=0.01,
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not done() and not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(timeout=10)
    if errors:
        raise errors[0]
    assert done(), "timed out"
    return stats


def streaming(path: Path) -> bool:
    """The snapshot is done: the position file says so."""
    return path.exists() and json.loads(path.read_text())["phase"] == "streaming"


def streaming_from_a_token(path: Path) -> bool:
    """Streaming, and a resume token saved: the snapshot's own last save has none."""
    return streaming(path) and json.loads(path.read_text())["resume_token"] is not None


def make_source(server: ScriptedMongo, path: Path, *, snapshot: bool = False) -> MongoSource:
    return MongoSource(
        COLLECTIONS, FilePositionStore(path), server.connect, snapshot=snapshot, idle_save_every_s=0
    )


# --- pure mapping ----------------------------------------------------------------------------


def test_every_document_event_kind_maps_to_its_envelope() -> None:
    oid = ObjectId("65f1a2b3c4d5e6f708192a3b")
    ts = Timestamp(1_714_564_800, 7)
    ns = {"db": NS_DB, "coll": "articles"}
    full = {
        "_id": oid,
        "platform": "medium",
        "link": "https://medium.com/a",
        "content": {"Title": "T", "Content": "body"},
        "author_id": "5e8f8f8f-0000-4000-8000-000000000001",
        "created": dt.datetime(2024, 5, 1, 12, 0),
        "ref": ObjectId("65f1a2b3c4d5e6f708192a3c"),
        "score": Decimal128("1.50"),
        "tags": ["a", "b"],
    }
    expected_doc = {
        "platform": "medium",
        "link": "https://medium.com/a",
        "content": {"Title": "T", "Content": "body"},
        "author_id": "5e8f8f8f-0000-4000-8000-000000000001",
        "created": "2024-05-01T12:00:00+00:00",
        "ref": "65f1a2b3c4d5e6f708192a3c",
        "score": "1.50",
        "tags": ["a", "b"],
    }
    base = {"_id": token(ts), "clusterTime": ts, "wallTime": WALL, "ns": ns}
    key = {"documentKey": {"_id": oid}}
    insert = {**base, **key, "operationType": "insert", "fullDocument": full}
    update = {
        **base,
        **key,
        "operationType": "update",
        "updateDescription": {"updatedFields": {"platform": "medium"}, "removedFields": []},
        "fullDocument": full,
    }
    replace = {**base, **key, "operationType": "replace", "fullDocument": full}
    delete = {**base, **key, "operationType": "delete"}
    ts_int = (1_714_564_800 << 31) | 7

    for change, op in ((insert, Op.INSERT), (update, Op.UPDATE), (replace, Op.REPLACE)):
        event = map_change(change, COLLECTIONS)
        assert event == ChangeEvent(
            op=op, type=DataType.ARTICLES, entry_id=str(oid), document=expected_doc, ts=ts_int
        )
        assert parse_event(event.to_json()) == event  # survives the wire as JSON
    assert map_change(delete, COLLECTIONS) == ChangeEvent(
        op=Op.DELETE, type=DataType.ARTICLES, entry_id="65f1a2b3c4d5e6f708192a3b", ts=ts_int
    )
    # updateLookup found the document deleted since: its delete follows; nothing to publish.
    assert map_change({**update, "fullDocument": None}, COLLECTIONS) is None
    # String ids (the course's crawler uses UUID strings) are kept as they are.
    string_id = {**insert, "documentKey": {"_id": "abc"}, "fullDocument": {"_id": "abc", "x": 1}}
    assert map_change(string_id, COLLECTIONS) == ChangeEvent(
        op=Op.INSERT, type=DataType.ARTICLES, entry_id="abc", document={"x": 1}, ts=ts_int
    )
    # Unwatched collections and DDL events need no event.
    assert map_change({**insert, "ns": {"db": NS_DB, "coll": "users"}}, COLLECTIONS) is None
    assert map_change({**base, "operationType": "create"}, COLLECTIONS) is None


def test_collection_renamed_into_a_custom_name_maps_to_its_type() -> None:
    ts = Timestamp(1, 1)
    change = {
        "_id": token(ts),
        "operationType": "insert",
        "clusterTime": ts,
        "ns": {"db": NS_DB, "coll": "linkedin_posts"},
        "documentKey": {"_id": "p1"},
        "fullDocument": {"_id": "p1", "platform": "linkedin"},
    }
    event = map_change(change, {"linkedin_posts": DataType.POSTS})
    assert event is not None and event.type is DataType.POSTS


@pytest.mark.parametrize(
    "change",
    [
        {"operationType": "drop", "ns": {"db": NS_DB, "coll": "posts"}},
        {
            "operationType": "rename",
            "ns": {"db": NS_DB, "coll": "posts"},
            "to": {"db": NS_DB, "coll": "old_posts"},
        },
        {
            "operationType": "rename",
            "ns": {"db": NS_DB, "coll": "staging"},
            "to": {"db": NS_DB, "coll": "articles"},
        },
        {"operationType": "dropDatabase", "ns": {"db": NS_DB}},
        {"operationType": "invalidate"},
    ],
    ids=["drop", "rename-away", "rename-into", "dropDatabase", "invalidate"],
)
def test_events_that_end_a_collections_history_fail_loudly(change: dict[str, Any]) -> None:
    ts = Timestamp(1_714_564_800, 1)
    with pytest.raises(StreamInvalidated, match="--snapshot"):
        map_change({"_id": token(ts), "clusterTime": ts, **change}, COLLECTIONS)


def test_drop_of_an_unwatched_collection_is_ignored() -> None:
    ts = Timestamp(1, 1)
    change = {"_id": token(ts), "clusterTime": ts, "operationType": "drop"}
    assert map_change({**change, "ns": {"db": NS_DB, "coll": "users"}}, COLLECTIONS) is None


def test_cluster_time_as_int_keeps_the_order_of_timestamps() -> None:
    stamps = [
        Timestamp(1, 0),
        Timestamp(1, 1),
        Timestamp(1, 2**31 - 1),
        Timestamp(2, 0),
        Timestamp(2**31, 0),  # January 2038
        Timestamp(2**32 - 1, 2**31 - 1),  # February 2106, the last second BSON can hold
    ]
    ints = [timestamp_to_int(s) for s in stamps]
    assert ints == sorted(ints) and len(set(ints)) == len(ints)
    assert ints[-1] < 2**63  # a signed 64-bit integer, as Qdrant stores payload integers
    assert [int_to_timestamp(i) for i in ints] == stamps


def test_an_increment_beyond_31_bits_fails_loudly_rather_than_misorder() -> None:
    with pytest.raises(ValueError, match="does not fit in 31 bits"):
        timestamp_to_int(Timestamp(1, 2**31))


@pytest.mark.parametrize("code", [286, 280, 260])
def test_history_lost_errors_say_run_snapshot(code: int) -> None:
    lost = classify_mongo_error(OperationFailure("resume point gone", code=code))
    assert isinstance(lost, PositionLost) and "--snapshot" in str(lost)


def test_other_errors_are_not_a_lost_position() -> None:
    assert classify_mongo_error(OperationFailure("not primary", code=10107)) is None
    assert classify_mongo_error(ValueError("x")) is None


def test_position_file_replaces_atomically(tmp_path: Path) -> None:
    store = FilePositionStore(tmp_path / "state" / "mongo.json")
    assert store.load() is None
    store.save({"phase": "snapshot", "n": 1})
    store.save({"phase": "streaming", "n": 2})
    assert store.load() == {"phase": "streaming", "n": 2}
    assert [p.name for p in store.path.parent.iterdir()] == ["mongo.json"]  # no temp left
    store.path.write_text("{torn")
    with pytest.raises(PositionFileError, match=r"mongo\.json"):
        store.load()


# --- the source with the real broker ---------------------------------------------------------


def seed(server: ScriptedMongo) -> None:
    for i in range(5):
        server.insert(
            "posts", {"_id": f"p{i}", "platform": "linkedin", "content": {"text": f"{i}"}}
        )
    server.insert("repositories", {"_id": "r1", "name": "r", "link": "l", "content": {}})


def test_snapshot_hands_over_to_the_stream_without_a_gap(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    seed(server)
    server.rolled_over = len(server.oplog)  # the seed's history is no longer in the oplog
    copied = 0

    def write_during_copy() -> None:
        nonlocal copied
        copied += 1
        if copied == 2:
            server.update("posts", "p4", content={"text": "edited during the snapshot"})
            server.delete("posts", "p0")
            server.insert("articles", {"_id": "a1", "platform": "m", "link": "l", "content": {}})

    server.on_copy = write_during_copy
    source = make_source(server, tmp_path / "state.json")
    events: list[ChangeEvent] = []

    def caught_up() -> bool:
        events.extend(drain(settings))
        return final_state(events) == warehouse_state(server) and streaming(tmp_path / "state.json")

    run_until(source, settings, caught_up)

    snapshot = [e for e in events if e.op is Op.INSERT and e.ts == min(x.ts or 0 for x in events)]
    assert {e.entry_id for e in snapshot} >= {"p1", "p2", "p3", "r1"}
    start_at = server.watch_calls[0]["start_at"]
    assert server.watch_calls[0]["resume_after"] is None
    # Copies sit just below the stream's start: every streamed change wins over its copy.
    assert all(e.ts == timestamp_to_int(start_at) - 1 for e in snapshot)
    streamed = [e for e in events if e not in snapshot]
    # (Only each document's own events keep their order across shard queues.)
    assert sorted((e.op, e.entry_id) for e in streamed) == [
        (Op.DELETE, "p0"),
        (Op.INSERT, "a1"),
        (Op.UPDATE, "p4"),
    ]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["phase"] == "streaming"
    assert state["resume_token"] == server.oplog[-1]["_id"]


def test_restart_resumes_after_the_saved_token(settings: Settings, tmp_path: Path) -> None:
    server = ScriptedMongo()
    seed(server)
    path = tmp_path / "state.json"
    events: list[ChangeEvent] = []

    def caught_up() -> bool:
        events.extend(drain(settings))
        return final_state(events) == warehouse_state(server) and streaming(tmp_path / "state.json")

    run_until(make_source(server, path), settings, caught_up)
    first_run = len(events)
    saved = json.loads(path.read_text())["resume_token"]

    # While the service is down.
    server.replace("posts", {"_id": "p1", "platform": "x", "content": {"text": "replaced"}})
    server.delete("repositories", "r1")
    run_until(make_source(server, path), settings, caught_up)

    assert server.watch_calls[-1] == {"resume_after": saved, "start_at": None}
    assert sorted((e.op, e.entry_id) for e in events[first_run:]) == [
        (Op.DELETE, "r1"),
        (Op.REPLACE, "p1"),
    ]


class FlakyPublisher(EventPublisher):
    """The real publisher whose connection dies once mid-batch, after confirming a prefix."""

    confirmed: list[ChangeEvent] = []  # noqa: RUF012 - shared by the instances of one test
    failures_left = 1

    def publish(self, events: Any, *, to_main_queue: bool = False) -> int:
        events = list(events)
        if FlakyPublisher.failures_left and len(events) >= 3:
            FlakyPublisher.failures_left -= 1
            super().publish(events[:2])
            FlakyPublisher.confirmed.extend(events[:2])
            raise ConnectionResetError("broker connection lost mid-batch")
        count = super().publish(events)
        FlakyPublisher.confirmed.extend(events)
        return count


class RecordingStore(FilePositionStore):
    """The real position file, noting how many events were confirmed at each save."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saves: list[tuple[dict[str, Any], int]] = []

    def save(self, data: dict[str, Any]) -> None:
        self.saves.append((data, len(FlakyPublisher.confirmed)))
        super().save(data)


def test_position_is_saved_only_after_the_broker_confirmed_everything_before_it(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    store = RecordingStore(tmp_path / "state.json")
    source = MongoSource(COLLECTIONS, store, server.connect, idle_save_every_s=0)
    FlakyPublisher.confirmed = []
    FlakyPublisher.failures_left = 1
    run_until(source, settings, lambda: streaming(store.path), publisher_factory=FlakyPublisher)

    for i in range(6):  # one batch of 6 changes; the connection dies after 2 confirms
        server.insert("posts", {"_id": f"p{i}", "platform": "x", "content": {"text": str(i)}})
    events: list[ChangeEvent] = []

    def caught_up() -> bool:
        events.extend(drain(settings))
        return final_state(events) == warehouse_state(server) and streaming(tmp_path / "state.json")

    stats = run_until(source, settings, caught_up, publisher_factory=FlakyPublisher)

    assert FlakyPublisher.failures_left == 0 and stats.reconnects == 1
    # Every saved token points at a change whose event, and all before it, were confirmed.
    tokens = [e["_id"] for e in server.oplog]
    for state, confirmed_count in store.saves:
        if state.get("resume_token") is None:
            continue
        position = tokens.index(state["resume_token"]) + 1
        confirmed_ids = {e.entry_id for e in FlakyPublisher.confirmed[:confirmed_count]}
        assert {f"p{i}" for i in range(position)} <= confirmed_ids
    # At least once: the two confirmed before the failure came again after the reconnect.
    assert sorted(e.entry_id for e in events) == ["p0", "p0", "p1", "p1", "p2", "p3", "p4", "p5"]


def test_a_token_that_left_the_oplog_fails_loudly_and_keeps_the_file(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    seed(server)
    path = tmp_path / "state.json"
    events: list[ChangeEvent] = []

    def caught_up() -> bool:
        events.extend(drain(settings))
        return final_state(events) == warehouse_state(server) and streaming(tmp_path / "state.json")

    run_until(make_source(server, path), settings, caught_up)
    saved = path.read_text()
    server.update("posts", "p1", platform="x")
    server.rolled_over = len(server.oplog)  # down for longer than the oplog window

    with pytest.raises(PositionLost, match=r"ChangeStreamHistoryLost.*--snapshot"):
        run_cdc(make_source(server, path), settings, threading.Event())
    assert path.read_text() == saved

    # --snapshot recovers: a fresh copy, then streaming again.
    run_until(make_source(server, path, snapshot=True), settings, caught_up)
    assert json.loads(path.read_text())["phase"] == "streaming"


def test_invalidating_event_publishes_and_saves_what_came_before_then_stops(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    path = tmp_path / "state.json"
    source = make_source(server, path)
    run_until(source, settings, lambda: streaming(path))
    server.insert("posts", {"_id": "p1", "platform": "x", "content": {}})
    server.insert("posts", {"_id": "p2", "platform": "x", "content": {}})
    server.drop("posts")

    with pytest.raises(StreamInvalidated, match=r"'drop' on twin\.posts"):
        run_cdc(make_source(server, path), settings, threading.Event())
    assert sorted(e.entry_id for e in drain(settings)) == ["p1", "p2"]
    assert json.loads(path.read_text())["resume_token"] == server.oplog[1]["_id"]


# --- transactions: one clusterTime, several events -------------------------------------------


def transaction_of_many_kinds(server: ScriptedMongo) -> None:
    """Every way one transaction can change a document more than once."""
    with server.transaction():
        server.insert("posts", {"_id": "p9", "platform": "x", "content": {"text": "first"}})
        server.replace("posts", {"_id": "p9", "platform": "x", "content": {"text": "second"}})
        server.delete("posts", "p2")
        server.insert("posts", {"_id": "p2", "platform": "x", "content": {"text": "re-created"}})
        server.insert("posts", {"_id": "p8", "platform": "x", "content": {"text": "short-lived"}})
        server.delete("posts", "p8")
        server.update("posts", "p1", platform="a")
        server.update("posts", "p1", platform="b")
        server.insert("articles", {"_id": "a1", "platform": "m", "link": "l", "content": {}})


def read_oplog(server: ScriptedMongo, start: int = 0) -> list[Mapping[str, Any]]:
    """The change events as a stream returns them (fullDocument looked up for updates)."""
    stream = ScriptedStream(server, start)
    changes = []
    while (change := stream.try_next()) is not None:
        changes.append(change)
    return changes


def test_a_transaction_becomes_one_event_per_document_its_last() -> None:
    server = ScriptedMongo()
    seed(server)
    seeded = len(server.oplog)
    transaction_of_many_kinds(server)
    changes = read_oplog(server, seeded)

    # MongoDB's format: one clusterTime for the whole transaction, lsid and txnNumber on every
    # event, a resume token per event.
    assert len(changes) == 9
    assert len({c["clusterTime"] for c in changes}) == 1
    assert len({c["_id"]["_data"] for c in changes}) == 9
    assert all(c["txnNumber"] == Int64(1) and c["lsid"] == server.lsid for c in changes)
    key = transaction_key(changes[0])
    assert key is not None and all(transaction_key(c) == key for c in changes)
    assert all(transaction_key(c) is None for c in read_oplog(server)[:seeded])

    ts = timestamp_to_int(changes[0]["clusterTime"])
    events = collapse_transaction(changes, COLLECTIONS)
    assert sorted(events, key=lambda e: e.entry_id) == [
        ChangeEvent(
            op=Op.INSERT,
            type=DataType.ARTICLES,
            entry_id="a1",
            document={"platform": "m", "link": "l", "content": {}},
            ts=ts,
        ),
        ChangeEvent(
            op=Op.UPDATE,
            type=DataType.POSTS,
            entry_id="p1",
            document={"platform": "b", "content": {"text": "1"}},
            ts=ts,
        ),
        ChangeEvent(
            op=Op.INSERT,
            type=DataType.POSTS,
            entry_id="p2",
            document={"platform": "x", "content": {"text": "re-created"}},
            ts=ts,
        ),
        ChangeEvent(op=Op.DELETE, type=DataType.POSTS, entry_id="p8", ts=ts),
        ChangeEvent(
            op=Op.REPLACE,
            type=DataType.POSTS,
            entry_id="p9",
            document={"platform": "x", "content": {"text": "second"}},
            ts=ts,
        ),
    ]
    # Mapped one by one, the strict version guard would keep the *first* event of p9, p2 and
    # p8: the stale text, the document deleted, the deleted document present.
    one_by_one = [e for c in changes if (e := map_change(c, COLLECTIONS)) is not None]
    assert final_state(one_by_one) != final_state(events)
    expected = {k: v for k, v in warehouse_state(server).items() if k[1] in {"a1", "p1", "p2"}}
    expected[(DataType.POSTS, "p9")] = {"platform": "x", "content": {"text": "second"}}
    assert final_state(events) == expected


class TokenRecordingStore(FilePositionStore):
    """The real position file, keeping every resume token saved in it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.tokens: list[Any] = []

    def save(self, data: dict[str, Any]) -> None:
        if data.get("resume_token") is not None:
            self.tokens.append(data["resume_token"])
        super().save(data)


def test_transactions_are_read_whole_and_ts_strictly_increases_per_document(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    seed(server)
    store = TokenRecordingStore(tmp_path / "state.json")
    source = MongoSource(COLLECTIONS, store, server.connect, idle_save_every_s=0)
    events: list[ChangeEvent] = []

    def caught_up() -> bool:
        events.extend(drain(settings))
        return final_state(events) == warehouse_state(server) and streaming(store.path)

    run_until(source, settings, caught_up)
    snapshot_count = len(events)

    # While it streams in batches of 2 changes: transactions of 9 and 2 changes around others.
    server.update("posts", "p3", platform="before")
    transaction_of_many_kinds(server)
    server.insert("posts", {"_id": "p7", "platform": "x", "content": {"text": "between"}})
    with server.transaction():
        server.replace("posts", {"_id": "p9", "platform": "x", "content": {"text": "third"}})
        server.update("posts", "p1", platform="c")
    server.update("posts", "p9", platform="after")
    run_until(source, settings, caught_up, batch_events=2)

    streamed = events[snapshot_count:]
    assert final_state(events) == warehouse_state(server)
    for key, document_events in per_document(streamed).items():
        ts = [e.ts for e in document_events]
        assert ts == sorted(set(ts)), f"{key}: ts must strictly increase, got {ts}"
    assert len(per_document(streamed)[(DataType.POSTS, "p9")]) == 3  # one per clusterTime
    # Saved positions are only ever the end of a transaction (or a change outside one).
    oplog = server.oplog
    ends = [
        e["_id"]
        for i, e in enumerate(oplog)
        if transaction_key(e) is None
        or i + 1 == len(oplog)
        or transaction_key(oplog[i + 1]) != transaction_key(e)
    ]
    assert store.tokens and all(t in ends for t in store.tokens)
    assert store.tokens[-1] == oplog[-1]["_id"]


def per_document(events: list[ChangeEvent]) -> dict[tuple[DataType, str], list[ChangeEvent]]:
    grouped: dict[tuple[DataType, str], list[ChangeEvent]] = {}
    for event in events:
        grouped.setdefault((event.type, event.entry_id), []).append(event)
    return grouped


def test_a_crash_after_a_transaction_republishes_it_whole_then_resumes_after_it(
    settings: Settings, tmp_path: Path
) -> None:
    server = ScriptedMongo()
    seed(server)
    path = tmp_path / "state.json"
    run_until(make_source(server, path), settings, lambda: streaming_from_a_token(path))
    before = json.loads(path.read_text())["resume_token"]
    assert before is not None
    transaction_of_many_kinds(server)
    server.update("posts", "p3", platform="after")

    first = make_source(server, path)
    first.open()
    batch = first.read(1)  # one change asked for: the whole transaction comes
    assert len(batch.events) == 5 and batch.position is not None
    assert batch.position["resume_token"] == server.oplog[-2]["_id"]  # its last event
    first.close()  # killed after publishing, before saving: the position is still `before`

    again = make_source(server, path)
    again.open()
    assert server.watch_calls[-1] == {"resume_after": before, "start_at": None}
    replayed = again.read(1)
    assert replayed == batch  # the same events with the same ts: the guard drops them
    again.save(replayed.position)
    again.close()

    # Resumed after the transaction, never inside it; a later change of p9 has a larger ts.
    with server.transaction():
        server.replace("posts", {"_id": "p9", "platform": "x", "content": {"text": "third"}})
    resumed = make_source(server, path)
    resumed.open()
    rest = resumed.read(100)
    resumed.close()
    assert [(e.op, e.entry_id) for e in rest.events] == [
        (Op.UPDATE, "p3"),
        (Op.REPLACE, "p9"),
    ]
    p9 = [e for e in [*batch.events, *rest.events] if e.entry_id == "p9"]
    assert p9[0].ts is not None and p9[1].ts is not None and p9[1].ts > p9[0].ts
