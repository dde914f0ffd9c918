"""Benchmark of the feature store alone (no model, no broker), through the FeatureStore interface.

    python bench/store.py                      # 100,000 points into the embedded engine (Edge)
    python bench/store.py --points 1000000     # the 1M-point figures
    python bench/store.py --engine local --points 5000   # qdrant-client local mode, to compare

384-d normalised vectors drawn around 1,000 random centres (so that neighbours exist, as with
real embeddings), chunk-like payloads (~1 KB of text, the indexed keyword fields), written in
batches of the sink's size. Measures the upsert rate, reads by id, deletes by id, search p50/p99
of top-10 with and without a `type` filter (a third of the points match it), recall@10 against
exact search (numpy), the same searches again (page cache warm), the slowest write and the
longest stall of the whole process while loading (a background index build holds the GIL),
searches run every 100 ms during the load, the index build of what is left unindexed after the
load, peak RSS, disk size and reopen time; writes bench/results/store.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from feature_pipeline.connectors.qdrant.edge import EdgeStore
from feature_pipeline.connectors.qdrant.server import ServerStore
from feature_pipeline.connectors.qdrant.store import FeatureStore, Point
from feature_pipeline.domain.types import DataType

DIM = 384
CENTRES = 1_000
QUERIES = 200
TOP = 10
TYPES = ("posts", "articles", "repositories")
PLATFORMS = ("linkedin", "medium", "github", "substack")
TEXT = ("Streaming feature pipelines keep retrieval-augmented generation fresh. " * 15)[:1_000]
DATA_TYPE = DataType.ARTICLES
COLLECTION = DATA_TYPE.vector_collection


def open_store(engine: str, path: Path) -> FeatureStore:
    if engine == "edge":
        return EdgeStore(path)
    from qdrant_client import QdrantClient

    return ServerStore(QdrantClient(path=str(path)), is_local=True)


def normalised(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def batch_vectors(centres: np.ndarray, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(centres), size)
    return normalised(centres[picks] + rng.standard_normal((size, DIM)).astype(np.float32))


def point_id(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def payload(i: int) -> dict[str, Any]:
    entry = i // 8  # eight chunks per document
    return {
        "id": point_id(i),
        "type": TYPES[i % len(TYPES)],
        "entry_id": f"doc-{entry}",
        "author_id": f"author-{entry % 97}",
        "platform": PLATFORMS[entry % len(PLATFORMS)],
        "chunk_index": i % 8,
        "content": TEXT,
        "content_hash": f"{i:032x}",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
    }


def anon_mb() -> float:
    """This process's anonymous resident memory (Linux; 0 elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch:
    """Background threads while the store loads: one sleeps 10 ms at a time and records how much
    longer it took (the whole process stalls while something holds the GIL, e.g. an index build
    in qdrant-edge-py 0.9.0), one runs a search every 100 ms and times it."""

    def __init__(self, store: FeatureStore, query: list[float]) -> None:
        self.worst_stall_s = 0.0
        #: The most anonymous memory seen (RSS less memory-mapped files, which the kernel can
        #: drop: the float32 vectors on disk count in RSS while they are in the page cache).
        self.peak_anon_mb = 0.0
        self.search_s: list[float] = []
        self._stop = threading.Event()
        self._store = store
        self._query = query
        self._threads = [
            threading.Thread(target=self._tick, daemon=True),
            threading.Thread(target=self._search, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _tick(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            time.sleep(0.01)
            self.worst_stall_s = max(self.worst_stall_s, time.perf_counter() - started - 0.01)
            self.peak_anon_mb = max(self.peak_anon_mb, anon_mb())

    def _search(self) -> None:
        while not self._stop.wait(0.1):
            started = time.perf_counter()
            self._store.search(DATA_TYPE, self._query, TOP)
            self.search_s.append(time.perf_counter() - started)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


class ExactTopK:
    """Running exact top-k of every query (cosine = dot product of normalised vectors)."""

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = queries
        self.scores = np.full((len(queries), TOP), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), TOP), dtype=np.int64)

    def add(self, vectors: np.ndarray, first_id: int, mask: np.ndarray | None = None) -> None:
        scores = self.queries @ vectors.T
        if mask is not None:
            scores[:, ~mask] = -np.inf
        ids = np.broadcast_to(np.arange(first_id, first_id + len(vectors)), scores.shape)
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_ids = np.concatenate([self.ids, ids], axis=1)
        best = np.argpartition(-all_scores, TOP - 1, axis=1)[:, :TOP]
        self.scores = np.take_along_axis(all_scores, best, axis=1)
        self.ids = np.take_along_axis(all_ids, best, axis=1)

    def truth(self) -> list[set[str]]:
        return [{point_id(int(i)) for i in row} for row in self.ids]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed_searches(
    store: FeatureStore, queries: np.ndarray, truth: list[set[str]], where: dict[str, str] | None
) -> dict[str, float]:
    latencies, recalls = [], []
    for query, expected in zip(queries, truth, strict=True):
        started = time.perf_counter()
        hits = store.search(DATA_TYPE, query.tolist(), TOP, where=where)
        latencies.append((time.perf_counter() - started) * 1e3)
        recalls.append(len({h.payload["id"] for h in hits} & expected) / TOP)
    return {
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "recall_at_10": round(statistics.fmean(recalls), 4),
    }


def disk_bytes(path: Path) -> int:
    """Allocated bytes (sparse preallocated log files count only what they use)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--engine", choices=["edge", "local"], default="edge")
    parser.add_argument("--batch", type=int, default=256, help="points per write (BATCH_SIZE)")
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes (temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/store.json"))
    args = parser.parse_args()

    load_start = os.getloadavg()
    bench_started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    path = workdir / "qdrant"
    centres = np.random.default_rng(0).standard_normal((CENTRES, DIM)).astype(np.float32) * 1.0
    queries = batch_vectors(centres, seed=-1 % 2**32, size=QUERIES)
    exact, exact_posts = ExactTopK(queries), ExactTopK(queries)

    store = open_store(args.engine, path)
    store.ensure_collections({DATA_TYPE: DIM})
    write_s, write_cpu_s, slowest_write_s = 0.0, 0.0, 0.0
    load_started = time.perf_counter()
    watch = Watch(store, queries[0].tolist())
    for first in range(0, args.points, args.batch):
        size = min(args.batch, args.points - first)
        vectors = batch_vectors(centres, seed=first, size=size)
        exact.add(vectors, first)
        exact_posts.add(vectors, first, mask=(np.arange(first, first + size) % len(TYPES)) == 0)
        # The sink's vectors are lists already: the sync converts each model call's output in one
        # `tolist()` before any write. Converting row by row inside the timed write, as this did
        # before, took 27 us a point on the EPYC, a quarter of the measured write.
        vector_lists = vectors.tolist()
        started, started_cpu = time.perf_counter(), time.process_time()
        # Building the points (payload dicts, `Point`s) is part of a write's cost, as in the sink.
        store.upsert(
            COLLECTION,
            [Point(point_id(first + j), payload(first + j), v) for j, v in enumerate(vector_lists)],
        )
        took = time.perf_counter() - started
        write_s += took
        # CPU seconds of the whole process (the engine's threads included): on a shared machine
        # wall time also counts other processes' turns.
        write_cpu_s += time.process_time() - started_cpu
        # The longest write: a background index build (it holds the GIL) stalls writes.
        slowest_write_s = max(slowest_write_s, took)
    upsert_rate = args.points / write_s
    # The whole load, the bench's own bookkeeping (drawing vectors, the exact top 10) included:
    # a background index build also stalls the process between writes, which `write_s` does not
    # see, and a pipeline loading this many points waits for it all the same.
    load_s = time.perf_counter() - load_started
    watch.stop()
    during_load = [t * 1e3 for t in watch.search_s]

    # Index build: what the background optimiser does once writes pause, timed here directly.
    started = time.perf_counter()
    if isinstance(store, EdgeStore):
        store.optimize(COLLECTION)
    index_s = time.perf_counter() - started

    rng = np.random.default_rng(1)
    sample = [point_id(int(i)) for i in rng.choice(args.points, 2_000, replace=False)]
    started = time.perf_counter()
    for first in range(0, 1_000, 50):
        assert len(store.retrieve(COLLECTION, sample[first : first + 50], with_vectors=True)) == 50
    retrieve_ms = (time.perf_counter() - started) * 1e3 / 20

    # The first pass reads the rescoring vectors from disk (memory-mapped, just written by the
    # index build): the figures a search gets right after a bulk load. The second pass finds
    # what those searches touched in the page cache, as a running service's searches do.
    plain = timed_searches(store, queries, exact.truth(), None)
    filtered = timed_searches(store, queries, exact_posts.truth(), {"type": "posts"})
    warm = timed_searches(store, queries, exact.truth(), None)
    anon_loaded_mb = anon_mb()  # everything loaded, indexed and searched

    # Deletes by id, as the sync deletes a document's stale chunks: 20 deletes of 10 points.
    to_delete = sample[1_000:1_200]
    started = time.perf_counter()
    for first in range(0, len(to_delete), 10):
        store.delete_ids(COLLECTION, to_delete[first : first + 10])
    delete_ms = (time.perf_counter() - started) * 1e3 / 20
    assert store.count(COLLECTION) == args.points - len(to_delete)

    store.close()
    size_mb = disk_bytes(path) / 2**20
    started = time.perf_counter()
    store = open_store(args.engine, path)
    reopened = store.count(COLLECTION)
    reopen_s = time.perf_counter() - started
    assert reopened == args.points - len(to_delete)
    store.close()
    shutil.rmtree(workdir)

    result = {
        "store": {
            "engine": store.engine,
            "points": args.points,
            "upsert_points_per_s": round(upsert_rate),
            "upsert_points_per_cpu_s": round(args.points / write_cpu_s),
            "search_p50_ms": plain["p50_ms"],
            "search_p99_ms": plain["p99_ms"],
            "recall_at_10": plain["recall_at_10"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_anon_rss_mb_during_load": round(watch.peak_anon_mb),
            "anon_rss_mb_after_searches": round(anon_loaded_mb),
            "filtered_search_p50_ms": filtered["p50_ms"],
            "filtered_search_p99_ms": filtered["p99_ms"],
            "filtered_recall_at_10": filtered["recall_at_10"],
            "search_again_p50_ms": warm["p50_ms"],
            "search_again_p99_ms": warm["p99_ms"],
            "write_batch": args.batch,
            "slowest_write_ms": round(slowest_write_s * 1e3, 1),
            "worst_stall_during_load_ms": round(watch.worst_stall_s * 1e3, 1),
            "searches_during_load": len(during_load),
            "search_during_load_p50_ms": round(percentile(during_load, 50), 3),
            "search_during_load_p99_ms": round(percentile(during_load, 99), 3),
            "search_during_load_max_ms": round(max(during_load), 3),
            "index_build_s": round(index_s, 2),
            "retrieve_50_by_id_ms": round(retrieve_ms, 2),
            "delete_10_by_id_ms": round(delete_ms, 2),
            "disk_mb": round(size_mb, 1),
            "reopen_s": round(reopen_s, 3),
            "write_s": round(write_s, 1),
            "load_s": round(load_s, 1),
            "load_points_per_s": round(args.points / load_s),
            "write_cpu_s": round(write_cpu_s, 1),
            "cpu_seconds": round(time.process_time(), 1),
            "wall_seconds": round(time.perf_counter() - bench_started, 1),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
