"""MongoDB CDC: a change stream over the warehouse collections, resumed from a saved token.

The pymongo layer (`PyMongoWarehouse`) is kept thin: one `db.watch(...)` with
`full_document="updateLookup"`, one `find()` per collection for the snapshot, one command for
the cluster time. Everything else is pure and tested against scripted real-format change
events: `map_change` (event -> envelope), `MongoSource` (snapshot hand-over, resume tokens,
positions) and `classify_mongo_error` (history lost -> fail loudly).

Position file (`--state-file`, JSON, replaced atomically)::

    {"version": 1, "phase": "snapshot" | "streaming",
     "start_at": {"t": <seconds>, "i": <increment>},   # cluster time the snapshot began at
     "resume_token": <canonical extended JSON> | null}

Snapshot (first start, `--snapshot`, or phase still "snapshot" after a crash): read the cluster
time T0 and save phase "snapshot" first; copy every document as an insert with ts just below T0;
once the broker confirmed all of them, save phase "streaming" and open the stream with
`startAtOperationTime=T0`. Changes made during the copy are therefore streamed again with larger
ts, and the pipeline's version guard absorbs the overlap. From then on the position is the
resume token (`_id`) of the last change whose event was confirmed.

`ts` is `clusterTime` as one integer: Timestamp(t, i) -> (t << 31) | i. t is unsigned 32-bit
seconds, so ts stays below 2**63, a signed 64-bit integer like Qdrant's integer payloads, until
2106; i counts the operations within one second and never nears 2**31 (one that did would fail
loudly rather than be mis-ordered).
The pipeline's version guard skips an event whose ts is not *larger* than the stored one, so ts
must strictly increase per document. Outside transactions every operation has a clusterTime of
its own. The operations of one transaction share one clusterTime, and their events carry `lsid`
and `txnNumber`; so, like the PostgreSQL side, a transaction is read in one piece and each
document it changed becomes one event, the last of its events in the transaction
(`collapse_transaction`). A position is only ever saved at the end of a transaction, so a
restart never resumes inside one: a document gets at most one event per clusterTime, before
and after a restart.

A transaction ends where an event of another transaction (or none) follows, or where the stream
has nothing more to return: a committed transaction's oplog entries are all visible at once, so
the server returns its events without an empty batch in between.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from bson import Timestamp, json_util
from bson.decimal128 import Decimal128
from bson.json_util import CANONICAL_JSON_OPTIONS
from bson.objectid import ObjectId
from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from feature_pipeline.connectors.cdc.base import Batch, FatalCdcError, PositionLost
from feature_pipeline.connectors.cdc.position import FilePositionStore
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType

log = logging.getLogger(__name__)

STATE_VERSION = 1
#: Server error codes meaning "this position can never be resumed".
HISTORY_LOST_CODES = {
    286: "ChangeStreamHistoryLost",
    280: "ChangeStreamFatalError",
    260: "InvalidResumeToken",
    136: "CappedPositionLost",
}
#: Operations that end a watched collection's history: events cannot express them.
INVALIDATING_OPS = frozenset({"drop", "rename", "dropDatabase", "invalidate"})
DOCUMENT_OPS = {
    "insert": Op.INSERT,
    "update": Op.UPDATE,
    "replace": Op.REPLACE,
    "delete": Op.DELETE,
}
MAX_AWAIT_MS = 500


class StreamInvalidated(FatalCdcError):
    """A watched collection was dropped or renamed, or the stream was invalidated."""


# --- Pure mapping ----------------------------------------------------------------------------


INCREMENT_BITS = 31


def timestamp_to_int(ts: Timestamp) -> int:
    """BSON Timestamp(t, i) -> (t << 31) | i: ordered exactly like the timestamps, below 2**63."""
    if ts.inc >= 1 << INCREMENT_BITS:
        raise ValueError(f"cluster time {ts}: increment {ts.inc} does not fit in 31 bits")
    return (ts.time << INCREMENT_BITS) | ts.inc


def int_to_timestamp(value: int) -> Timestamp:
    return Timestamp(value >> INCREMENT_BITS, value & ((1 << INCREMENT_BITS) - 1))


def entry_id_of(value: Any) -> str:
    """The warehouse `_id` as the event's `entry_id`: strings as they are, ObjectIds as hex."""
    return value if isinstance(value, str) else str(value)


