"""What only the embedded store (Qdrant Edge) must do: persist across opens, survive kill -9
during heavy writes, admit one process at a time, refuse an older version's files with a
one-line message, and build its indexes in the background once writes pause."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from feature_pipeline.connectors.qdrant.edge import EdgeStore, LegacyStore
from feature_pipeline.connectors.qdrant.store import Point, StoreLocked
from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import Settings

from .conftest import settings_env

POSTS = DataType.POSTS.vector_collection

#: Writes batches of 256 384-d points as fast as it can and prints the last id of each batch
#: once `upsert` returned: what the sink would then ack. The optimiser runs every 2,000 points,
#: so a kill also lands during index builds.
WRITER = """
import random, sys, uuid
from pathlib import Path
from feature_pipeline.connectors.qdrant.edge import EdgeStore
from feature_pipeline.connectors.qdrant.store import Point
from feature_pipeline.domain.types import DataType

store = EdgeStore(Path(sys.argv[1]), optimize_max_unindexed=2_000)
store.ensure_collections(dict.fromkeys(DataType, 384))
rng = random.Random(int(sys.argv[2]))
n = int(sys.argv[3])
while True:
    batch = [
        Point(str(uuid.UUID(int=n + i)), {"entry_id": f"e{n + i}", "type": "posts"},
              [rng.random() for _ in range(384)])
        for i in range(256)
    ]
    store.upsert(DataType.POSTS.vector_collection, batch)
    store.upsert(DataType.POSTS.cleaned_collection, [Point(str(uuid.UUID(int=n)), {"n": n})])
    n += 256
    print(n, flush=True)
"""


def test_points_persist_across_close_and_reopen(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    store.ensure_collections({DataType.POSTS: 4})
    store.upsert(POSTS, [Point(str(uuid.UUID(int=1)), {"entry_id": "e1"}, [1, 0, 0, 0])])
    store.close()
    reopened = EdgeStore(tmp_path)
    assert [r.payload for r in reopened.scroll(POSTS)] == [{"entry_id": "e1"}]
    reopened.close()


@pytest.mark.slow
def test_kill_9_during_heavy_writes_loses_nothing_acked(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    path = tmp_path / "qdrant"
    acked, trials = 0, 3
    for trial in range(trials):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(path), str(trial), str(acked)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        # Kill at a random moment between 8 and 24 acked batches (2,000-6,000 points).
        target = random.Random(trial).randint(8, 24)
        for _ in range(target):
            line = writer.stdout.readline()
            assert line, "the writer died on its own"
            acked = int(line)
        time.sleep(random.Random(trial).random() * 0.05)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        # What it printed after the last line read was acked too: read it all.
        acked = max([acked, *(int(line) for line in writer.stdout)])

        started = time.perf_counter()
        store = EdgeStore(path)  # opens: no lock left behind, log replayed
        reopen_s = time.perf_counter() - started
        ids = [str(uuid.UUID(int=n)) for n in range(acked)]
        assert len(store.retrieve(POSTS, ids)) == acked, f"trial {trial}: acked points lost"
        assert store.count(POSTS) >= acked
        assert store.retrieve(DataType.POSTS.cleaned_collection, [str(uuid.UUID(int=acked - 256))])
        assert store.search(DataType.POSTS, [1.0] * 384, 3)
        store.close()
        assert reopen_s < 30


def test_a_second_process_is_refused_with_store_locked(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    opener = (
        "import sys; from pathlib import Path\n"
        "from feature_pipeline.connectors.qdrant.edge import EdgeStore\n"
        "from feature_pipeline.connectors.qdrant.store import StoreLocked\n"
        "try:\n    EdgeStore(Path(sys.argv[1]))\nexcept StoreLocked:\n    sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", opener, str(tmp_path)], timeout=120)
    assert other.returncode == 3
    with pytest.raises(StoreLocked, match="QDRANT_PATH"):
        EdgeStore(tmp_path)  # a second opener in this process is refused alike
    store.close()
    assert (
        subprocess.run([sys.executable, "-c", opener, str(tmp_path)], timeout=120).returncode == 0
    )


def _local_mode_store(path: Path) -> None:
    """What the previous version left at QDRANT_PATH: qdrant-client local mode's files."""
    client = QdrantClient(path=str(path))
    client.create_collection("cleaned_posts", vectors_config={})
    client.upsert("cleaned_posts", [models.PointStruct(id=1, vector={}, payload={"a": 1})])
    client.close()


