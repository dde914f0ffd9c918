"""The `feature-pipeline` command: run, backfill, publish, search, counts, points (and cdc)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from feature_pipeline.connectors.retry import describe_error, stop_requested
from feature_pipeline.logs import configure_logging
from feature_pipeline.redaction import redact
from feature_pipeline.settings import (
    SETTING_GROUPS,
    Settings,
    SettingsError,
    environment_help,
    get_settings,
)

if TYPE_CHECKING:  # torch and the models load only for the commands that need them
    from bytewax.dataflow import Dataflow

    from feature_pipeline.processing.embedding import EmbedderFactory

log = logging.getLogger("feature_pipeline")


#: Exit statuses: a setting is invalid, or what it points at is unusable (start-up failures).
EXIT_CONFIG = 2
#: Other errors a user can fix (a bad input file, an empty store).
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        return _fail(exc, EXIT_CONFIG)
    # Services log their progress; one-shot queries print only their answer (and warnings).
    quiet = args.command in ("search", "counts", "points")
    configure_logging(settings.log_level or ("WARNING" if quiet else "INFO"), settings.log_format)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        status = int(args.func(args) or 0)
    except SettingsError as exc:
        status = _fail(exc, EXIT_CONFIG)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        status = _fail(exc, EXIT_ERROR)
    finally:
        _close_stores()
    if args.command in MODEL_COMMANDS:
        _exit_now(status)
    return status


#: Commands that load the embedding models (torch) and so exit through `_exit_now`.
MODEL_COMMANDS = ("run", "backfill")


def _exit_now(status: int) -> NoReturn:
    """Leave without the interpreter's teardown: with torch loaded it takes 3-8 s on a busy
    2-core machine, which would count against a supervisor's stop timeout. Everything is
    written, acknowledged and closed by now; only the output buffers are left to flush."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _fail(exc: BaseException, status: int) -> int:
    """One line on stderr, secrets masked; the traceback only with LOG_LEVEL=DEBUG."""
    log.debug("failed", exc_info=exc)
    print(f"error: {redact(str(exc))}", file=sys.stderr)
    return status


