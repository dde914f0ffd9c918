"""The embedded feature store: Qdrant's own engine in-process (qdrant-edge-py), one shard per
collection under QDRANT_PATH/shards/<collection>.

- Durability: every write goes to the shard's write-ahead log before `update` returns, so a
  write the sink returned from survives kill -9 (the log is replayed on open). Segments are
  flushed to disk when the store is idle and on close.
- Indexes: HNSW for vectors and keyword payload indexes. Edge builds HNSW only when the caller
  runs `optimize()`; until then new points are searched exactly. `_Optimizer` runs it in the
  background once writes pause or the unindexed tail fills a segment (SEGMENT_POINTS); in
  qdrant-edge-py 0.9.0 `optimize()` holds the GIL and the shard, so while it runs the whole
  process waits (writes and searches alike): it is kept for idle moments and full segments on
  purpose, and a sealed segment is never rebuilt, so each pause is one segment's build.
- Memory: the float32 vectors stay on disk (memory-mapped, in the page cache only while used);
  the process keeps their int8 copies (384 bytes a point), the HNSW graphs and payload indexes.
- One process at a time: a lock file (fcntl) in QDRANT_PATH, taken before any shard is opened.
"""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import qdrant_edge as edge

from feature_pipeline.connectors.qdrant.store import (
    INDEXED_FIELDS,
    SYNC_STATE_COLLECTION,
    FeatureStore,
    Hit,
    Match,
    Point,
    Record,
    StoreLocked,
    UnknownCollection,
    check_vector_size,
    page_offset,
    record_of,
)
from feature_pipeline.domain.types import DataType

log = logging.getLogger(__name__)

#: Payload-only collections still need a vector space in Edge: an empty sparse one costs nothing.
_NO_VECTORS = "none"
#: Points per sealed segment. The background optimiser indexes the unindexed tail when it
#: reaches this many points (or when writes pause), and segments are never merged beyond this
#: size: a full segment is indexed once and then left alone, instead of a growing segment being
#: re-indexed with everything written so far (197 s pauses while loading 1M points). The price
#: is one graph per segment to search (10 at 1M points).
SEGMENT_POINTS = 100_000
#: HNSW m 16; ef_construct 32 (the server's default is 100) examines fewer candidates per
#: inserted point, so a segment builds faster, and with the searches below still found 0.999 of
#: the exact top 10 at 100,000 and 1M points (bench/store.py). Below
#: 10,000 KB of vectors (6,500 384-d points) a segment is searched exactly, which is as fast.
_HNSW = edge.HnswIndexConfig(m=16, ef_construct=32, full_scan_threshold=10_000)
#: int8 copies of the vectors, pinned in RAM, build and search the graph (384 bytes a point:
#: 366 MB at 1M points); the float32 originals stay on disk (memory-mapped, Memory.Cold) and
#: only rescore the candidates, so the page cache, not the process, holds them.
_QUANTIZATION = edge.ScalarQuantizationConfig(
    type=edge.ScalarType.Int8, quantile=0.99, memory=edge.Memory.Pinned
)
#: Rescoring twice the asked number of candidates with the originals makes up for int8's error
#: (recall@10 0.964 -> 1.0 at 100,000 points here).
_RESCORE = edge.QuantizationSearchParams(rescore=True, oversampling=2.0)
_SEARCH = edge.SearchParams(hnsw_ef=64, quantization=_RESCORE)
#: A filter makes the graph walk skip non-matching points and miss neighbours (recall@10 0.87
#: with a filter matching a third of 30,000 points); ACORN also walks through them, at several
#: times the cost per step: with ef 32 recall@10 was 0.92 at 20,000 points, with 64 0.96 (1.0
#: at 100,000; bench/store.py measures both kinds of search).
_FILTERED_SEARCH = edge.SearchParams(
    hnsw_ef=64, quantization=_RESCORE, acorn=edge.AcornSearchParams(enable=True)
)


def _vector_config(size: int, segment_points: int) -> edge.EdgeConfig:
    """A vector collection: float32 originals on disk, segments sealed at `segment_points`."""
    # The engine sizes segments in KB of float32 vectors.
    segment_kb = segment_points * size * 4 // 1024
    return edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(
            size=size, distance=edge.Distance.Cosine, memory=edge.Memory.Cold
        ),
        hnsw_config=_HNSW,
        quantization_config=_QUANTIZATION,
        # Tails above 10,000 KB (the engine's default) are indexed when writes pause; a smaller
        # segment size (tests) lowers that too, or its segments would never be indexed.
        optimizers=edge.EdgeOptimizersConfig(
            max_segment_size=segment_kb, indexing_threshold=max(1, min(10_000, segment_kb))
        ),
    )


