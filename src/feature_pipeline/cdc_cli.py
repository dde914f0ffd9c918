"""The `cdc` command: runs the MongoDB or PostgreSQL change-data-capture service until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from feature_pipeline.connectors.cdc.base import (
    ChangeSource,
    FatalCdcError,
    parse_sources,
    run_cdc,
    stop_on_signals,
)
from feature_pipeline.connectors.cdc.mongo import MongoConfig, MongoSource
from feature_pipeline.connectors.cdc.postgres import DEFAULT_SLOT, PostgresConfig, PostgresSource
from feature_pipeline.domain.types import DataType
from feature_pipeline.redaction import redact
from feature_pipeline.settings import SettingsError, get_settings

log = logging.getLogger("feature_pipeline.cdc")

DEFAULT_SOURCES = ",".join(t.value for t in DataType)
EXIT_FATAL = 2


def sources_argument(spec: str) -> dict[str, DataType]:
    """argparse type of a `type[=name],...` list of tables or collections."""
    try:
        return parse_sources(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cdc_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `cdc mongo ...` and `cdc postgres ...` to an argparse subparsers object."""
    cdc = subparsers.add_parser(
        "cdc",
        help="publish every warehouse change to the broker (change data capture)",
        description="Publish every warehouse change to RabbitMQ (RABBITMQ_* settings), "
        "snapshot first on the first start, and resume after restarts without gaps.",
    )
    sources = cdc.add_subparsers(dest="cdc_source", metavar="{mongo,postgres}", required=True)
    shapes = "type[=name],...: data types to watch, optionally in a differently named"

    mongo = sources.add_parser("mongo", help="watch MongoDB collections (replica set needed)")
    mongo.add_argument("--uri", required=True, help="MongoDB URI, e.g. mongodb://host:27017/")
    mongo.add_argument("--db", required=True, help="the warehouse database")
    mongo.add_argument(
        "--collections",
        type=sources_argument,
        default=DEFAULT_SOURCES,
        help=f"{shapes} collection (default: {DEFAULT_SOURCES})",
    )
    mongo.add_argument(
        "--snapshot", action="store_true", help="publish every document again, then stream"
    )
    mongo.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="where the resume position is kept (default: ./data/cdc/mongo-<db>.json)",
    )
    mongo.set_defaults(func=run_cdc_command)

    postgres = sources.add_parser("postgres", help="stream PostgreSQL tables (wal_level=logical)")
    postgres.add_argument("--dsn", required=True, help="e.g. postgresql://user@host:5432/db")
    postgres.add_argument(
        "--tables",
        type=sources_argument,
        default=DEFAULT_SOURCES,
        help=f"{shapes} table (default: {DEFAULT_SOURCES}); "
        "each is (id text primary key, document jsonb not null)",
    )
    postgres.add_argument("--schema", default="public", help="schema of the tables")
    postgres.add_argument(
        "--slot", default=DEFAULT_SLOT, help=f"replication slot (default: {DEFAULT_SLOT})"
    )
    postgres.add_argument(
        "--publication", default=None, help="publication of the tables (default: the slot name)"
    )
    postgres.add_argument(
        "--snapshot", action="store_true", help="recreate the slot, publish every row, then stream"
    )
    postgres.set_defaults(func=run_cdc_command)
    return cdc


def build_source(args: argparse.Namespace) -> ChangeSource[Any]:
    if args.cdc_source == "mongo":
        state_file = args.state_file or Path("data") / "cdc" / f"mongo-{args.db}.json"
        return MongoSource.from_config(
            MongoConfig(
                uri=args.uri,
                db=args.db,
                collections=args.collections,
                state_file=state_file,
                snapshot=args.snapshot,
            )
        )
    return PostgresSource(
        PostgresConfig(
            dsn=args.dsn,
            tables=args.tables,
            schema=args.schema,
            slot=args.slot,
            publication=args.publication,
            snapshot=args.snapshot,
        )
    )


def run_cdc_command(args: argparse.Namespace) -> int:
    """Run the CDC service of `args`; 0 after SIGTERM/SIGINT, 2 when it cannot go on safely."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        # pika logs every connection step at INFO; our own lines say what matters.
        logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        settings = get_settings()
        source = build_source(args)
    except (SettingsError, ValueError) as exc:
        print(f"cdc: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FATAL
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        run_cdc(source, settings, stop)
    except FatalCdcError as exc:
        log.error("%s CDC stopped: %s", source.name, redact(str(exc)))
        print(f"cdc {source.name}: {redact(str(exc))}", file=sys.stderr)
        return EXIT_FATAL
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m feature_pipeline.cdc_cli cdc postgres ...`."""
    parser = argparse.ArgumentParser(prog="feature-pipeline")
    add_cdc_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