def _close_stores() -> None:
    """Release the embedded store before exit (its lock, and no noise from late finalizers)."""
    from feature_pipeline.connectors.qdrant.store import close_stores

    close_stores()


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; `cdc` is there when its extras are installed."""
    from feature_pipeline.connectors.files import DEAD_LETTER_FOLDER

    parser = argparse.ArgumentParser(
        prog="feature-pipeline",
        description="Streaming feature pipeline: warehouse change events -> Qdrant features.",
        formatter_class=HelpFormatter,
        epilog="Settings come from the environment (or .env): each command's --help lists the "
        "variables it reads, with their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume the queue and keep Qdrant in sync (24/7)")
    run.add_argument("-w", "--workers", type=int, default=1, help="worker threads per process")
    run.add_argument("-i", "--process-id", type=int, default=None, help="this process's index")
    run.add_argument(
        "-a", "--addresses", default=None, help="host:port of every process, ';'-separated"
    )
    run.add_argument("--no-query-server", action="store_true", help="do not serve search/counts")
    run.set_defaults(func=_cmd_run)

    backfill = sub.add_parser("backfill", help="index JSON Lines files of documents or events")
    backfill.add_argument("files", nargs="+", type=Path, help="JSON Lines files")
    backfill.add_argument("--type", choices=_type_names(), help="data type of document lines")
    backfill.add_argument(
        "--dead-letters",
        type=Path,
        default=DEAD_LETTER_FOLDER,
        help="where rejected lines go: this folder (or another existing one) gets a new file "
        "per run, backfill-<UTC yyyymmddThhmmssZ>.jsonl, created only if a line is rejected; "
        "any other path is a file, appended to",
    )
    backfill.add_argument("-w", "--workers", type=int, default=1, help="worker threads")
    backfill.add_argument("--no-progress", action="store_true", help="no progress bar")
    backfill.set_defaults(func=_cmd_backfill)

    publish = sub.add_parser("publish", help="publish warehouse documents to the queue as events")
    publish.add_argument("file", type=Path, help="a JSON Lines file of warehouse documents")
    publish.add_argument("--type", choices=_type_names(), help="default: from the file name")
    publish.add_argument(
        "--op",
        choices=["insert", "update", "replace", "delete"],
        default="insert",
        help="the change each document makes",
    )
    publish.add_argument(
        "--course-shape",
        action="store_true",
        help="publish the course's flat message straight to RABBITMQ_QUEUE, as its CDC does",
    )
    publish.set_defaults(func=_cmd_publish)

    search = sub.add_parser("search", help="semantic search over the embedded chunks")
    search.add_argument("text", help="what to search for")
    search.add_argument("--type", choices=_type_names(), default="posts", help="data type")
    search.add_argument("-k", type=int, default=5, help="number of hits")
    search.add_argument("--json", action="store_true", help="print hits as JSON")
    search.set_defaults(func=_cmd_search)

    counts = sub.add_parser("counts", help="points per collection")
    counts.set_defaults(func=_cmd_counts)

    points = sub.add_parser("points", help="print a collection's points as JSON lines")
    points.add_argument("collection", help="e.g. cleaned_posts, vector_articles")
    points.add_argument("--entry-id", help="only this document's points")
    points.add_argument("--type", choices=_type_names(), help="only points of this data type")
    points.add_argument("--with-vectors", action="store_true", help="include each vector")
    points.add_argument("--limit", type=int, default=None, help="at most N points")
    points.set_defaults(func=_cmd_points)

    export = sub.add_parser(
        "export", help="write one type's cleaned documents to a file (a fine-tuning data set)"
    )
    export.add_argument("--type", choices=_type_names(), required=True, help="data type")
    export.add_argument("--since", type=int, help="only documents whose version (ts) is >= this")
    export.add_argument(
        "--author", help="only this author's documents (author_id; owner_id for repositories)"
    )
    export.add_argument(
        "--format", choices=["jsonl", "parquet"], default="jsonl", help="file format"
    )
    export.add_argument("--page-size", type=int, default=500, help="documents read at a time")
    export.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    export.set_defaults(func=_cmd_export)

    from feature_pipeline.dlq_cli import add_dlq_parser

    add_dlq_parser(sub)

    try:
        from feature_pipeline.audit_cli import add_audit_parser
    except ImportError:  # the audit reads the warehouse with the CDC extras
        pass
    else:
        add_audit_parser(sub)

    try:
        from feature_pipeline.cdc_cli import add_cdc_parser
    except ImportError:  # the CDC extras are optional
        pass
    else:
        add_cdc_parser(sub)
    for name, command in sub.choices.items():
        # A command missing from COMMAND_SETTINGS lists every setting (tests/test_cli_help.py
        # asks for an entry).
        groups = COMMAND_SETTINGS.get(name, tuple(SETTING_GROUPS))
        _describe_settings(command, environment_help(groups))
    return parser


#: The settings groups (settings.SETTING_GROUPS) each command reads, for its `--help`.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "run": ("broker", "store", "models", "dataflow", "service", "logging"),
    "backfill": ("store", "models", "dataflow", "logging"),
    "publish": ("broker", "logging"),
    "search": ("store", "models", "service", "logging"),
    "counts": ("store", "service", "logging"),
    "points": ("store", "service", "logging"),
    "export": ("store", "service", "logging"),
    "audit": ("broker", "store", "models", "service", "logging"),
    "dlq": ("broker", "logging"),
    "cdc": ("broker", "logging"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Options with their defaults (where there is one to say); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _describe_settings(parser: argparse.ArgumentParser, epilog: str) -> None:
    """Defaults in the help of a command and of its own subcommands (dlq list, cdc postgres...),
    and the environment variables it reads as the epilog."""
    parser.formatter_class = HelpFormatter
    parser.epilog = f"{parser.epilog}\n\n{epilog}" if parser.epilog else epilog
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _describe_settings(child, epilog)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("feature-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _type_names() -> list[str]:
    from feature_pipeline.domain.types import DataType

    return [t.value for t in DataType]


# -- run ------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    addresses = args.addresses.split(";") if args.addresses else None
    return serve(
        get_settings(),
        workers=args.workers,
        process_id=args.process_id,
        addresses=addresses,
        query_server=not args.no_query_server,
    )


def serve(
    settings: Settings,
    *,
    workers: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    query_server: bool = True,
    embedders: EmbedderFactory | None = None,
) -> int:
    """Consume the queues until SIGINT/SIGTERM: what `run` does; the exit status. `embedders` replaces the
    configured models (an `EmbedderFactory`; the benchmark's ceiling pass gives a stand-in)."""
    from bytewax.run import cli_main

    flow, signals = prepare_service(
        settings,
        workers=workers,
        processes=len(addresses) if addresses else 1,
        query_server=query_server,
        embedders=embedders,
    )
    try:
        cli_main(
            flow,
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(milliseconds=settings.epoch_interval_ms),
        )
    except Exception as exc:
        # A stop during a store or dead-letter write that was being retried ends that write
        # (RetryInterrupted): leave without acknowledging its epoch, which is redelivered.
        if signals.received is None:
            raise
        log.warning(
            "stopped before the epoch in flight was written (%s); its messages will be redelivered",
            redact(describe_error(exc)).splitlines()[0][:300],
        )
        return 128 + signals.received
    log.info("stopped")
    return 0


def prepare_service(
    settings: Settings,
    *,
    workers: int = 1,
    processes: int = 1,
    query_server: bool = True,
    embedders: EmbedderFactory | None = None,
) -> tuple[Dataflow, _SignalState]:
    """Everything `run` does before consuming: start-up checks, signal handlers, the status page
    and query service, the models; the dataflow to run (`run`, and `feature_pipeline.flow`)."""
    from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink, build_sync
    from feature_pipeline.connectors.qdrant.store import FeatureStore
    from feature_pipeline.connectors.rabbitmq.continuations import ContinuationPublisher
    from feature_pipeline.connectors.rabbitmq.dead_letters import DeadLetterQueueSink
    from feature_pipeline.connectors.rabbitmq.source import RabbitMQSource
    from feature_pipeline.dataflow import build_dataflow
    from feature_pipeline.metrics import metrics
    from feature_pipeline.processing.embedding import embedder_for
    from feature_pipeline.query_server import start_query_server
    from feature_pipeline.startup import check_broker, check_service
    from feature_pipeline.status import StatusReader, readiness, start_progress_log

    embedders = embedders or embedder_for
    if processes > 1 and not settings.qdrant_url:
        raise ValueError(
            "several processes cannot share the embedded store (QDRANT_PATH): "
            "run a Qdrant server and set QDRANT_URL, or use --workers in one process"
        )
    stop = stop_requested  # the retry helper's waits wake on it too
    signals = _stop_on_signals(stop)
    query_server = query_server and bool(settings.query_port)
    check_service(settings, query_server=query_server)
    check_broker(settings)
    readiness.waiting("model", "loading the embedding models")
    readiness.waiting("broker", "not consuming yet")
    # The status page and /health answer while the models load.
    status = StatusReader(settings, FeatureStore.open(settings), metrics)
    if query_server:
        start_query_server(settings, FeatureStore.open(settings), status)
    if settings.progress_log_s:
        start_progress_log(status, metrics, settings.progress_log_s)
    # Open the store and load the models before consuming, so a bad setting fails at start.
    build_sync(settings, embedders=embedders)
    # The models' and libraries' objects live as long as the process: moved out of the
    # collector's generations, full collections (triggered by the many small objects each
    # batch makes) no longer walk them all.
    gc.freeze()
    readiness.ready("model")
    flow = build_dataflow(
        settings,
        RabbitMQSource(settings, stop),
        FeatureStoreSink(
            settings,
            partitions=workers * processes,
            embedders=embedders,
            continuations=lambda: ContinuationPublisher(settings),
        ),
        DeadLetterQueueSink(settings),
    )
    log.info("consuming %s (workers=%d, processes=%d)", settings.rabbitmq_queue, workers, processes)
    signals.consuming = True
    return flow, signals


class _SignalState:
    """What the signal handler knows: whether consuming began, and the signal received."""

    def __init__(self) -> None:
        self.consuming = False
        self.received: int | None = None


def _stop_on_signals(stop: threading.Event) -> _SignalState:
    """SIGINT/SIGTERM: before consuming, exit at once (nothing read yet); while consuming, finish
    the epoch in flight and ack it (exit 0); a second signal leaves at once (unacked messages
    are redelivered). Retry waits wake on `stop`, so a broker outage does not delay any of it."""
    state = _SignalState()

    def handle(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        state.received = signum
        if stop.is_set():  # a second Ctrl-C: leave now; unacked messages are redelivered
            os._exit(128 + signum)
        stop.set()
        if not state.consuming:
            # Nothing read yet, so nothing to finish. Exit here rather than raise: an exception
            # from a signal handler can land in a finalizer (`__del__`) and be swallowed.
            log.info("received %s during start-up: exiting", name)
            _exit_now(128 + signum)
        log.info("received %s: finishing the batch in flight", name)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return state


# -- backfill -------------------------------------------------------------------------------
def _cmd_backfill(args: argparse.Namespace) -> int:
    from bytewax.run import cli_main
    from tqdm import tqdm

    from feature_pipeline.connectors.files import (
        DeadLetterFileSink,
        JsonLinesSource,
        count_lines,
        dead_letter_path,
    )
    from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink, build_sync
    from feature_pipeline.connectors.qdrant.store import FeatureStore
    from feature_pipeline.dataflow import build_dataflow
    from feature_pipeline.domain.types import DataType
    from feature_pipeline.metrics import metrics
    from feature_pipeline.startup import check_service

    settings = get_settings()
    data_type = DataType(args.type) if args.type else None
    source = JsonLinesSource(args.files, data_type, batch_size=settings.batch_size)
    check_service(settings, query_server=False)
    build_sync(settings)
    gc.freeze()  # as in `serve`: the models' objects stay out of every collection
    total = count_lines(args.files)
    bar = tqdm(total=total, unit="doc", desc="indexing", disable=args.no_progress)
    bar_lock = threading.Lock()

    def advance(n: int) -> None:
        with bar_lock:
            bar.update(n)

    rejected = DeadLetterFileSink(dead_letter_path(args.dead_letters), on_written=advance)
    flow = build_dataflow(
        settings,
        source,
        FeatureStoreSink(settings, partitions=args.workers, on_written=advance),
        rejected,
        name="backfill",
    )
    started = time.perf_counter()
    cli_main(flow, workers_per_process=args.workers, epoch_interval=timedelta(seconds=1))
    bar.close()
    elapsed = time.perf_counter() - started
    done = {name: int(value) for name, value in metrics.snapshot().items()}
    print(
        f"indexed {total} lines in {elapsed:.1f}s: {done['events_applied']} applied, "
        f"{done['events_stale']} already up to date, {done['chunks_embedded']} chunks embedded, "
        f"{done['chunks_reused']} reused, {len(rejected.rejected)} rejected"
    )
    _print_counts(FeatureStore.open(settings).counts())
    if not rejected.rejected:
        return 0
    # Exit 1 so that a script or CI notices; the lines and their reasons are in the file.
    shown = ", ".join(rejected.rejected[:REJECTED_SHOWN])
    more = len(rejected.rejected) - REJECTED_SHOWN
    print(
        f"error: {len(rejected.rejected)} lines rejected ({shown}"
        + (f" and {more} more" if more > 0 else "")
        + f"); their reasons are in {rejected.path} "
        f"(`feature-pipeline dlq list --file {rejected.path}`)",
        file=sys.stderr,
    )
    return EXIT_ERROR


#: Rejected lines (file:line) named in backfill's closing message; the rest are in the file.
REJECTED_SHOWN = 10


# -- publish --------------------------------------------------------------------------------
def _cmd_publish(args: argparse.Namespace) -> int:
    from pika.exceptions import AMQPConnectionError

    from feature_pipeline.connectors.files import infer_type
    from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
    from feature_pipeline.domain.events import ChangeEvent, Op
    from feature_pipeline.domain.types import DataType

    settings = get_settings()
    data_type = DataType(args.type) if args.type else infer_type(args.file)
    if data_type is None:
        raise ValueError(f"cannot tell the data type of {args.file}: pass --type")
    op = Op(args.op)
    if not args.file.is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    try:
        publisher = EventPublisher(settings)
    except AMQPConnectionError as exc:  # its message names RABBITMQ_URL, password masked
        raise SettingsError(str(exc)) from None
    count = 0
    with publisher, args.file.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            document = json.loads(line)
            if "_id" not in document:
                raise ValueError(f"{args.file}:{line_no}: a warehouse document needs an '_id'")
            entry_id = str(document.pop("_id"))
            if args.course_shape:
                body = {**document, "type": data_type.value, "entry_id": entry_id}
                publisher.publish_raw(json.dumps(body).encode())
            else:
                event = ChangeEvent(
                    op=op,
                    type=data_type,
                    entry_id=entry_id,
                    document=None if op is Op.DELETE else document,
                    ts=time.time_ns(),
                )
                publisher.publish([event])
            count += 1
    target = settings.rabbitmq_queue if args.course_shape else f"{settings.rabbitmq_queue} (routed)"
    print(f"published {count} {data_type.value} events to {target}")
    return 0


# -- search and counts ----------------------------------------------------------------------
def _cmd_search(args: argparse.Namespace) -> int:
    from feature_pipeline import queries
    from feature_pipeline.domain.types import DataType
    from feature_pipeline.startup import check_models

    settings = get_settings()
    data_type = DataType(args.type)
    check_models(settings, (data_type,))

    def local(store: Any) -> Any:
        # Before loading the model (15-60 s): is there anything to search?
        if data_type.vector_collection not in store.counts():
            raise EmptyStore(_empty_store_hint(settings, data_type.vector_collection))
        return queries.search(settings, store, args.text, data_type, args.k)

    hits = _with_store_or_pipeline(
        settings,
        local=local,
        path="/search",
        params={"q": args.text, "type": data_type.value, "k": args.k},
    )
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"no hits in {data_type.vector_collection}")
    for rank, hit in enumerate(hits, 1):
        content = " ".join(str(hit.get("content", "")).split())
        where = hit.get("link") or hit.get("platform") or ""
        print(
            f"{rank}. {hit['score']:.3f}  {hit.get('entry_id')} #{hit.get('chunk_index')}  {where}"
        )
        print(f"   {content[:240]}{'...' if len(content) > 240 else ''}")
    return 0


def _cmd_counts(args: argparse.Namespace) -> int:
    from feature_pipeline import queries

    settings = get_settings()
    try:
        counts = _with_store_or_pipeline(settings, local=queries.counts, path="/counts", params={})
    except EmptyStore:
        counts = {}
    _print_counts(counts)
    if not counts:
        print(_empty_store_hint(settings, None))
    return 0


def _cmd_points(args: argparse.Namespace) -> int:
    from feature_pipeline import queries

    settings = get_settings()
    where = {k: v for k, v in (("entry_id", args.entry_id), ("type", args.type)) if v}
    points = _with_store_or_pipeline(
        settings,
        local=lambda store: queries.points(
            store, args.collection, where, with_vectors=args.with_vectors, limit=args.limit
        ),
        path="/points",
        params={
            "collection": args.collection,
            **where,
            **({"with_vectors": 1} if args.with_vectors else {}),
            **({"limit": args.limit} if args.limit is not None else {}),
        },
    )
    for point in points:
        print(json.dumps(point, ensure_ascii=False))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from feature_pipeline.domain.types import DataType
    from feature_pipeline.export import ExportFilter, all_pages, export, export_page

    if args.page_size < 1:
        raise ValueError(f"--page-size must be at least 1, got {args.page_size}")
    settings = get_settings()
    wanted = ExportFilter(DataType(args.type), since=args.since, author=args.author)
    reader, collections = reader_of_store_or_pipeline(settings)
    if wanted.data_type.cleaned_collection not in collections:
        raise ValueError(
            f"the store has no {wanted.data_type.cleaned_collection} collection yet: index "
            "documents first (`feature-pipeline backfill` or `run`)"
        )
    pages = all_pages(lambda offset: export_page(reader, wanted, offset, args.page_size))
    count = export(pages, args.output, args.format)
    print(f"exported {count} {wanted.data_type.value} documents to {args.output}")
    return 0


def reader_of_store_or_pipeline(settings: Any) -> tuple[Any, dict[str, int]]:
    """Read-only access to the store (`PointReader`) and its collections' sizes: the store
    itself, or the running pipeline when it holds the embedded store."""
    from feature_pipeline.connectors.qdrant.store import FeatureStore, StoreLocked
    from feature_pipeline.query_server import RunningPipelineReader, ask_running_pipeline

    try:
        store = FeatureStore.open(settings)
    except StoreLocked:
        return RunningPipelineReader(settings), ask_running_pipeline(settings, "/counts")
    return store, store.counts()


class EmptyStore(RuntimeError):
    """Nothing was ever indexed where the settings point."""


def _empty_store_hint(settings: Any, collection: str | None) -> str:
    where = (
        f"QDRANT_URL={redact(settings.qdrant_url)}"
        if settings.qdrant_url
        else f"QDRANT_PATH={settings.qdrant_path}"
    )
    what = f"has no collection {collection}" if collection else "is empty"
    return (
        f"the store at {where} {what}: index documents first with "
        "`feature-pipeline backfill FILE.jsonl` (or `feature-pipeline run`)"
    )


def _with_store_or_pipeline(settings: Any, local: Any, path: str, params: dict[str, Any]) -> Any:
    """Query the store directly; if a running pipeline holds the embedded store, ask it.

    An embedded store that was never written is not opened (opening creates its folder), and a
    server that does not answer fails in a few seconds, in one line naming QDRANT_URL.
    """
    from feature_pipeline.connectors.qdrant.location import store_folder_is_empty
    from feature_pipeline.connectors.qdrant.store import FeatureStore, StoreLocked
    from feature_pipeline.query_server import ask_running_pipeline
    from feature_pipeline.startup import QUERY_STORE_WAIT_S, wait_for_store_server

    if settings.qdrant_url:
        wait_for_store_server(settings, give_up_after_s=QUERY_STORE_WAIT_S, log_level=logging.INFO)
    elif store_folder_is_empty(settings.qdrant_path):
        raise EmptyStore(_empty_store_hint(settings, None))
    try:
        store = FeatureStore.open(settings)
    except StoreLocked:
        return ask_running_pipeline(settings, path, **params)
    return local(store)


def _print_counts(counts: dict[str, int]) -> None:
    width = max((len(name) for name in counts), default=0)
    for name, count in counts.items():
        print(f"{name:<{width}}  {count:>7}")


if __name__ == "__main__":
    sys.exit(main())