class LegacyStore(RuntimeError):
    """QDRANT_PATH holds a store written by an older version (qdrant-client local mode)."""


class EdgeStore(FeatureStore):
    engine = "qdrant-edge"

    def __init__(
        self,
        path: Path,
        *,
        optimize_idle_s: float = 1.0,
        segment_points: int = SEGMENT_POINTS,
        optimize_max_unindexed: int | None = None,
    ) -> None:
        path.mkdir(parents=True, exist_ok=True)
        _refuse_legacy(path)
        self._path = path
        self._lock_file = _lock(path)
        self._shards_dir = path / "shards"
        self._shards_dir.mkdir(exist_ok=True)
        # Guards the shard table and close(); each shard serialises its own operations.
        self._lock = threading.RLock()
        try:
            self._shards: dict[str, edge.EdgeShard] = {
                d.name: edge.EdgeShard.load(str(d))
                for d in sorted(self._shards_dir.iterdir())
                if d.is_dir()
            }
        except BaseException:
            self._lock_file.close()
            raise
        #: Optimisations run so far (the background optimiser's and explicit ones).
        self.optimizations = 0
        #: For vector collections created by this store (an existing one keeps its own).
        self._segment_points = segment_points
        self._optimizer = _Optimizer(
            self, optimize_idle_s, optimize_max_unindexed or segment_points
        )

    def close(self) -> None:
        self._optimizer.stop()
        with self._lock:
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
            self._lock_file.close()  # releases the lock

    # -- schema -----------------------------------------------------------------------------
    def ensure_collections(self, dimensions: dict[DataType, int]) -> None:
        with self._lock:
            self._ensure(SYNC_STATE_COLLECTION, None)
            for data_type, size in dimensions.items():
                self._ensure(data_type.cleaned_collection, None)
                self._ensure(data_type.vector_collection, size)

    def _ensure(self, name: str, size: int | None) -> None:
        shard = self._shards.get(name)
        if shard is not None:
            if size is not None:
                check_vector_size(name, _vector_size(self._shards_dir / name), size)
        else:
            if size is None:
                config = edge.EdgeConfig(
                    sparse_vectors={_NO_VECTORS: edge.EdgeSparseVectorParams()}
                )
            else:
                config = _vector_config(size, self._segment_points)
            shard = edge.EdgeShard.create(str(self._shards_dir / name), config)
            self._shards[name] = shard
        # Also on an existing shard: a process killed right after creating it had none yet.
        indexed = set(shard.info().payload_schema)
        for field in INDEXED_FIELDS:
            if field not in indexed:
                shard.update(
                    edge.UpdateOperation.create_field_index(field, edge.PayloadSchemaType.Keyword)
                )
        shard.flush()

    def collections(self) -> list[str]:
        with self._lock:
            return sorted(self._shards)

    def _shard(self, collection: str) -> edge.EdgeShard:
        with self._lock:
            shard = self._shards.get(collection)
        if shard is None:
            raise UnknownCollection(f"no collection {collection!r} in the store")
        return shard

    # -- reads ------------------------------------------------------------------------------
    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[Record]:
        if not ids:
            return []
        records = self._shard(collection).retrieve(list(ids), True, with_vectors)
        return [record_of(r.id, r.payload, r.vector) for r in records]

    def count(self, collection: str, where: Match | None = None) -> int:
        return self._shard(collection).count(edge.CountRequest(exact=True, filter=_filter(where)))

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None,
        limit: int,
        where: Match | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[Record], str | None]:
        page, next_offset = self._shard(collection).scroll(
            edge.ScrollRequest(
                offset=offset,
                limit=limit,
                filter=_filter(where),
                with_payload=True,
                with_vector=with_vectors,
            )
        )
        return [record_of(r.id, r.payload, r.vector) for r in page], page_offset(next_offset)

    def search(
        self,
        data_type: DataType,
        vector: Sequence[float],
        limit: int,
        where: Match | None = None,
    ) -> list[Hit]:
        hits = self._shard(data_type.vector_collection).query(
            edge.QueryRequest(
                limit=limit,
                query=edge.Query.Nearest(list(vector)),
                filter=_filter(where),
                with_payload=True,
                params=_FILTERED_SEARCH if where else _SEARCH,
            )
        )
        return [Hit(score=h.score, payload=h.payload or {}) for h in hits]

    # -- writes (in the write-ahead log when they return) ------------------------------------
    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        shard = self._shard(collection)
        shard.update(
            edge.UpdateOperation.upsert_points(
                [
                    edge.Point(p.id, p.vector if p.vector is not None else {}, p.payload)
                    for p in points
                ]
            )
        )
        self._optimizer.written(collection, len(points))

    def delete_ids(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._shard(collection).update(edge.UpdateOperation.delete_points(list(ids)))
            self._optimizer.written(collection, 0)

    # -- maintenance -------------------------------------------------------------------------
    def optimize(self, collection: str) -> None:
        """Build indexes and merge segments of one collection now, then flush it."""
        shard = self._shard(collection)
        started = time.perf_counter()
        shard.optimize()
        shard.flush()
        self.optimizations += 1
        log.debug("optimised %s in %.2fs", collection, time.perf_counter() - started)

    def segments(self, collection: str) -> tuple[int, int]:
        """(segments, indexed vectors) of one collection: for tests and the benchmark."""
        info = self._shard(collection).info()
        return info.segments_count, info.indexed_vectors_count

    def flush(self, collection: str) -> None:
        self._shard(collection).flush()


class _Optimizer:
    """Runs `optimize()` and `flush()` in a background thread, only when the store has had no
    write for `idle_s` seconds, or when a collection's unindexed tail (searched exactly, so
    slower as it grows) reaches `max_unindexed` points."""

    def __init__(self, store: EdgeStore, idle_s: float, max_unindexed: int) -> None:
        self._store = store
        self._idle_s = idle_s
        self._max_unindexed = max_unindexed
        self._pending: dict[str, int] = {}
        self._last_write = 0.0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edge-optimizer", daemon=True)
        self._thread.start()

    def written(self, collection: str, points: int) -> None:
        with self._cond:
            self._pending[collection] = self._pending.get(collection, 0) + points
            self._last_write = time.monotonic()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _next(self) -> str | None:
        """The collection to optimise now, waiting until there is one (None: stopped)."""
        with self._cond:
            while not self._stopped:
                full = [c for c, n in self._pending.items() if n >= self._max_unindexed]
                idle_for = time.monotonic() - self._last_write
                if full or (self._pending and idle_for >= self._idle_s):
                    collection = full[0] if full else next(iter(self._pending))
                    del self._pending[collection]
                    return collection
                self._cond.wait(timeout=self._idle_s - idle_for if self._pending else None)
            return None

    def _run(self) -> None:
        while (collection := self._next()) is not None:
            try:
                self._store.optimize(collection)
            except UnknownCollection:
                pass
            except Exception:  # a failed optimisation leaves the data as it was: retry later
                log.exception("optimising %s failed", collection)


def _lock(path: Path) -> IO[str]:
    handle = (path / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreLocked(
            f"the embedded Qdrant store at {path} (QDRANT_PATH) is open in another process, most "
            "likely a running `feature-pipeline run`. Ask that process instead (the CLI does so on "
            "its query port), stop it, or run a Qdrant server and set QDRANT_URL."
        ) from None
    return handle


def _refuse_legacy(path: Path) -> None:
    """Local mode's files (`meta.json`, `collection/<name>/storage.sqlite`) are another format:
    reusing them silently would serve an empty store beside the old one."""
    if (path / "meta.json").exists() or (path / "collection").is_dir():
        raise LegacyStore(
            f"{path} (QDRANT_PATH) holds a store made by an older version (qdrant-client local "
            "mode), which this version does not read: move it away or delete it, then rebuild "
            "it with `feature-pipeline backfill FILE.jsonl...` or by re-publishing the documents "
            "(`feature-pipeline publish`), or set QDRANT_PATH to a new folder"
        )


def _vector_size(shard_dir: Path) -> int | None:
    config: dict[str, Any] = json.loads((shard_dir / "edge_config.json").read_text())
    vector = config.get("vectors", {}).get("")
    return None if vector is None else int(vector["size"])


def _filter(where: Match | None) -> edge.Filter | None:
    if not where:
        return None
    return edge.Filter(
        must=[
            edge.FieldCondition(key, match=edge.MatchValue(value)) for key, value in where.items()
        ]
    )
