"""The pipeline's work in one process, without the broker or Bytewax, for a machine that has no
RabbitMQ (a lent GPU machine has none): the bench corpus is parsed, cleaned and chunked as the
process step does it (PROCESSING_THREADS, or the PROCESSING_PROCESSES pool), then applied by the
sync with the configured model, device and backend on an embedded store, one source batch
(BATCH_SIZE messages) at a time. It prints chunks/s beside the bare model's, timed before and
after on the same chunks as in `bench/run.py`, and writes both to --output.

What it leaves out, next to `make bench`: the broker, Bytewax, acks, freshness and the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# bench/ is sys.path[0] when run as a script.
from run import SPLIT, build_corpus, machine_info, measure_limit, time_limit_again

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.domain.changes import DocumentChange, InboundMessage
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing.parallel import process_batch, start_processing
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings, load_settings


def drain(settings: Settings, messages: list[InboundMessage]) -> dict[str, Any]:
    """Every message through processing and the sync, a source batch at a time, timed."""
    counters = Metrics()
    start_processing(settings)
    sync = build_sync(settings, counters)  # the models load here, before the clock
    batches = [
        messages[i : i + settings.batch_size] for i in range(0, len(messages), settings.batch_size)
    ]
    chunks = 0
    started = time.perf_counter()
    for batch in batches:
        with counters.timed("processing_seconds"):
            results = process_batch(settings, batch)
        changes = [r for r in results if isinstance(r, DocumentChange)]
        if len(changes) != len(batch):
            raise RuntimeError("dead letters in the bench corpus")
        chunks += sum(len(c.chunks) for c in changes)
        sync.apply(changes)
    elapsed = time.perf_counter() - started
    seconds = {part: counters.get(counter) for part, counter in SPLIT.items()}
    seconds["rest"] = max(0.0, elapsed - sum(seconds.values()))
    return {
        "chunks": chunks,
        "seconds": elapsed,
        "chunks_per_s": chunks / elapsed,
        "chunks_per_s_in_model": chunks / seconds["embed"] if seconds["embed"] else None,
        "split_seconds": seconds,
        "percent": {part: round(100 * s / elapsed, 1) for part, s in seconds.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-chunks", type=int, default=3000, help="as bench/run.py")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "in-process.json"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="feature-pipeline-in-process-"))
    try:
        settings = load_settings(_env_file=None, qdrant_path=workdir / "qdrant", query_port=0)
        corpus = build_corpus(DocumentProcessor(settings), args.max_chunks, workdir)
        print(f"{len(corpus.events)} documents, {len(corpus.chunks)} chunks")
        print("the bare model ...")
        limit = measure_limit(settings, corpus)
        print(f"  {limit['chunks_per_s']:.1f} chunks/s at batch {limit['batch_size']}")
        messages = [InboundMessage(source="bench", body=e.to_json()) for e in corpus.events]
        print("the pipeline's work in this process ...")
        pipeline = drain(settings, messages)
        print(f"  {pipeline['chunks_per_s']:.1f} chunks/s: {pipeline['percent']}")
        print("the bare model again ...")
        time_limit_again(settings, corpus, limit)
        ratio = pipeline["chunks_per_s"] / limit["chunks_per_s"]
        print(f"ratio to the mean limit {ratio:.2f}")
        result = {
            "command": "bench/in_process.py (no broker, no Bytewax)",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "device": limit["device"],
            "processing_threads": settings.processing_threads,
            "processing_processes": settings.processing_processes,
            "limit": limit,
            "pipeline": pipeline,
            "ratio": ratio,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
