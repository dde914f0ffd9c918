"""Benchmark: the bare model's limit, the pipeline's end-to-end throughput, freshness and memory,
and the ceiling: the same pipeline with the model replaced by a zero-cost stand-in."""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pika

from feature_pipeline.connectors.rabbitmq import topology
from feature_pipeline.connectors.rabbitmq.publisher import EventPublisher
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import totals_from_text
from feature_pipeline.processing.embedding import available_cores, embedder_for, resolve_device
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "scripts"))
from build_sample_repositories import repository_document  # noqa: E402

#: Standard-library packages added as repositories, in order, until the corpus has enough chunks.
EXTRA_PACKAGES = ("email", "asyncio", "http", "logging", "importlib", "urllib", "xml", "unittest")
#: Batch sizes the limit tries, per kind of device.
BATCH_SIZES: dict[str, tuple[int, ...]] = {
    "cpu": (8, 16, 32, 64),
    "cuda": (64, 128, 256, 512, 1024),
    "mps": (16, 32, 64, 128),
}
#: Chunks timed per candidate batch size (the full corpus is then timed at the best one).
BATCH_SEARCH_CHUNKS = 128
TARGET_RATIO = 0.9
TARGET_P50_MS = 300.0
TARGET_P99_MS = 1000.0
TARGET_RSS_MB = 1536.0
TARGET_CEILING = 3000.0
#: The split of a drain's time, from the pipeline's counters; "rest" is what none of them covers
#: (the broker, Bytewax, the sync logic between store calls).
SPLIT = {
    "parse_clean_chunk": "processing_seconds",
    "embed": "embedding_seconds",
    "store_read": "store_read_seconds",
    "store_write": "store_write_seconds",
}


@dataclass
class Corpus:
    events: list[ChangeEvent] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    #: The chunker's word-piece ids of each chunk (what the pipeline feeds the model).
    token_ids: list[tuple[int, ...]] = field(default_factory=list)
    chunks_by_type: dict[str, int] = field(default_factory=dict)
    docs_by_type: dict[str, int] = field(default_factory=dict)
    repositories: list[str] = field(default_factory=list)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def insert_event(data_type: DataType, document: dict[str, Any]) -> ChangeEvent:
    body = event_document(document)
    return ChangeEvent(
        op=Op.INSERT, type=data_type, entry_id=str(document["_id"]), document=body, ts=1
    )


def build_corpus(processor: DocumentProcessor, max_chunks: int, corpus_dir: Path) -> Corpus:
    """Sample posts, articles and repositories, then standard-library packages up to max_chunks."""
    corpus = Corpus()
    documents = {t: read_jsonl(SAMPLES / f"{t.value}.jsonl") for t in DataType}
    for data_type in DataType:
        for document in documents[data_type]:
            _add(corpus, processor, data_type, document)
    owner_id = str(read_jsonl(SAMPLES / "users.jsonl")[0]["_id"])
    for name in EXTRA_PACKAGES:
        if len(corpus.chunks) >= max_chunks:
            break
        documents[DataType.REPOSITORIES].append(repository_document(name, owner_id))
        _add(corpus, processor, DataType.REPOSITORIES, documents[DataType.REPOSITORIES][-1])
    # The corpus on disk, for a look at what was measured (deleted with the work dir).
    for data_type, docs in documents.items():
        path = corpus_dir / f"{data_type.value}.jsonl"
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    corpus.repositories = [str(d["name"]) for d in documents[DataType.REPOSITORIES]]
    return corpus


def _add(
    corpus: Corpus, processor: DocumentProcessor, data_type: DataType, document: dict[str, Any]
) -> None:
    event = insert_event(data_type, document)
    processed = processor.process_event(event).chunks
    chunks = [c.content for c in processed]
    corpus.events.append(event)
    corpus.chunks += chunks
    corpus.token_ids += [c.token_ids or () for c in processed]
    corpus.chunks_by_type[data_type.value] = corpus.chunks_by_type.get(data_type.value, 0) + len(
        chunks
    )
    corpus.docs_by_type[data_type.value] = corpus.docs_by_type.get(data_type.value, 0) + 1