def to_jsonable(value: Any) -> Any:
    """BSON values -> JSON values the pipeline can read (ids and decimals become strings)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Timestamp):
        return timestamp_to_int(value)
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return aware.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, ObjectId | Decimal128 | Decimal | uuid.UUID):
        return str(value)
    return str(value)


def map_change(
    change: Mapping[str, Any], collections: Mapping[str, DataType]
) -> ChangeEvent | None:
    """One change event -> one envelope event, or None when it needs no event.

    Raises `StreamInvalidated` for drop/rename of a watched collection, dropDatabase and
    invalidate: the feature store would keep documents the warehouse no longer has.
    """
    op_type = change["operationType"]
    ns = change.get("ns") or {}
    collection = ns.get("coll")
    if op_type in INVALIDATING_OPS:
        target = (change.get("to") or {}).get("coll")
        if (
            op_type in ("drop", "rename")
            and collection not in collections
            and target not in collections
        ):
            return None
        what = f"{ns.get('db')}.{collection}" if collection else str(ns.get("db", "the stream"))
        raise StreamInvalidated(
            f"change stream event {op_type!r} on {what}: the pipeline still holds documents "
            "the warehouse no longer has. Clear the pipeline's collections, then run "
            "`cdc mongo --snapshot`."
        )
    op = DOCUMENT_OPS.get(op_type)
    data_type = collections.get(collection) if collection is not None else None
    if op is None or data_type is None:
        return None  # DDL events (create, createIndexes, ...) or unwatched collections
    entry_id = entry_id_of(change["documentKey"]["_id"])
    ts = timestamp_to_int(change["clusterTime"])
    if op is Op.DELETE:
        return ChangeEvent(op=op, type=data_type, entry_id=entry_id, ts=ts)
    full = change.get("fullDocument")
    if full is None:
        # updateLookup found nothing: the document was deleted after this update, and that
        # delete is later in the stream.
        return None
    document = to_jsonable(event_document(full))
    return ChangeEvent(op=op, type=data_type, entry_id=entry_id, document=document, ts=ts)


TransactionKey = tuple[Timestamp, Any, Any]


def transaction_key(change: Mapping[str, Any]) -> TransactionKey | None:
    """What the events of one transaction share; None outside a multi-document transaction."""
    if "txnNumber" not in change:
        return None
    return (change["clusterTime"], change.get("lsid"), change["txnNumber"])


def collapse_transaction(
    changes: list[Mapping[str, Any]], collections: Mapping[str, DataType]
) -> list[ChangeEvent]:
    """The events of one transaction (or one change): per document only its last event.

    The events of a transaction share one ts; the version guard would apply only the first of
    them to a document, and that one may be stale (an insert followed by a replace, a delete
    followed by an insert). The last one carries the state the transaction committed.
    """
    last: dict[tuple[DataType, str], ChangeEvent] = {}
    for change in changes:
        event = map_change(change, collections)
        if event is not None:
            key = (event.type, event.entry_id)
            last.pop(key, None)  # re-inserted: the output keeps the order of each last change
            last[key] = event
    return list(last.values())


def classify_mongo_error(exc: BaseException) -> PositionLost | None:
    """A `PositionLost` for errors meaning the saved position can never be resumed."""
    if isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST_CODES:
        return PositionLost(
            f"the change stream cannot resume from the saved position "
            f"({HISTORY_LOST_CODES[exc.code]}, code {exc.code}: {exc}); the oplog no longer "
            "holds the changes since then. Run `cdc mongo --snapshot`."
        )
    return None


def encode_token(token: Mapping[str, Any]) -> Any:
    """A resume token as plain JSON that round-trips every BSON type exactly."""
    return json.loads(json_util.dumps(token, json_options=CANONICAL_JSON_OPTIONS))


def decode_token(data: Any) -> Mapping[str, Any]:
    token: Mapping[str, Any] = json_util.loads(json.dumps(data))
    return token


# --- The pymongo layer -----------------------------------------------------------------------


class ChangeStreamLike(Protocol):
    def try_next(self) -> Mapping[str, Any] | None: ...

    @property
    def resume_token(self) -> Mapping[str, Any] | None: ...

    def close(self) -> None: ...


class Warehouse(Protocol):
    """What the source needs from MongoDB."""

    def cluster_time(self) -> Timestamp: ...

    def watch(
        self, *, resume_after: Mapping[str, Any] | None, start_at: Timestamp | None
    ) -> ChangeStreamLike: ...

    def documents(self, collection: str) -> Iterator[Mapping[str, Any]]: ...

    def existing_ids(self, collection: str, entry_ids: Sequence[str]) -> set[str]:
        """Which of these entry ids (`entry_id_of` the `_id`) the collection has."""
        ...

    def close(self) -> None: ...


class PyMongoWarehouse:
    """The real MongoDB: a replica set or sharded cluster (change streams need an oplog)."""

    def __init__(self, uri: str, db: str, collections: list[str]) -> None:
        self._client: Any = MongoClient(uri, serverSelectionTimeoutMS=10_000, tz_aware=True)
        self._db = self._client[db]
        self._collections = collections

    def cluster_time(self) -> Timestamp:
        reply = self._db.command("ping")
        operation_time = reply.get("operationTime")
        if not isinstance(operation_time, Timestamp):
            raise FatalCdcError(
                "MongoDB returned no operationTime: change streams need a replica set or a "
                "sharded cluster, not a standalone server"
            )
        return operation_time

    def watch(
        self, *, resume_after: Mapping[str, Any] | None, start_at: Timestamp | None
    ) -> ChangeStreamLike:
        watched = {"$in": self._collections}
        pipeline = [
            {
                "$match": {
                    "$or": [
                        {"ns.coll": watched},
                        {"to.coll": watched},
                        {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
                    ]
                }
            }
        ]
        stream: ChangeStreamLike = self._db.watch(
            pipeline,
            full_document="updateLookup",
            resume_after=resume_after,
            start_at_operation_time=start_at if resume_after is None else None,
            max_await_time_ms=MAX_AWAIT_MS,
        )
        return stream

    def documents(self, collection: str) -> Iterator[Mapping[str, Any]]:
        yield from self._db[collection].find({}, batch_size=1000)

    def existing_ids(self, collection: str, entry_ids: Sequence[str]) -> set[str]:
        # An entry id is the `_id` as text: look it up as every type that prints that way.
        candidates: list[Any] = []
        for entry_id in entry_ids:
            candidates.append(entry_id)
            if ObjectId.is_valid(entry_id):
                candidates.append(ObjectId(entry_id))
            if entry_id.lstrip("-").isdigit():
                candidates.append(int(entry_id))
        found = self._db[collection].find({"_id": {"$in": candidates}}, {"_id": 1})
        return {entry_id_of(document["_id"]) for document in found} & set(entry_ids)

    def close(self) -> None:
        self._client.close()


# --- The source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MongoConfig:
    uri: str
    db: str
    #: collection name -> data type
    collections: Mapping[str, DataType]
    state_file: Path
    snapshot: bool = False


class MongoSource:
    """The MongoDB change feed; positions are states of the position file (see module doc)."""

    name = "mongo"
    # Pymongo resumes a stream itself once after a resumable error; anything that still
    # escapes, except a lost history, is retried by reopening from the saved token.
    transient_errors: tuple[type[BaseException], ...] = (ConnectionFailure, OperationFailure)

    def __init__(
        self,
        collections: Mapping[str, DataType],
        store: FilePositionStore,
        connect: Callable[[], Warehouse],
        *,
        snapshot: bool = False,
        idle_save_every_s: float = 5.0,
    ) -> None:
        self.collections = dict(collections)
        self.store = store
        self._connect = connect
        self._force_snapshot = snapshot
        self._idle_save_every_s = idle_save_every_s
        self._warehouse: Warehouse | None = None
        self._stream: ChangeStreamLike | None = None
        self._snapshot: Iterator[Batch[dict[str, Any]]] | None = None
        self._state: dict[str, Any] = {}
        self._max_events = 500
        self._pending_error: FatalCdcError | None = None
        self._last_save = 0.0
        #: A change read past the end of a transaction: the first of the next read.
        self._lookahead: Mapping[str, Any] | None = None
        self._last_transaction: TransactionKey | None = None

    @classmethod
    def from_config(cls, config: MongoConfig) -> MongoSource:
        names = list(config.collections)
        return cls(
            config.collections,
            FilePositionStore(config.state_file),
            lambda: PyMongoWarehouse(config.uri, config.db, names),
            snapshot=config.snapshot,
        )

    # -- lifecycle

    def open(self) -> None:
        self._pending_error = None
        self._warehouse = self._connect()
        state = self.store.load()
        if self._force_snapshot or state is None or state.get("phase") != "streaming":
            if state is not None and state.get("version") != STATE_VERSION:
                raise FatalCdcError(f"{self.store.path}: unknown state version")
            start_at = self._warehouse.cluster_time()
            # Saved before any event: a crash during the copy restarts the snapshot.
            self._state = {
                "version": STATE_VERSION,
                "phase": "snapshot",
                "start_at": {"t": start_at.time, "i": start_at.inc},
                "resume_token": None,
            }
            self.store.save(self._state)
            log.info("mongo CDC: snapshot of %s from cluster time %s", self._names(), start_at)
            self._snapshot = self._snapshot_batches(start_at)
            return
        self._state = state
        self._snapshot = None
        self._open_stream()

    def close(self) -> None:
        self._snapshot = None
        # Reopening resumes after the saved position, which is before anything read ahead.
        self._lookahead = None
        self._last_transaction = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._warehouse is not None:
            self._warehouse.close()
            self._warehouse = None

    def _open_stream(self) -> None:
        token_data = self._state.get("resume_token")
        token = decode_token(token_data) if token_data is not None else None
        start = self._state["start_at"]
        start_at = Timestamp(start["t"], start["i"])
        try:
            self._stream = self._require_warehouse().watch(
                resume_after=token, start_at=None if token is not None else start_at
            )
        except PyMongoError as exc:
            raise classify_mongo_error(exc) or exc from exc
        where = "the saved resume token" if token is not None else f"cluster time {start_at}"
        log.info("mongo CDC: streaming %s from %s", self._names(), where)

    # -- reading

    def read(self, max_events: int) -> Batch[dict[str, Any]]:
        self._max_events = max_events
        if self._snapshot is not None:
            try:
                return next(self._snapshot)
            except StopIteration:
                self._snapshot = None
                self._open_stream()
        if self._pending_error is not None:
            raise self._pending_error
        stream = self._require_stream()
        events: list[ChangeEvent] = []
        last_token: Mapping[str, Any] | None = None
        changes_read = 0
        # Whole transactions only, even past max_events: the position saved after this batch
        # must never fall inside one (see the module doc on ts).
        while changes_read < max_events:
            group = self._next_transaction(stream)
            if not group:
                break
            try:
                events.extend(collapse_transaction(group, self.collections))
            except StreamInvalidated as exc:
                if last_token is None:
                    raise
                # Publish and save what came before it; fail on the next read.
                self._pending_error = exc
                break
            last_token = group[-1]["_id"]
            changes_read += len(group)
        if last_token is not None:
            return Batch(events=events, position=self._streaming_state(last_token))
        return Batch(events=[], position=self._idle_position(stream.resume_token))

    def _next_change(self, stream: ChangeStreamLike) -> Mapping[str, Any] | None:
        if self._lookahead is not None:
            change, self._lookahead = self._lookahead, None
            return change
        try:
            return stream.try_next()
        except PyMongoError as exc:
            raise classify_mongo_error(exc) or exc from exc

    def _next_transaction(self, stream: ChangeStreamLike) -> list[Mapping[str, Any]]:
        """The next change, or all events of the next transaction; [] when there is none now."""
        first = self._next_change(stream)
        if first is None:
            return []
        key = transaction_key(first)
        if key is not None and key == self._last_transaction:
            # Not expected (see the module doc): the rest of a published transaction came late.
            log.warning(
                "mongo CDC: events of transaction %s at %s arrived after a pause; a second "
                "change of one document in it may be skipped by the version guard",
                key[2],
                key[0],
            )
        self._last_transaction = key
        group = [first]
        while key is not None:
            change = self._next_change(stream)
            if change is None:
                break  # nothing more right now: a committed transaction arrives whole
            if transaction_key(change) != key:
                self._lookahead = change
                break
            group.append(change)
        return group

    def _idle_position(self, token: Mapping[str, Any] | None) -> dict[str, Any] | None:
        # The post-batch token moves with the cluster even when no watched collection
        # changes; saving it now and then keeps it inside the oplog window.
        if token is None:
            return None
        state = self._streaming_state(token)
        if state == self._state or time.monotonic() - self._last_save < self._idle_save_every_s:
            return None
        return state

    def save(self, position: dict[str, Any]) -> None:
        self.store.save(position)
        if self._state.get("phase") == "snapshot" and position["phase"] == "streaming":
            self._force_snapshot = False
            log.info("mongo CDC: snapshot complete; streaming changes")
        self._state = position
        self._last_save = time.monotonic()

    def _streaming_state(self, token: Mapping[str, Any] | None) -> dict[str, Any]:
        return {
            **self._state,
            "phase": "streaming",
            "resume_token": encode_token(token) if token is not None else None,
        }

    def _snapshot_batches(self, start_at: Timestamp) -> Iterator[Batch[dict[str, Any]]]:
        # Just below the stream's start: every streamed change of a document wins over its copy.
        ts = timestamp_to_int(start_at) - 1
        warehouse = self._require_warehouse()
        for collection, data_type in self.collections.items():
            batch: list[ChangeEvent] = []
            count = 0
            for document in warehouse.documents(collection):
                batch.append(
                    ChangeEvent(
                        op=Op.INSERT,
                        type=data_type,
                        entry_id=entry_id_of(document["_id"]),
                        document=to_jsonable(event_document(document)),
                        ts=ts,
                    )
                )
                if len(batch) >= self._max_events:
                    count += len(batch)
                    yield Batch(events=batch)
                    batch = []
            if batch:
                count += len(batch)
                yield Batch(events=batch)
            log.info("mongo CDC: snapshot of %s: %d documents", collection, count)
        yield Batch(events=[], position=self._streaming_state(None))

    # -- helpers

    def _require_warehouse(self) -> Warehouse:
        if self._warehouse is None:
            raise RuntimeError("MongoSource is not open")
        return self._warehouse

    def _require_stream(self) -> ChangeStreamLike:
        if self._stream is None:
            raise RuntimeError("MongoSource has no open change stream")
        return self._stream

    def _names(self) -> str:
        return ", ".join(self.collections)
