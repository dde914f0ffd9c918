"""The FeatureStore contract, run against every implementation that can run here.

- `edge`: the embedded store (Qdrant Edge), the default.
- `server-api`: `ServerStore`, the QDRANT_URL implementation, on qdrant-client's in-memory mode.
  No Qdrant server binary is installable on this machine (no Docker, nothing on PyPI or apt
  ships one), so the client's in-memory mode stands in for the server: it takes the same client
  calls `ServerStore` makes, so this checks our translation to and from the server API, not the
  server's own engine (payload indexes, for one, are created only against a real server).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from feature_pipeline.connectors.qdrant.edge import EdgeStore
from feature_pipeline.connectors.qdrant.server import ServerStore
from feature_pipeline.connectors.qdrant.store import (
    SYNC_STATE_COLLECTION,
    FeatureStore,
    Point,
    UnknownCollection,
)
from feature_pipeline.domain.types import DataType

DIM = 4
POSTS = DataType.POSTS.vector_collection
CLEANED = DataType.POSTS.cleaned_collection


@pytest.fixture(params=["edge", "server-api"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeatureStore]:
    opened: FeatureStore
    if request.param == "edge":
        opened = EdgeStore(tmp_path / "qdrant")
    else:
        opened = ServerStore(QdrantClient(location=":memory:"), is_local=True)
    opened.ensure_collections(dict.fromkeys(DataType, DIM))
    yield opened
    opened.close()


def pid(n: int) -> str:
    return str(uuid.UUID(int=n))


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def chunk(n: int, vector: list[float], **payload: object) -> Point:
    return Point(pid(n), {"entry_id": f"e{n}", "type": "posts", **payload}, vector)


def test_collections_are_created_once_and_keep_their_vector_size(store: FeatureStore) -> None:
    expected = {SYNC_STATE_COLLECTION} | {
        name for t in DataType for name in (t.cleaned_collection, t.vector_collection)
    }
    assert store.collections() == sorted(expected)
    store.ensure_collections(dict.fromkeys(DataType, DIM))
    assert store.collections() == sorted(expected)
    with pytest.raises(ValueError, match="4-d vectors but the configured model makes 8-d"):
        store.ensure_collections({DataType.POSTS: 8})


def test_upsert_then_retrieve_returns_vectors_and_payloads(store: FeatureStore) -> None:
    store.upsert(POSTS, [chunk(1, unit(1, 0, 0, 0)), chunk(2, unit(0, 1, 0, 0), tags=[1, 2])])
    found = {r.id: r for r in store.retrieve(POSTS, [pid(1), pid(2), pid(3)], with_vectors=True)}
    assert set(found) == {pid(1), pid(2)}
    assert found[pid(2)].payload == {"entry_id": "e2", "type": "posts", "tags": [1, 2]}
    assert found[pid(1)].vector == pytest.approx([1, 0, 0, 0])
    assert store.retrieve(POSTS, [pid(1)])[0].vector is None
    assert store.chunks(DataType.POSTS, [pid(2)])[pid(2)].vector == pytest.approx([0, 1, 0, 0])


def test_payload_only_collections_hold_payloads_without_vectors(store: FeatureStore) -> None:
    store.upsert(CLEANED, [Point(pid(1), {"entry_id": "e1", "content": "text"})])
    (record,) = store.retrieve(CLEANED, [pid(1)], with_vectors=True)
    assert record.payload == {"entry_id": "e1", "content": "text"}
    assert record.vector is None


def test_upsert_replaces_the_whole_point(store: FeatureStore) -> None:
    store.upsert(POSTS, [chunk(1, unit(1, 0, 0, 0), old=True)])
    store.upsert(POSTS, [chunk(1, unit(0, 0, 1, 0))])
    (record,) = store.retrieve(POSTS, [pid(1)], with_vectors=True)
    assert "old" not in record.payload
    assert record.vector == pytest.approx([0, 0, 1, 0])
    assert store.count(POSTS) == 1


def test_delete_ids_removes_those_and_ignores_missing_ones(store: FeatureStore) -> None:
    store.upsert(POSTS, [chunk(n, unit(1, n, 0, 0)) for n in range(1, 6)])
    store.delete_ids(POSTS, [pid(2), pid(4), pid(99)])
    store.delete_ids(POSTS, [])
    assert sorted(r.id for r in store.scroll(POSTS)) == [pid(1), pid(3), pid(5)]


def test_count_and_counts_with_and_without_a_filter(store: FeatureStore) -> None:
    store.upsert(
        POSTS,
        [chunk(n, unit(1, n, 0, 0), platform="linkedin" if n % 2 else "x") for n in range(1, 8)],
    )
    assert store.count(POSTS) == 7
    assert store.count(POSTS, {"platform": "linkedin"}) == 4
    assert store.count(POSTS, {"platform": "linkedin", "entry_id": "e3"}) == 1
    counts = store.counts()
    assert counts[POSTS] == 7 and counts[CLEANED] == 0 and len(counts) == 7


def test_scroll_pages_in_id_order_filters_and_limits(store: FeatureStore) -> None:
    store.upsert(
        POSTS,
        [chunk(n, unit(1, n, 0, 0), type="posts" if n < 2_000 else "x") for n in range(1, 2_501)],
    )
    everything = store.scroll(POSTS)  # more than one page of 1,000
    assert [r.id for r in everything] == [pid(n) for n in range(1, 2_501)]
    page, offset = store.scroll_page(POSTS, offset=None, limit=10)
    assert [r.id for r in page] == [pid(n) for n in range(1, 11)] and offset == pid(11)
    assert len(store.scroll(POSTS, where={"type": "x"})) == 501
    limited = store.scroll(POSTS, where={"type": "posts"}, limit=1_500, with_vectors=True)
    assert len(limited) == 1_500 and all(r.vector is not None for r in limited)


def test_search_ranks_by_cosine_and_filters(store: FeatureStore) -> None:
    store.upsert(
        POSTS,
        [
            chunk(1, unit(1, 0, 0, 0), platform="a"),
            chunk(2, unit(1, 1, 0, 0), platform="b"),
            chunk(3, unit(0, 0, 1, 0), platform="a"),
        ],
    )
    hits = store.search(DataType.POSTS, unit(1, 0.1, 0, 0), 2)
    assert [h.payload["entry_id"] for h in hits] == ["e1", "e2"]
    assert hits[0].score == pytest.approx(unit(1, 0.1, 0, 0)[0], abs=1e-4)
    filtered = store.search(DataType.POSTS, unit(1, 0.1, 0, 0), 5, where={"platform": "a"})
    assert [h.payload["entry_id"] for h in filtered] == ["e1", "e3"]
    assert store.search(DataType.ARTICLES, unit(1, 0, 0, 0), 5) == []


def test_sync_states_reads_what_the_sync_writes(store: FeatureStore) -> None:
    state = {
        "type": "posts",
        "entry_id": "e1",
        "version": 7,
        "deleted": False,
        "chunk_ids": [pid(5)],
    }
    store.upsert(SYNC_STATE_COLLECTION, [Point(pid(1), state)])
    states = store.sync_states([pid(1), pid(2)])
    assert list(states) == [pid(1)]
    assert states[pid(1)].version == 7 and states[pid(1)].chunk_ids == frozenset({pid(5)})
    assert store.sync_states([]) == {}


def test_an_unknown_collection_is_a_value_error_naming_it(store: FeatureStore) -> None:
    with pytest.raises(UnknownCollection, match="nope"):
        store.count("nope")
    with pytest.raises(ValueError, match="nope"):
        store.scroll("nope")
