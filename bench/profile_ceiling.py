"""Profile the ceiling pass in-process: the bench corpus through parse/clean/chunk and the sync
(stand-in model, embedded store), printing CPU seconds per phase and the top costs."""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# bench/ is sys.path[0] when run as a script: the corpus builder and the stand-in model.
from ceiling import zero_cost_embedders
from run import build_corpus

from feature_pipeline.connectors.qdrant.sink import build_sync
from feature_pipeline.domain.changes import DocumentChange, InboundMessage
from feature_pipeline.metrics import Metrics
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import load_settings


def outputs_digest(processor: DocumentProcessor, messages: list[InboundMessage]) -> str:
    """SHA-256 over what processing makes of the messages: payloads, spans and token ids."""
    digest = hashlib.sha256()
    for message in messages:
        change = processor.process(message)
        assert isinstance(change, DocumentChange) and change.cleaned is not None
        digest.update(change.cleaned.model_dump_json().encode())
        for chunk in change.chunks:
            digest.update(chunk.model_dump_json().encode())
            digest.update(repr(chunk.token_ids).encode())
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-chunks", type=int, default=3000, help="as bench/run.py")
    parser.add_argument("--batch", type=int, default=256, help="messages per source batch")
    parser.add_argument(
        "--top",
        type=int,
        default=30,
        help="functions listed per table (0: no profiler, CPU seconds only)",
    )
    parser.add_argument(
        "--phase",
        choices=("all", "process", "sync"),
        default="all",
        help="profile only this phase (the other still runs, unprofiled)",
    )
    parser.add_argument(
        "--digest",
        action="store_true",
        help="also print a digest of every cleaned document, chunk and token id (an optimisation "
        "must not change it)",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="feature-pipeline-profile-"))
    try:
        settings = load_settings(_env_file=None, qdrant_path=workdir / "qdrant", query_port=0)
        corpus = build_corpus(DocumentProcessor(settings), args.max_chunks, workdir)
        messages = [InboundMessage(source="profile", body=e.to_json()) for e in corpus.events]
        batches = [messages[i : i + args.batch] for i in range(0, len(messages), args.batch)]
        print(f"{len(messages)} documents, {len(corpus.chunks)} chunks, {len(batches)} batches")

        # A fresh processor, as a fresh pipeline has (its tokenizers load on first use).
        processor = DocumentProcessor(settings)
        sync = build_sync(settings, Metrics(), embedders=zero_cost_embedders)
        # Wall-clock timer: a CPU-time timer costs a system call per event and inflates the
        # functions called most. The phases' CPU seconds are the figures to compare (--top 0:
        # without the profiler's own overhead).
        profiler = cProfile.Profile()
        profiled = args.top > 0
        cpu = {"process": 0.0, "sync": 0.0}
        wall_started = time.perf_counter()
        for batch in batches:
            started = time.process_time()
            if profiled and args.phase in ("all", "process"):
                profiler.enable()
            results = [processor.process(message) for message in batch]
            profiler.disable()
            cpu["process"] += time.process_time() - started
            changes = [r for r in results if isinstance(r, DocumentChange)]
            if len(changes) != len(batch):
                raise RuntimeError("dead letters in the bench corpus")
            started = time.process_time()
            if profiled and args.phase in ("all", "sync"):
                profiler.enable()
            sync.apply(changes)
            profiler.disable()
            cpu["sync"] += time.process_time() - started
        wall = time.perf_counter() - wall_started
        if args.digest:
            print(f"outputs sha256: {outputs_digest(processor, messages)}")
        total = sum(cpu.values())
        print(
            f"CPU s: process {cpu['process']:.2f}, sync {cpu['sync']:.2f}, total {total:.2f} "
            f"(wall {wall:.2f} s, {'profiled' if profiled else 'not profiled'}: "
            f"{len(corpus.chunks) / total:.0f} chunks per CPU s)"
        )
        if not profiled:
            return 0
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
