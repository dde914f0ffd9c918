"""PostgreSQL CDC: logical decoding of the warehouse tables through a replication slot.

Table layout. Each data type has one table, named like the type by default, in one schema::

    create table posts (id text primary key, document jsonb not null);

`id` is the warehouse document's id (the event's `entry_id`); `document` is the warehouse
document without `_id` (the event's `document`; a stray `_id` key is dropped). The primary key
is required: it is the replica identity that makes deletes carry the id.

Plugin choice: `pgoutput` through the SQL function `pg_logical_slot_peek_binary_changes`. It is
built into every PostgreSQL >= 10 and allowed on managed services and hardened builds (Debian's
current PostgreSQL 15 refuses third-party output plugins such as wal2json unless the admin lists
them in `output_plugin_libraries`); its binary format is specified and small to parse (below);
and the SQL interface needs no replication-protocol connection. It reads the tables of a
publication (`--publication`, default: the slot's name), which the service creates on first
start if it may.

Loop: peek at most N changes (whole transactions), publish them, wait for the broker's confirms,
then `pg_replication_slot_advance` the slot to the end LSN of the last published transaction.
The slot is the only position: a kill -9 anywhere republishes from the slot's confirmed point
(at least once, never a gap). When a peek bounded by the flush LSN read before it returns fewer
than N changes, every transaction committed before that LSN has been seen, so the slot advances
to it even if no watched table changed: an idle warehouse in a busy database holds no WAL.

`ts` is the transaction's commit end LSN as an integer ((hi << 32) | lo): commit order, and
strictly larger than the snapshot's consistent point. Several changes of one document in one
transaction are collapsed into the last one (the others were never visible to anyone), so `ts`
is strictly increasing per document.

Snapshot (first start, `--snapshot`, or an interrupted snapshot): create a marker slot
`<slot>_snapshot` (physical, reserves no WAL) meaning "snapshot in progress", (re)create the
logical slot (its consistent point L), read every row and publish it as an insert with ts = L,
then drop the marker once everything is confirmed. Rows read after the slot was created may
already include changes that the stream will replay with larger ts; the pipeline's version guard
absorbs that overlap. A restart while the marker exists redoes the snapshot.

A slot that is missing while we run, or invalidated (WAL removed), fails loudly: resuming
would skip changes, and only `--snapshot` can rebuild a consistent state.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psycopg
from psycopg import sql

from feature_pipeline.connectors.cdc.base import Batch, FatalCdcError, PositionLost
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType

log = logging.getLogger(__name__)

ID_COLUMN = "id"
DOCUMENT_COLUMN = "document"
DEFAULT_SLOT = "feature_pipeline_cdc"
SNAPSHOT_MARKER_SUFFIX = "_snapshot"
#: Slot names are [a-z0-9_] and at most 63 bytes; the marker's suffix must still fit.
SLOT_NAME = re.compile(r"^[a-z0-9_]{1,54}$")


# --- LSNs -----------------------------------------------------------------------------------


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> (0x16 << 32) | 0xB374D848: the WAL position as one integer."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# --- pgoutput protocol version 1 -------------------------------------------------------------
# https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html


class Toast(Enum):
    """An unchanged TOASTed value: pgoutput does not resend it on update."""

    UNCHANGED = "u"


Value = str | None | Toast


@dataclass(frozen=True)
class Begin:
    final_lsn: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int


@dataclass(frozen=True)
class Relation:
    relid: int
    schema: str
    name: str
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Insert:
    relid: int
    new: tuple[Value, ...]


@dataclass(frozen=True)
class Update:
    relid: int
    #: The old key (or whole old row under REPLICA IDENTITY FULL); None if the key is unchanged.
    old: tuple[Value, ...] | None
    new: tuple[Value, ...]


@dataclass(frozen=True)
class Delete:
    relid: int
    old: tuple[Value, ...]


@dataclass(frozen=True)
class Truncate:
    relids: tuple[int, ...]


@dataclass(frozen=True)
class Other:
    """Origin, type and message records: nothing to publish."""

    kind: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Other


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def char(self) -> str:
        return chr(self.unpack("!B"))

    def string(self) -> str:
        end = self.data.index(b"\0", self.pos)
        value = self.data[self.pos : end].decode()
        self.pos = end + 1
        return value

    def tuple_data(self) -> tuple[Value, ...]:
        values: list[Value] = []
        for _ in range(self.unpack("!h")):
            kind = self.char()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(Toast.UNCHANGED)
            elif kind == "t":
                length = self.unpack("!i")
                values.append(self.data[self.pos : self.pos + length].decode())
                self.pos += length
            else:
                raise ValueError(f"unknown pgoutput tuple value kind {kind!r}")
        return tuple(values)


def parse_pgoutput(data: bytes) -> Message:
    """Decode one pgoutput (protocol 1) message."""
    reader = _Reader(data)
    kind = reader.char()
    if kind == "B":
        return Begin(final_lsn=reader.unpack("!Q"))
    if kind == "C":
        reader.unpack("!B")  # flags, unused
        commit_lsn = reader.unpack("!Q")
        return Commit(commit_lsn=commit_lsn, end_lsn=reader.unpack("!Q"))
    if kind == "R":
        relid = reader.unpack("!I")
        schema, name = reader.string(), reader.string()
        reader.unpack("!B")  # replica identity setting
        columns = []
        for _ in range(reader.unpack("!h")):
            reader.unpack("!B")  # flags (1 = part of the key)
            columns.append(reader.string())
            reader.unpack("!I")  # type oid
            reader.unpack("!i")  # type modifier
        return Relation(relid=relid, schema=schema, name=name, columns=tuple(columns))
    if kind == "I":
        relid = reader.unpack("!I")
        reader.char()  # 'N'
        return Insert(relid=relid, new=reader.tuple_data())
    if kind == "U":
        relid = reader.unpack("!I")
        marker = reader.char()
        old = None
        if marker in ("K", "O"):
            old = reader.tuple_data()
            marker = reader.char()
        return Update(relid=relid, old=old, new=reader.tuple_data())
    if kind == "D":
        relid = reader.unpack("!I")
        reader.char()  # 'K' or 'O'
        return Delete(relid=relid, old=reader.tuple_data())
    if kind == "T":
        count = reader.unpack("!I")
        reader.unpack("!B")  # options
        return Truncate(relids=tuple(reader.unpack("!I") for _ in range(count)))
    return Other(kind=kind)


# --- From decoded messages to events ---------------------------------------------------------

#: Fetches a row's current document, for the rare update that changes the key but not the
#: (TOASTed, hence not resent) document.
DocumentLookup = Callable[[DataType, str], dict[str, Any] | None]


class StreamInvalidated(FatalCdcError):
    """A change that events cannot express (a TRUNCATE of a watched table)."""


@dataclass(frozen=True)
class Transaction:
    end_lsn: int
    events: list[ChangeEvent]


@dataclass
class Decoder:
    """Turns pgoutput messages into one event list per committed transaction."""

    #: (schema, table) -> data type of every watched table.
    tables: Mapping[tuple[str, str], DataType]
    lookup: DocumentLookup
    relations: dict[int, Relation] = field(default_factory=dict)
    skipped: int = 0

    def transactions(self, messages: list[Message]) -> list[Transaction]:
        """Complete transactions only; changes after the last commit are left for the next read."""
        done: list[Transaction] = []
        pending: dict[tuple[DataType, str], ChangeEvent] = {}
        for message in messages:
            if isinstance(message, Relation):
                self.relations[message.relid] = message
            elif isinstance(message, Begin):
                pending = {}
            elif isinstance(message, Commit):
                done.append(Transaction(message.end_lsn, self._stamped(pending, message.end_lsn)))
                pending = {}
            elif isinstance(message, Truncate):
                names = [self._table(relid) for relid in message.relids]
                watched = [n for n in names if n is not None]
                if watched:
                    raise StreamInvalidated(
                        f"table(s) {', '.join(watched)} were truncated; events cannot express "
                        "'delete everything'. Clear the pipeline's collections, then run "
                        "`cdc postgres --snapshot`."
                    )
            elif isinstance(message, Insert | Update | Delete):
                for event in self._events(message):
                    key = (event.type, event.entry_id)
                    # The last change of a document in a transaction is its committed state;
                    # a document created in this transaction stays an insert.
                    previous = pending.pop(key, None)
                    if previous is not None and previous.op is Op.INSERT and event.op is Op.UPDATE:
                        event = event.model_copy(update={"op": Op.INSERT})
                    pending[key] = event
        return done

    @staticmethod
    def _stamped(pending: dict[tuple[DataType, str], ChangeEvent], ts: int) -> list[ChangeEvent]:
        return [event.model_copy(update={"ts": ts}) for event in pending.values()]

    def _table(self, relid: int) -> str | None:
        relation = self.relations.get(relid)
        if relation is None or (relation.schema, relation.name) not in self.tables:
            return None
        return f"{relation.schema}.{relation.name}"

    def _events(self, message: Insert | Update | Delete) -> list[ChangeEvent]:
        relation = self.relations.get(message.relid)
        if relation is None:
            raise FatalCdcError(f"pgoutput sent a change of unknown relation {message.relid}")
        data_type = self.tables.get((relation.schema, relation.name))
        if data_type is None:
            return []
        columns = relation.columns
        if isinstance(message, Delete):
            return [_delete(data_type, _value(columns, message.old, ID_COLUMN))]
        new_id = _value(columns, message.new, ID_COLUMN)
        raw = _value(columns, message.new, DOCUMENT_COLUMN)
        events: list[ChangeEvent] = []
        if isinstance(message, Update) and message.old is not None:
            old_id = _value(columns, message.old, ID_COLUMN)
            if old_id != new_id:
                # The key changed: the old document is gone, the new one is an upsert.
                events.append(_delete(data_type, old_id))
        if raw is Toast.UNCHANGED:
            if not events:
                return []  # same key, same document: the last event already carries it
            document = self.lookup(data_type, str(new_id))
            if document is None:
                return events  # deleted since; that delete follows in the stream
        else:
            document = self._document(data_type, new_id, raw)
            if document is None:
                return events
        op = Op.INSERT if isinstance(message, Insert) else Op.UPDATE
        events.append(ChangeEvent(op=op, type=data_type, entry_id=str(new_id), document=document))
        return events

    def _document(self, data_type: DataType, entry_id: Value, raw: Value) -> dict[str, Any] | None:
        try:
            document = json.loads(str(raw)) if raw is not None else None
        except json.JSONDecodeError:
            document = None
        if not isinstance(document, dict):
            # One bad row must not stop the feed; it is logged and counted.
            self.skipped += 1
            log.error(
                "%s %s: column %r is not a JSON object; skipped",
                data_type,
                entry_id,
                DOCUMENT_COLUMN,
            )
            return None
        return event_document(document)


def _value(columns: tuple[str, ...], values: tuple[Value, ...], column: str) -> Value:
    try:
        return values[columns.index(column)]
    except ValueError:
        raise FatalCdcError(
            f"table has no column {column!r}; expected ({ID_COLUMN} text primary key, "
            f"{DOCUMENT_COLUMN} jsonb not null)"
        ) from None


def _delete(data_type: DataType, entry_id: Value) -> ChangeEvent:
    if not isinstance(entry_id, str):
        raise FatalCdcError(
            f"a {data_type} delete carries no {ID_COLUMN!r}: is it the primary key?"
        )
    return ChangeEvent(op=Op.DELETE, type=data_type, entry_id=entry_id)


# --- The source ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str
    #: table name -> data type; tables live in `schema`.
    tables: Mapping[str, DataType]
    schema: str = "public"
    slot: str = DEFAULT_SLOT
    #: Defaults to the slot's name.
    publication: str | None = None
    snapshot: bool = False

    @property
    def publication_name(self) -> str:
        return self.publication or self.slot

    @property
    def snapshot_marker(self) -> str:
        return self.slot + SNAPSHOT_MARKER_SUFFIX


@dataclass(frozen=True)
class PgPosition:
    """Advance the slot to `lsn`, or (snapshot_done) drop the snapshot marker."""

    lsn: int | None = None
    snapshot_done: bool = False


class PostgresSource:
    """The PostgreSQL change feed; see the module docstring for the protocol."""

    name = "postgres"
    transient_errors: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

    def __init__(self, config: PostgresConfig) -> None:
        if not SLOT_NAME.match(config.slot):
            raise ValueError(f"slot name {config.slot!r} must match {SLOT_NAME.pattern}")
        self.config = config
        self._force_snapshot = config.snapshot
        self._conn: psycopg.Connection[Any] | None = None
        self._snapshot: Iterator[Batch[PgPosition]] | None = None
        self._max_events = 500
        self._confirmed = 0
        #: Set once this process created or resumed the slot; it must not vanish afterwards.
        self._had_slot = False
        self.decoder = Decoder(
            tables={(config.schema, t): dt for t, dt in config.tables.items()},
            lookup=self._lookup,
        )

    # -- lifecycle

    def open(self) -> None:
        self._conn = psycopg.connect(self.config.dsn, autocommit=True)
        wal_level = self._scalar("show wal_level")
        if wal_level != "logical":
            raise FatalCdcError(
                f"wal_level is {wal_level!r}, logical decoding needs 'logical': run "
                "scripts/ensure_postgres_logical.sh (or ALTER SYSTEM SET wal_level = logical "
                "and restart PostgreSQL)"
            )
        self._ensure_publication()
        slot = self._slot_row(self.config.slot)
        marker = self._slot_row(self.config.snapshot_marker)
        if slot is not None:
            self._check_slot(slot)
        elif self._had_slot and not self._force_snapshot:
            # We streamed from it before this reconnect: someone dropped it meanwhile.
            raise self._slot_gone()
        if self._force_snapshot or slot is None or marker is not None:
            if self._force_snapshot:
                reason = "--snapshot"
            elif slot is None:
                reason = "first start (no slot)"
            else:
                reason = "the previous snapshot was interrupted"
            log.info("postgres CDC: snapshot of %s (%s)", self._table_list(), reason)
            self._snapshot = self._snapshot_batches(self._start_snapshot(slot is not None))
        else:
            self._snapshot = None
            self._confirmed = lsn_to_int(slot["confirmed_flush_lsn"])
            self._had_slot = True
            log.info(
                "postgres CDC: resuming slot %s at %s",
                self.config.slot,
                slot["confirmed_flush_lsn"],
            )

    def close(self) -> None:
        self._snapshot = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- reading

    def read(self, max_events: int) -> Batch[PgPosition]:
        self._max_events = max_events
        if self._snapshot is not None:
            try:
                return next(self._snapshot)
            except StopIteration:
                self._snapshot = None
        return self._read_changes(max_events)

    def _read_changes(self, max_events: int) -> Batch[PgPosition]:
        conn = self._connection()
        try:
            flushed = lsn_to_int(self._scalar("select pg_current_wal_flush_lsn()::text"))
            rows = conn.execute(
                "select data from pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s)",
                (self.config.slot, int_to_lsn(flushed), max_events, self.config.publication_name),
            ).fetchall()
        except psycopg.Error as exc:
            raise self._classify(exc) from exc
        transactions = self.decoder.transactions([parse_pgoutput(bytes(r[0])) for r in rows])
        events = [event for txn in transactions for event in txn.events]
        target = transactions[-1].end_lsn if transactions else 0
        if len(rows) < max_events:
            # The peek stopped at `flushed`, not at the limit: nothing before it is left unread.
            target = max(target, flushed)
        if target <= self._confirmed:
            return Batch(events=events)
        return Batch(events=events, position=PgPosition(lsn=target))

    def save(self, position: PgPosition) -> None:
        conn = self._connection()
        if position.snapshot_done:
            conn.execute("select pg_drop_replication_slot(%s)", (self.config.snapshot_marker,))
            self._force_snapshot = False
            log.info("postgres CDC: snapshot complete; streaming changes")
            return
        if position.lsn is None:
            return
        try:
            conn.execute(
                "select pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.config.slot, int_to_lsn(position.lsn)),
            )
        except psycopg.Error as exc:
            raise self._classify(exc) from exc
        self._confirmed = position.lsn

    # -- snapshot

    def _start_snapshot(self, slot_exists: bool) -> int:
        """Mark the snapshot as running, (re)create the slot, return its consistent point."""
        conn = self._connection()
        if self._slot_row(self.config.snapshot_marker) is None:
            # Physical and not reserving WAL: a durable flag that costs nothing.
            conn.execute(
                "select pg_create_physical_replication_slot(%s, false)",
                (self.config.snapshot_marker,),
            )
        if slot_exists:
            conn.execute("select pg_drop_replication_slot(%s)", (self.config.slot,))
        row = conn.execute(
            "select lsn::text from pg_create_logical_replication_slot(%s, 'pgoutput')",
            (self.config.slot,),
        ).fetchone()
        assert row is not None
        self._had_slot = True
        log.info("postgres CDC: slot %s created at %s", self.config.slot, row[0])
        return lsn_to_int(row[0])

    def _snapshot_batches(self, consistent_lsn: int) -> Iterator[Batch[PgPosition]]:
        conn = self._connection()
        for table, data_type in self.config.tables.items():
            count = 0
            with conn.transaction(), conn.cursor(name=f"cdc_snapshot_{table}") as cursor:
                cursor.execute(
                    sql.SQL("select {}::text, {} from {}.{} order by 1").format(
                        sql.Identifier(ID_COLUMN),
                        sql.Identifier(DOCUMENT_COLUMN),
                        sql.Identifier(self.config.schema),
                        sql.Identifier(table),
                    )
                )
                while rows := cursor.fetchmany(self._max_events):
                    events = [
                        ChangeEvent(
                            op=Op.INSERT,
                            type=data_type,
                            entry_id=entry_id,
                            document=event_document(document),
                            ts=consistent_lsn,
                        )
                        for entry_id, document in rows
                        if isinstance(document, dict)
                    ]
                    count += len(events)
                    yield Batch(events=events)
            log.info("postgres CDC: snapshot of %s: %d rows", table, count)
        yield Batch(events=[], position=PgPosition(snapshot_done=True))

    def _lookup(self, data_type: DataType, entry_id: str) -> dict[str, Any] | None:
        table = next(t for t, dt in self.config.tables.items() if dt is data_type)
        row = (
            self._connection()
            .execute(
                sql.SQL("select {} from {}.{} where {} = %s").format(
                    sql.Identifier(DOCUMENT_COLUMN),
                    sql.Identifier(self.config.schema),
                    sql.Identifier(table),
                    sql.Identifier(ID_COLUMN),
                ),
                (entry_id,),
            )
            .fetchone()
        )
        return event_document(row[0]) if row is not None and isinstance(row[0], dict) else None

    # -- checks

    def _ensure_publication(self) -> None:
        conn = self._connection()
        publication = self.config.publication_name
        for table in self.config.tables:
            quoted = sql.Identifier(self.config.schema, table).as_string(conn)
            if self._scalar("select to_regclass(%s)::text", (quoted,)) is None:
                raise FatalCdcError(
                    f"table {self.config.schema}.{table} does not exist; create it as "
                    f"({ID_COLUMN} text primary key, {DOCUMENT_COLUMN} jsonb not null)"
                )
        tables_sql = sql.SQL(", ").join(
            sql.Identifier(self.config.schema, table) for table in self.config.tables
        )
        if self._scalar("select 1 from pg_publication where pubname = %s", (publication,)) is None:
            statement = sql.SQL("create publication {} for table {}").format(
                sql.Identifier(publication), tables_sql
            )
            try:
                conn.execute(statement)
            except psycopg.errors.InsufficientPrivilege:
                raise FatalCdcError(
                    f"cannot create publication {publication!r}; ask the tables' owner to run: "
                    f"{statement.as_string(conn)}"
                ) from None
            log.info("postgres CDC: created publication %s for %s", publication, self._table_list())
            return
        published = {
            (schema, name)
            for schema, name in conn.execute(
                "select schemaname, tablename from pg_publication_tables where pubname = %s",
                (publication,),
            ).fetchall()
        }
        missing = [t for t in self.config.tables if (self.config.schema, t) not in published]
        if missing:
            raise FatalCdcError(
                f"publication {publication!r} lacks {', '.join(missing)}; run: ALTER PUBLICATION "
                f"{publication} ADD TABLE {', '.join(f'{self.config.schema}.{t}' for t in missing)}"
            )

    def _check_slot(self, slot: dict[str, Any]) -> None:
        if slot["slot_type"] != "logical" or slot["plugin"] != "pgoutput":
            raise FatalCdcError(
                f"slot {self.config.slot!r} exists but is a {slot['slot_type']} slot of plugin "
                f"{slot['plugin']!r}; choose another --slot or drop it"
            )
        if slot["database"] != self._scalar("select current_database()"):
            raise FatalCdcError(
                f"slot {self.config.slot!r} belongs to database {slot['database']!r}; "
                "choose another --slot"
            )
        if slot["wal_status"] == "lost":
            raise PositionLost(
                f"replication slot {self.config.slot!r} was invalidated (the WAL it needed was "
                "removed); changes since then are gone. Run `cdc postgres --snapshot`."
            )

    def _slot_gone(self) -> PositionLost:
        return PositionLost(
            f"replication slot {self.config.slot!r} no longer exists (dropped while we ran); "
            "changes made since are unknown. Run `cdc postgres --snapshot`."
        )

    def _classify(self, exc: psycopg.Error) -> Exception:
        """Turn a lost slot into a loud `PositionLost`; anything else stays as it is."""
        message = str(exc)
        state = exc.sqlstate or ""
        if state == "42704" and "replication slot" in message:
            return self._slot_gone()
        if state == "42704" and "publication" in message:
            return FatalCdcError(
                f"{message.strip()}: the publication must exist before the slot's position. "
                "Run `cdc postgres --snapshot`."
            )
        if "invalidated" in message or state == "58P01":
            return PositionLost(
                f"replication slot {self.config.slot!r} cannot be read any more ({message.strip()}). "
                "Run `cdc postgres --snapshot`."
            )
        return exc

    # -- helpers

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("PostgresSource is not open")
        return self._conn

    def _scalar(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        row = self._connection().execute(query, params).fetchone()  # type: ignore[arg-type]
        return row[0] if row is not None else None

    def _slot_row(self, name: str) -> dict[str, Any] | None:
        cursor = self._connection().execute(
            "select slot_type, plugin, database, wal_status, confirmed_flush_lsn::text "
            "from pg_replication_slots where slot_name = %s",
            (name,),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        columns = [c.name for c in cursor.description or []]
        return dict(zip(columns, row, strict=True))

    def _table_list(self) -> str:
        return ", ".join(f"{self.config.schema}.{t}" for t in self.config.tables)