def test_an_older_versions_store_is_refused_saying_how_to_rebuild(tmp_path: Path) -> None:
    _local_mode_store(tmp_path)
    with pytest.raises(LegacyStore, match="backfill"):
        EdgeStore(tmp_path)
    assert not (tmp_path / "shards").exists()  # nothing written beside the old files


@pytest.mark.slow
def test_the_cli_says_so_in_one_line_without_a_traceback(settings: Settings) -> None:
    _local_mode_store(settings.qdrant_path)
    for command in (["counts"], ["points", "cleaned_posts"]):
        done = subprocess.run(
            [sys.executable, "-m", "feature_pipeline.cli", *command],
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "older version" in done.stderr and "feature-pipeline backfill" in done.stderr


def test_indexes_are_built_once_writes_pause(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path, optimize_idle_s=1.0)
    store.ensure_collections({DataType.POSTS: 4})
    for n in range(20):
        store.upsert(POSTS, [Point(str(uuid.UUID(int=n + 1)), {"entry_id": "e"}, [1, n, 0, 0])])
    assert store.optimizations == 0  # not while writing
    deadline = time.monotonic() + 30
    while store.optimizations == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.optimizations == 1
    assert store.count(POSTS) == 20
    store.close()


def test_full_segments_are_indexed_and_sealed_not_merged_into_a_growing_one(
    tmp_path: Path,
) -> None:
    # 2,000-point segments (100,000 in production); no idle optimisation, only full tails.
    store = EdgeStore(tmp_path, segment_points=2_000, optimize_idle_s=3600)
    store.ensure_collections({DataType.POSTS: 8})
    rng = random.Random(0)
    vectors = [[rng.gauss(0, 1) for _ in range(8)] for _ in range(6_000)]
    for first in range(0, 6_000, 1_000):
        store.upsert(
            POSTS,
            [
                Point(str(uuid.UUID(int=n + 1)), {"n": n}, vectors[n])
                for n in range(first, first + 1_000)
            ],
        )
    deadline = time.monotonic() + 60
    while store.optimizations < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    segments, indexed = store.segments(POSTS)
    assert store.optimizations == 3
    assert indexed == 6_000  # every full tail was indexed ...
    assert segments >= 3  # ... into a segment of its own, never merged beyond 2,000 points
    for n in (0, 2_999, 5_999):  # each segment is searched
        assert store.search(DataType.POSTS, vectors[n], 1)[0].payload == {"n": n}
    store.close()


def test_indexed_searches_find_the_exact_top_10(tmp_path: Path) -> None:
    # 10,000 384-d points (15 MB of vectors, past the engine's 10 MB exact-search threshold, so
    # the segment is searched through its HNSW graph and int8 copies), drawn around 200
    # centres so that near neighbours exist, as with real embeddings.
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((200, 384)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        v = centres[rng.integers(0, 200, n)] + rng.standard_normal((n, 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    vectors, queries = draw(10_000), draw(50)
    types = ("posts", "articles", "repositories")
    store = EdgeStore(tmp_path, segment_points=20_000, optimize_idle_s=3600)
    store.ensure_collections({DataType.POSTS: 384})
    rows = vectors.tolist()
    for first in range(0, 10_000, 1_000):
        store.upsert(
            POSTS,
            [
                Point(str(uuid.UUID(int=n + 1)), {"n": n, "type": types[n % 3]}, rows[n])
                for n in range(first, first + 1_000)
            ],
        )
    store.optimize(POSTS)
    assert store.segments(POSTS)[1] == 10_000  # searched through the graph, not exactly

    scores = queries @ vectors.T
    everything, posts = np.full(10_000, True), np.arange(10_000) % 3 == 0
    for where, allowed in ((None, everything), ({"type": "posts"}, posts)):
        exact = np.argsort(-np.where(allowed, scores, -np.inf), axis=1)[:, :10]
        found = [
            {hit.payload["n"] for hit in store.search(DataType.POSTS, q.tolist(), 10, where)}
            for q in queries
        ]
        recall = np.mean([len(f & set(e.tolist())) / 10 for f, e in zip(found, exact, strict=True)])
        assert recall >= 0.95, (where, recall)
    store.close()
