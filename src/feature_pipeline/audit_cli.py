"""The `audit` command: compare the warehouse with the store; with `--repair`, fix through the
pipeline's own queues."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from feature_pipeline.audit import Auditor, Drift, Finding
from feature_pipeline.cdc_cli import DEFAULT_SOURCES, sources_argument
from feature_pipeline.connectors.cdc.mongo import PyMongoWarehouse
from feature_pipeline.connectors.qdrant.store import FeatureStore, sync_states_of
from feature_pipeline.connectors.warehouse import MongoWarehouse, PostgresWarehouse, WarehouseReader
from feature_pipeline.domain.changes import document_point_id
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings, get_settings

#: Exit status when the audit found differences (0: none; 1 and 2: errors).
EXIT_DRIFT = 3


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    audit = subparsers.add_parser(
        "audit",
        help="compare the warehouse with the store (and --repair the differences)",
        description="Find every difference between the warehouse's documents and the store: "
        "missing, extra and outdated documents, chunks the sync state lists but the store "
        f"lacks, chunks no state lists. Exit status {EXIT_DRIFT} when there is any.",
    )
    warehouse = audit.add_mutually_exclusive_group(required=True)
    warehouse.add_argument("--postgres", metavar="DSN", help="a PostgreSQL warehouse")
    warehouse.add_argument("--mongo", metavar="URI", help="a MongoDB warehouse (with --db)")
    audit.add_argument("--db", help="the MongoDB database")
    audit.add_argument("--schema", default="public", help="schema of the PostgreSQL tables")
    audit.add_argument(
        "--tables",
        type=sources_argument,
        default=DEFAULT_SOURCES,
        help=f"type[=table or collection],... (default: {DEFAULT_SOURCES})",
    )
    audit.add_argument("--json", action="store_true", help="each difference as a JSON line")
    audit.add_argument(
        "--repair",
        action="store_true",
        help="publish the events that fix each difference (the running pipeline applies them)",
    )
    audit.set_defaults(func=_cmd_audit)
    return audit


def _cmd_audit(args: argparse.Namespace) -> int:
    from feature_pipeline.cli import reader_of_store_or_pipeline
    from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
    from feature_pipeline.processing.pipeline import DocumentProcessor

    settings = get_settings()
    reader, collections = reader_of_store_or_pipeline(settings)
    auditor = Auditor(reader, DocumentProcessor(settings), settings.model_for, collections)
    found: Counter[tuple[DataType, Drift]] = Counter()
    published = orphans_deleted = 0
    warehouse = _warehouse(args)
    publisher = EventPublisher(settings) if args.repair else None
    try:
        for finding in auditor.findings(warehouse):
            found[(finding.type, finding.drift)] += 1
            if args.json:
                print(json.dumps(finding.to_json(), ensure_ascii=False), flush=True)
            if publisher is None:
                continue
            event = finding.repair_event()
            if event is not None:
                publisher.publish([event])
                published += 1
            elif finding.drift is Drift.ORPHAN_CHUNK and isinstance(reader, FeatureStore):
                orphans_deleted += _delete_orphan(reader, finding)
    finally:
        warehouse.close()
        if publisher is not None:
            publisher.close()
    summary = _summary(found, warehouse.data_types())
    repair = None
    if args.repair:
        orphans = sum(n for (_, drift), n in found.items() if drift is Drift.ORPHAN_CHUNK)
        repair = {
            "events_published": published,
            "queue": settings.rabbitmq_queue,
            "orphan_chunks_deleted": orphans_deleted,
            "orphan_chunks_left": orphans - orphans_deleted,
        }
    if args.json:
        print(json.dumps({"summary": summary, "repair": repair}))
    else:
        _print_summary(settings, args, summary, repair)
    return EXIT_DRIFT if any(found.values()) else 0


def _warehouse(args: argparse.Namespace) -> WarehouseReader:
    if args.postgres is not None:
        return PostgresWarehouse(args.postgres, args.tables, args.schema)
    if not args.db:
        raise ValueError("--mongo needs --db, the warehouse's database")
    return MongoWarehouse(PyMongoWarehouse(args.mongo, args.db, list(args.tables)), args.tables)


def _delete_orphan(store: FeatureStore, finding: Finding) -> int:
    """Delete an orphan chunk unless its document's state lists it by now (it would no longer be
    an orphan: the pipeline lists a chunk in the state before writing it)."""
    assert finding.point_id is not None
    owner = document_point_id(finding.type, finding.entry_id)
    state = sync_states_of(store, [owner]).get(owner)
    if state is not None and finding.point_id in state.chunk_ids:
        return 0
    store.delete_ids(finding.type.vector_collection, [finding.point_id])
    return 1


def _summary(found: Counter[tuple[DataType, Drift]], data_types: list[DataType]) -> dict:
    return {
        data_type.value: {
            drift.value: found[(data_type, drift)] for drift in Drift if found[(data_type, drift)]
        }
        for data_type in data_types
    }


def _print_summary(
    settings: Settings, args: argparse.Namespace, summary: dict, repair: dict | None
) -> None:
    store = settings.qdrant_url or str(settings.qdrant_path)
    source = (
        f"the PostgreSQL warehouse (schema {args.schema})"
        if args.postgres is not None
        else f"the MongoDB warehouse (database {args.db})"
    )
    print(f"audit of {source} against the store at {store}")
    width = max(len(name) for name in summary)
    total = 0
    for data_type, counts in summary.items():
        total += sum(counts.values())
        described = ", ".join(f"{drift} {n}" for drift, n in counts.items()) or "in sync"
        print(f"  {data_type:<{width}}  {described}")
    print(f"{total} differences" if total else "the store equals the warehouse")
    if repair is not None:
        line = (
            f"repair: {repair['events_published']} events published to {repair['queue']} "
            f"(the pipeline applies them); {repair['orphan_chunks_deleted']} orphan chunks deleted"
        )
        if repair["orphan_chunks_left"]:
            line += (
                f"; {repair['orphan_chunks_left']} left: the running pipeline holds the embedded "
                "store, stop it and run `audit --repair` again"
            )
        print(line)
    sys.stdout.flush()