# -- the limit: the bare model on the pipeline's own chunks ------------------------------------
def measure_limit(settings: Settings, corpus: Corpus) -> dict[str, Any]:
    """The bare model on the corpus's chunks: from text (tokenize + forward pass, what
    `SentenceTransformer.encode` does) at its best batch size; on a GPU also from the
    chunker's ids (the forward pass alone)."""
    chunks = corpus.chunks
    started = time.perf_counter()
    embedder = embedder_for(settings, DataType.POSTS)
    load_s = time.perf_counter() - started
    kind = embedder.device.partition(":")[0]
    step = max(1, len(chunks) // BATCH_SEARCH_CHUNKS)
    sample = chunks[::step][:BATCH_SEARCH_CHUNKS]
    # Warm-up: the first pass over new shapes pays one-off kernel set-up.
    embedder.encode(sample, batch_size=BATCH_SIZES[kind][1])
    by_batch = {}
    for batch_size in BATCH_SIZES[kind]:
        started = time.perf_counter()
        embedder.encode(sample, batch_size=batch_size)
        by_batch[batch_size] = len(sample) / (time.perf_counter() - started)
        print(f"  batch {batch_size:>3}: {by_batch[batch_size]:.1f} chunks/s on {len(sample)}")
    best = max(by_batch, key=lambda b: by_batch[b])
    # What tokenizing once saves: the sample from its text and from the chunker's ids, in turns.
    sample_ids = corpus.token_ids[::step][:BATCH_SEARCH_CHUNKS]
    from_text, from_ids = [], []
    for _ in range(2):
        started = time.perf_counter()
        embedder.encode(sample, batch_size=best)
        from_text.append(len(sample) / (time.perf_counter() - started))
        started = time.perf_counter()
        embedder.embed(sample, sample_ids, batch_size=best)
        from_ids.append(len(sample) / (time.perf_counter() - started))
    elapsed = len(chunks) / bare_model_chunks_per_s(settings, chunks, best)
    forward_only: dict[str, float] = {}
    if kind != "cpu":
        started = time.perf_counter()
        embedder.embed(chunks, corpus.token_ids, batch_size=best)
        forward_only["forward_only_chunks_per_s"] = len(chunks) / (time.perf_counter() - started)
    return {
        "device": embedder.device,
        "backend": embedder.backend,
        "load_s": load_s,
        "batch_size": best,
        "chunks_per_s_by_batch_size": {str(k): round(v, 2) for k, v in by_batch.items()},
        "sample_from_text_chunks_per_s": round(max(from_text), 2),
        "sample_from_ids_chunks_per_s": round(max(from_ids), 2),
        "chunks": len(chunks),
        "seconds": elapsed,
        "chunks_per_s": len(chunks) / elapsed,
        **forward_only,
    }


def bare_model_chunks_per_s(settings: Settings, chunks: list[str], batch_size: int) -> float:
    """The loaded model's `encode` (tokenize and forward pass) over every chunk, in chunks/s."""
    embedder = embedder_for(settings, DataType.POSTS)
    started = time.perf_counter()
    embedder.encode(chunks, batch_size=batch_size)
    return len(chunks) / (time.perf_counter() - started)


def time_limit_again(settings: Settings, corpus: Corpus, limit: dict[str, Any]) -> None:
    """Time the bare model again, after the drain, and make `limit.chunks_per_s` the mean of
    both passes (`chunks_per_s_before`, `chunks_per_s_after`): a machine whose speed drifts (a
    shared one does, by 10-15% within minutes here) is then compared at about the drain's time.
    """
    before = limit["chunks_per_s"]
    after = bare_model_chunks_per_s(settings, corpus.chunks, limit["batch_size"])
    limit.update(
        chunks_per_s_before=before, chunks_per_s_after=after, chunks_per_s=(before + after) / 2
    )
    print(f"  limit: {after:.1f} chunks/s after, {before:.1f} before")


# -- the pipeline as a subprocess ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pipeline:
    """`feature-pipeline run` in a subprocess, watched through its query server."""

    RUN = (sys.executable, "-m", "feature_pipeline.cli", "run")
    #: The ceiling pass: the same `run`, with the model replaced by a zero-cost stand-in.
    CEILING = (sys.executable, str(ROOT / "bench" / "ceiling.py"))

    def __init__(
        self,
        settings: Settings,
        env: dict[str, str],
        log_path: Path,
        command: tuple[str, ...] = RUN,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [*command, "--workers", str(workers)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.settings.query_port}{path}"
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
        return body.decode() if path == "/metrics" else json.loads(body)

    def metrics(self) -> dict[str, float]:
        return totals_from_text(self.get("/metrics"))

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Until `/ready` says the models are loaded and every queue is consumed (a 503 before
        that is an OSError too): a drain's clock then leaves start-up out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.get("/ready")
                return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("the pipeline did not start")

    def cpu_seconds(self) -> float:
        """CPU seconds the process has used, all its threads (the tokenizer's too): on this
        shared machine far steadier than wall time, which other processes' load stretches."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        # utime and stime, fields 14 and 15 of proc(5), counted after the command name.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the pipeline exited with {self.process.returncode}:\n{tail}")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()


def pipeline_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "QDRANT_"))}
    env.update(
        RABBITMQ_URL=settings.rabbitmq_url,
        RABBITMQ_QUEUE=settings.rabbitmq_queue,
        QDRANT_PATH=str(settings.qdrant_path),
        QUERY_PORT=str(settings.query_port),
        EMBEDDING_DEVICE=settings.embedding_device,
        EMBEDDING_BACKEND=settings.embedding_backend,
        LOG_LEVEL="INFO",
    )
    if settings.embedding_batch_size is not None:
        env["EMBEDDING_BATCH_SIZE"] = str(settings.embedding_batch_size)
    return env


def last_applied_age(metrics_text: str) -> float:
    """`feature_pipeline_last_applied_age_seconds` of a /metrics answer: how long ago the
    pipeline applied its last change."""
    for line in metrics_text.splitlines():
        if line.startswith("feature_pipeline_last_applied_age_seconds "):
            return max(0.0, float(line.split()[1]))
    raise RuntimeError("no feature_pipeline_last_applied_age_seconds in /metrics")


def measure_drain(pipeline: Pipeline, corpus: Corpus, timeout_s: float) -> dict[str, Any]:
    """From ready to every document applied; the backlog was published before the start."""
    started = time.perf_counter()
    cpu_started = pipeline.cpu_seconds()
    # Work done before the clock started (messages arrive as soon as a queue is consumed, a
    # moment before the last one is): shown, so a drain that began early can be told.
    before = pipeline.metrics()
    deadline = time.monotonic() + timeout_s
    while True:
        pipeline.check_alive()
        text = pipeline.get("/metrics")
        answered = time.perf_counter()
        done = totals_from_text(text)
        if done["events_applied"] >= len(corpus.events):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain not finished after {timeout_s}s: {done}")
        # Few polls (each costs the pipeline CPU): the end comes from the pipeline's own
        # time since its last write, not from when a poll saw it.
        time.sleep(0.25)
    elapsed = answered - last_applied_age(text) - started
    cpu = pipeline.cpu_seconds() - cpu_started
    if done["chunks_embedded"] != len(corpus.chunks) or done["dead_letters"]:
        raise RuntimeError(f"expected {len(corpus.chunks)} chunks embedded, got {done}")
    # Where the time went: the drain is the fresh pipeline's first work, so the counters are its.
    in_model = done["embedding_seconds"]
    seconds = {part: done[counter] for part, counter in SPLIT.items()}
    # With several workers the parts overlap and may sum past the wall time: then the shares
    # are of the summed time, and nothing is left for the rest.
    seconds["rest"] = max(0.0, elapsed - sum(seconds.values()))
    counted = sum(seconds.values())
    return {
        "docs": len(corpus.events),
        "chunks": len(corpus.chunks),
        "seconds": elapsed,
        "docs_per_s": len(corpus.events) / elapsed,
        "chunks_per_s": len(corpus.chunks) / elapsed,
        "cpu_seconds": cpu,
        "chunks_per_cpu_s": len(corpus.chunks) / cpu if cpu else None,
        "applied_before_clock": before["events_applied"],
        "processing_seconds_before_clock": before["processing_seconds"],
        "apply_seconds": done["apply_seconds"],
        "embedding_seconds": in_model,
        "chunks_per_s_in_model": len(corpus.chunks) / in_model if in_model else None,
        "split_seconds": seconds,
        "percent": {part: round(100 * value / counted, 1) for part, value in seconds.items()},
    }


def measure_freshness(
    pipeline: Pipeline,
    publisher: EventPublisher,
    processor: DocumentProcessor,
    posts: list[dict[str, Any]],
    count: int,
) -> dict[str, Any]:
    """Publish one post at a time to the idle pipeline; time until its chunks are searchable.

    The cheap check (the applied counter, bumped after the chunks are written) ends the clock;
    a search for the post's first chunk then confirms it; if it does not, the clock runs on.
    """
    latencies = []
    counter_ms = []  # the clock at the cheap check alone
    late = 0  # posts not found by the first search after the cheap check
    applied = pipeline.metrics()["events_applied"]
    run = uuid.uuid4().hex[:8]
    for i in range(count):
        source = posts[i % len(posts)]
        text = f"Freshness probe {run}-{i}. " + str(source["content"]["text"])
        document = {**source, "_id": f"fresh-{run}-{i}", "content": {"text": text}}
        event = insert_event(DataType.POSTS, document)
        first_chunk = processor.process_event(event).chunks[0].content
        time.sleep(0.2)  # idle between documents, as a trickle of edits would be
        started = time.perf_counter()
        deadline = time.monotonic() + 60
        publisher.publish([event])
        while pipeline.metrics()["events_applied"] <= applied:
            _check_deadline(pipeline, deadline, event.entry_id)
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        counter_ms.append(elapsed * 1000)
        applied += 1
        found = _searchable(pipeline, first_chunk, event.entry_id)
        late += not found
        while not found:
            _check_deadline(pipeline, deadline, event.entry_id)
            time.sleep(0.01)
            found = _searchable(pipeline, first_chunk, event.entry_id)
            elapsed = time.perf_counter() - started
        latencies.append(elapsed * 1000)
    latencies.sort()
    return {
        "documents": count,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "max_ms": latencies[-1],
        "mean_ms": statistics.fmean(latencies),
        "counter_p50_ms": statistics.median(counter_ms),
        "not_found_by_first_search": late,
    }


def _check_deadline(pipeline: Pipeline, deadline: float, entry_id: str) -> None:
    pipeline.check_alive()
    if time.monotonic() > deadline:
        raise TimeoutError(f"post {entry_id} not searchable after 60 s")


def _searchable(pipeline: Pipeline, chunk: str, entry_id: str) -> bool:
    query = urllib.parse.urlencode({"q": chunk, "type": "posts", "k": 5})
    hits = pipeline.get(f"/search?{query}")
    return any(hit.get("entry_id") == entry_id for hit in hits)


def delete_topology(settings: Settings) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(settings.rabbitmq_url))
    topology.delete_topology(connection.channel(), settings)
    connection.close()


# -- report ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "unknown":
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    packages = ("torch", "sentence-transformers", "transformers", "qdrant-client", "bytewax")
    return {
        "cpu": cpu,
        "cores_available": available_cores(),
        "cpu_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        **{name: version(name) for name in packages},
    }


def print_table(result: dict[str, Any]) -> None:
    ceiling = result["ceiling"]
    rows = [("corpus", f"{ceiling['docs']} docs, {ceiling['chunks']} chunks", "")]
    if "limit" in result:
        limit, drain, fresh = result["limit"], result["pipeline"], result["freshness"]
        ratio = result["ratio"]
        rows += [
            ("device, backend", f"{result['device']}, {limit['backend']}", ""),
            (
                "bare model (the limit)",
                f"{limit['chunks_per_s']:.1f} chunks/s (best batch size {limit['batch_size']}; "
                f"{limit['chunks_per_s_before']:.1f} before the drain, "
                f"{limit['chunks_per_s_after']:.1f} after)",
                "",
            ),
            ("pipeline start-up (model load)", f"{result['startup_s']:.1f} s", ""),
            (
                "pipeline drain",
                f"{drain['chunks_per_s']:.1f} chunks/s, {drain['docs_per_s']:.1f} docs/s "
                f"(EMBEDDING_BATCH_SIZE {result['pipeline_batch_size']})",
                "",
            ),
            ("  split (% of the drain)", _split(drain["percent"]), ""),
            ("ratio to the limit", f"{ratio:.2f}", _verdict(ratio >= TARGET_RATIO, ">= 0.9")),
            (
                "freshness p50",
                f"{fresh['p50_ms']:.0f} ms",
                _verdict(fresh["p50_ms"] <= TARGET_P50_MS, "<= 300 ms"),
            ),
            (
                "freshness p99",
                f"{fresh['p99_ms']:.0f} ms",
                _verdict(fresh["p99_ms"] <= TARGET_P99_MS, "<= 1000 ms"),
            ),
            (
                "peak RSS (pipeline)",
                f"{result['peak_rss_mb']:.0f} MB",
                _verdict(result["peak_rss_mb"] <= TARGET_RSS_MB, "<= 1536 MB"),
            ),
        ]
    rows += [
        (
            "ceiling (model: zero-cost stand-in)",
            f"{ceiling['chunks_per_s']:.0f} chunks/s ({ceiling['cpu_seconds']:.2f} CPU s, "
            f"{ceiling['chunks_per_cpu_s']:.0f} chunks per CPU s)",
            _verdict(ceiling["chunks_per_s"] >= TARGET_CEILING, ">= 3000 chunks/s"),
        ),
        ("  split (% of the drain)", _split(ceiling["percent"]), ""),
        ("load average (start / end)", f"{result['load_start']} / {result['load_end']}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print()
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:<{value_width}}  {verdict}")


def _split(percent: dict[str, float]) -> str:
    return ", ".join(f"{part} {value:.0f}%" for part, value in percent.items())


def _verdict(ok: bool, target: str) -> str:
    return f"{'ok' if ok else 'MISSED'} (target {target})"


def bench_settings(workdir: Path, name: str) -> Settings:
    """Everything but the queue, the store and the port comes from the environment (defaults)."""
    return load_settings(
        _env_file=None,
        rabbitmq_queue=f"bench-{name}-{uuid.uuid4().hex[:12]}",
        qdrant_path=workdir / f"qdrant-{name}",
        query_port=free_port(),
    )


def measure_ceiling(
    settings: Settings, corpus: Corpus, workdir: Path, workers: int
) -> dict[str, Any]:
    """The corpus drained by the pipeline with the model replaced by a zero-cost stand-in."""
    with EventPublisher(settings) as publisher:
        publisher.publish(corpus.events)
    log = workdir / "ceiling.log"
    env = pipeline_env(settings)
    pipeline = Pipeline(settings, env, log, command=Pipeline.CEILING, workers=workers)
    try:
        pipeline.wait_ready()
        drain = measure_drain(pipeline, corpus, timeout_s=600.0)
    finally:
        pipeline.stop()
    drain["model"] = "zero-cost stand-in (bench/ceiling.py): no tokenizing, no forward pass"
    return drain


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--max-chunks",
        type=int,
        default=3000,
        help="add standard-library repositories until the corpus has this many chunks",
    )
    parser.add_argument("--freshness-docs", type=int, default=60)
    parser.add_argument(
        "--ceiling-only",
        action="store_true",
        help="only the ceiling pass (no model: a minute, not several), written to --output",
    )
    parser.add_argument(
        "-w", "--workers", type=int, default=1, help="Bytewax workers of both pipelines (`run -w`)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args()

    load_start = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="feature-pipeline-bench-"))
    settings = bench_settings(workdir, "model")
    ceiling_settings = bench_settings(workdir, "ceiling")
    result: dict[str, Any] = {}
    try:
        print(f"building the corpus in {workdir} ...")
        processor = DocumentProcessor(settings)
        corpus = build_corpus(processor, args.max_chunks, workdir)
        print(
            f"  {len(corpus.events)} documents {corpus.docs_by_type}, {len(corpus.chunks)} chunks "
            f"{corpus.chunks_by_type}; repositories: {', '.join(corpus.repositories)}"
        )

        if not args.ceiling_only:
            result = measure_model_and_pipeline(args, settings, corpus, processor, workdir)

        print("ceiling: the same pipeline, the model replaced by a zero-cost stand-in ...")
        ceiling = measure_ceiling(ceiling_settings, corpus, workdir, args.workers)
        print(
            f"  drained in {ceiling['seconds']:.2f}s: {ceiling['chunks_per_s']:.0f} chunks/s, "
            f"{ceiling['cpu_seconds']:.2f} CPU s"
        )

        result = {
            "command": "make bench  (.venv/bin/python bench/run.py"
            + (" --ceiling-only)" if args.ceiling_only else ")"),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "load_start": " ".join(f"{x:.2f}" for x in load_start),
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "corpus": {
                "documents": corpus.docs_by_type,
                "chunks": corpus.chunks_by_type,
                "repositories": corpus.repositories,
            },
            "device": result.get("limit", {}).get("device")
            or resolve_device(settings.embedding_device),
            "workers": args.workers,
            "processing_processes": settings.processing_processes,
            **result,
            "ceiling": ceiling,
        }
        print_table(result)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.output}")
        return 0
    finally:
        delete_topology(settings)
        delete_topology(ceiling_settings)
        shutil.rmtree(workdir, ignore_errors=True)


def measure_model_and_pipeline(
    args: argparse.Namespace,
    settings: Settings,
    corpus: Corpus,
    processor: DocumentProcessor,
    workdir: Path,
) -> dict[str, Any]:
    """The limit, then the pipeline's drain, freshness and peak memory with the real model."""
    print("measuring the bare model on the pipeline's chunks ...")
    limit = measure_limit(settings, corpus)
    print(
        f"  limit: {limit['chunks_per_s']:.1f} chunks/s at batch size {limit['batch_size']} "
        f"on {limit['device']}, {limit['backend']}"
    )

    print(f"publishing {len(corpus.events)} documents to {settings.rabbitmq_queue} ...")
    started = time.perf_counter()
    with EventPublisher(settings) as publisher:
        publisher.publish(corpus.events)
    publish_s = time.perf_counter() - started

    print("starting `feature-pipeline run` ...")
    started = time.perf_counter()
    env = pipeline_env(settings)
    pipeline = Pipeline(settings, env, workdir / "pipeline.log", workers=args.workers)
    try:
        pipeline.wait_ready()
        startup_s = time.perf_counter() - started
        print(f"  ready after {startup_s:.1f}s; draining ...")
        drain = measure_drain(pipeline, corpus, timeout_s=max(600.0, 3 * limit["seconds"]))
        print(f"  drained in {drain['seconds']:.1f}s: {drain['chunks_per_s']:.1f} chunks/s")

        print(f"freshness: {args.freshness_docs} posts, one at a time ...")
        posts = read_jsonl(SAMPLES / "posts.jsonl")
        with EventPublisher(settings) as publisher:
            fresh = measure_freshness(pipeline, publisher, processor, posts, args.freshness_docs)
        peak_rss_mb = pipeline.peak_rss_mb()
    finally:
        pipeline.stop()
    print("the bare model again, after the drain ...")
    time_limit_again(settings, corpus, limit)
    ratio = drain["chunks_per_s"] / limit["chunks_per_s"]
    return {
        "limit": limit,
        "publish_s": publish_s,
        "startup_s": startup_s,
        "pipeline": drain,
        "pipeline_batch_size": settings.embedding_batch_size_for(limit["device"], limit["backend"]),
        "ratio": ratio,
        "ratio_to_limit": ratio,
        "freshness": fresh,
        "peak_rss_mb": peak_rss_mb,
    }


if __name__ == "__main__":
    sys.exit(main())
