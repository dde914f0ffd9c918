"""A PostgreSQL warehouse for CDC tests: one schema of its own per test, its slot, the CLI.

Shared by tests/test_cdc_postgres.py (CDC -> broker) and tests/test_cdc_to_qdrant.py
(CDC -> broker -> pipeline -> Qdrant).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from feature_pipeline.connectors.cdc.postgres import PostgresConfig, lsn_to_int
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings

from .conftest import settings_env

ROOT = Path(__file__).resolve().parent.parent
DSN = os.environ.get("CDC_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = {t.value: t for t in DataType}


def ensure_logical_postgres() -> None:
    """wal_level=logical (the script is idempotent and returns at once when already set)."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        row = conn.execute("show wal_level").fetchone()
    if row is None or row[0] != "logical":
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure_postgres_logical.sh")], check=True)


@dataclass
class Warehouse:
    """One test's schema with the three tables, its slot and publication."""

    schema: str
    slot: str
    conn: psycopg.Connection[Any] = field(repr=False)

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        self.conn.execute(query.replace("{s}", self.schema), params)  # type: ignore[arg-type]

    def upsert(self, table: str, entry_id: str, document: dict[str, Any]) -> None:
        self.execute(
            f"insert into {{s}}.{table} values (%s, %s) "
            "on conflict (id) do update set document = excluded.document",
            (entry_id, json.dumps(document)),
        )

    def delete(self, table: str, entry_id: str) -> None:
        self.execute(f"delete from {{s}}.{table} where id = %s", (entry_id,))

    def rows(self) -> dict[tuple[DataType, str], dict[str, Any]]:
        state = {}
        for table, data_type in TABLES.items():
            for entry_id, document in self.conn.execute(
                f"select id, document from {self.schema}.{table}"  # type: ignore[arg-type]
            ).fetchall():
                state[(data_type, entry_id)] = document
        return state

    def slot_row(self, name: str | None = None) -> tuple[Any, ...] | None:
        return self.conn.execute(
            "select confirmed_flush_lsn::text, active_pid from pg_replication_slots "
            "where slot_name = %s",
            (name or self.slot,),
        ).fetchone()

    def streaming(self) -> bool:
        """The service's slot exists and its snapshot is done (the marker slot is gone)."""
        return self.slot_row() is not None and self.slot_row(f"{self.slot}_snapshot") is None

    def wal_lsn(self) -> int:
        """The current WAL insert position: every commit made so far ends at or before it."""
        row = self.conn.execute("select pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return lsn_to_int(row[0])

    def confirmed_lsn(self) -> int:
        """Where the service's slot stands: everything before it was confirmed by the broker."""
        row = self.slot_row()
        return lsn_to_int(row[0]) if row is not None and row[0] is not None else 0

    def config(self, **overrides: Any) -> PostgresConfig:
        return PostgresConfig(
            dsn=DSN, tables=TABLES, schema=self.schema, slot=self.slot, **overrides
        )

    def cli_args(self) -> list[str]:
        return ["cdc", "postgres", "--dsn", DSN, "--schema", self.schema, "--slot", self.slot]


def drop_slot(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop a slot even while a session briefly holds it (leaked slots keep WAL forever)."""
    for _ in range(50):
        row = conn.execute(
            "select active_pid from pg_replication_slots where slot_name = %s", (name,)
        ).fetchone()
        if row is None:
            return
        try:
            if row[0] is not None:
                conn.execute("select pg_terminate_backend(%s)", (row[0],))
            conn.execute("select pg_drop_replication_slot(%s)", (name,))
            return
        except psycopg.errors.ObjectInUse:
            time.sleep(0.1)
    raise AssertionError(f"could not drop slot {name}")


@contextmanager
def temporary_warehouse() -> Iterator[Warehouse]:
    """A fresh schema (its name is also the slot's and the publication's); all dropped after."""
    name = f"cdc_{uuid.uuid4().hex[:10]}"
    conn = psycopg.connect(DSN, autocommit=True)
    conn.execute(f"create schema {name}")  # type: ignore[arg-type]
    for table in TABLES:
        conn.execute(
            f"create table {name}.{table} (id text primary key, document jsonb not null)"  # type: ignore[arg-type]
        )
    try:
        yield Warehouse(schema=name, slot=name, conn=conn)
    finally:
        drop_slot(conn, name)
        drop_slot(conn, f"{name}_snapshot")
        conn.execute(f"drop publication if exists {name}")  # type: ignore[arg-type]
        conn.execute(f"drop schema {name} cascade")  # type: ignore[arg-type]
        conn.close()


def start_cli(warehouse: Warehouse, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`feature-pipeline cdc postgres ...` for this warehouse, as a subprocess logging to `log`."""
    return subprocess.Popen(
        # The `feature-pipeline` console script's own entry point, with this interpreter.
        [sys.executable, "-m", "feature_pipeline.cli", *warehouse.cli_args()],
        env=settings_env(settings),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
