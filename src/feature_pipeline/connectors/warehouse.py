"""Reads the warehouse's current documents for the drift audit: page by page, and by id.

PostgreSQL tables are `(id text primary key, document jsonb not null)`, one per data type;
MongoDB collections hold the documents with their `_id`; both as the CDC service reads them, so
the audit sees each document exactly as its events carry it. Memory is bounded by one page
whatever the warehouse's size: pages come from a server-side cursor, lookups by id are one query
per page of ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql

from feature_pipeline.connectors.cdc.mongo import Warehouse, entry_id_of, to_jsonable
from feature_pipeline.connectors.cdc.postgres import DOCUMENT_COLUMN, ID_COLUMN
from feature_pipeline.domain.events import event_document
from feature_pipeline.domain.types import DataType


class WarehouseReader(Protocol):
    """The warehouse as the audit sees it: every document of a type, and which ids exist."""

    def data_types(self) -> list[DataType]: ...

    def pages(
        self, data_type: DataType, page_size: int
    ) -> Iterator[list[tuple[str, dict[str, Any]]]]: ...

    def existing(self, data_type: DataType, entry_ids: Sequence[str]) -> set[str]: ...

    def close(self) -> None: ...


class PostgresWarehouse:
    """The warehouse's PostgreSQL tables (`tables`: table name -> data type, in `schema`)."""

    def __init__(self, dsn: str, tables: Mapping[str, DataType], schema: str = "public") -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)
        self._tables = {data_type: table for table, data_type in tables.items()}
        self._schema = schema

    def data_types(self) -> list[DataType]:
        return list(self._tables)

    def _table(self, data_type: DataType) -> sql.Composed:
        return sql.SQL("{}.{}").format(
            sql.Identifier(self._schema), sql.Identifier(self._tables[data_type])
        )

    def pages(
        self, data_type: DataType, page_size: int
    ) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        """(entry id, document without its id) of every row, in id order, a page at a time.
        A row whose document is not a JSON object comes as it is: the audit reports it."""
        query = sql.SQL("select {}::text, {} from {} order by 1").format(
            sql.Identifier(ID_COLUMN), sql.Identifier(DOCUMENT_COLUMN), self._table(data_type)
        )
        with (
            self._conn.transaction(),
            self._conn.cursor(name=f"audit_{data_type.value}") as cursor,
        ):
            cursor.execute(query)
            while rows := cursor.fetchmany(page_size):
                yield [
                    (entry_id, event_document(doc) if isinstance(doc, dict) else doc)
                    for entry_id, doc in rows
                ]

    def existing(self, data_type: DataType, entry_ids: Sequence[str]) -> set[str]:
        if not entry_ids:
            return set()
        query = sql.SQL("select {}::text from {} where {}::text = any(%s)").format(
            sql.Identifier(ID_COLUMN), self._table(data_type), sql.Identifier(ID_COLUMN)
        )
        return {row[0] for row in self._conn.execute(query, (list(entry_ids),)).fetchall()}

    def close(self) -> None:
        self._conn.close()


class MongoWarehouse:
    """The warehouse's MongoDB collections (`collections`: collection name -> data type),
    through the CDC service's connection (`connectors.cdc.mongo.Warehouse`)."""

    def __init__(self, warehouse: Warehouse, collections: Mapping[str, DataType]) -> None:
        self._warehouse = warehouse
        self._collections = {data_type: name for name, data_type in collections.items()}

    def data_types(self) -> list[DataType]:
        return list(self._collections)

    def pages(
        self, data_type: DataType, page_size: int
    ) -> Iterator[list[tuple[str, dict[str, Any]]]]:
        page: list[tuple[str, dict[str, Any]]] = []
        for document in self._warehouse.documents(self._collections[data_type]):
            body = to_jsonable(event_document(document))
            page.append((entry_id_of(document["_id"]), body))
            if len(page) == page_size:
                yield page
                page = []
        if page:
            yield page

    def existing(self, data_type: DataType, entry_ids: Sequence[str]) -> set[str]:
        if not entry_ids:
            return set()
        return self._warehouse.existing_ids(self._collections[data_type], entry_ids)

    def close(self) -> None:
        self._warehouse.close()
