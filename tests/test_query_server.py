"""The running pipeline's query server: loopback by default, every interface when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from feature_pipeline import queries
from feature_pipeline.connectors.qdrant.store import FeatureStore, Point
from feature_pipeline.domain.types import DataType
from feature_pipeline.query_server import (
    QueryServerUnavailable,
    ask_running_pipeline,
    start_query_server,
)
from feature_pipeline.settings import Settings, SettingsError, load_settings


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[str, Settings]]:
    """(the address it listens on, settings that ask it) while a query server runs."""
    server = start_query_server(settings, FeatureStore.open(settings))
    try:
        host, port = server.server_address[:2]
        yield str(host), settings.model_copy(update={"query_port": port})
    finally:
        server.shutdown()
        server.server_close()


def test_by_default_it_listens_on_loopback_only(settings: Settings) -> None:
    with serving(settings) as (host, asked):
        assert host == "127.0.0.1"
        assert ask_running_pipeline(asked, "/counts") == FeatureStore.open(settings).counts()


def test_query_host_0000_listens_everywhere_and_is_asked_on_loopback(settings: Settings) -> None:
    with serving(settings.model_copy(update={"query_host": "0.0.0.0"})) as (host, asked):
        assert host == "0.0.0.0"
        assert ask_running_pipeline(asked, "/counts") == FeatureStore.open(settings).counts()
    with pytest.raises(QueryServerUnavailable, match="no pipeline answers"):
        ask_running_pipeline(asked, "/counts")


def test_an_empty_query_host_is_refused_naming_it() -> None:
    with pytest.raises(SettingsError, match="QUERY_HOST"):
        load_settings(_env_file=None, query_host="")


def test_points_are_listed_through_the_service_as_from_the_store(settings: Settings) -> None:
    store = FeatureStore.open(settings)
    store.ensure_collections({DataType.POSTS: 3})
    store.upsert(
        "vector_posts",
        [
            Point(
                f"00000000-0000-0000-0000-00000000000{n}",
                {"entry_id": f"e{n % 2}", "type": "posts"},
                [1, n, 0],
            )
            for n in range(1, 6)
        ],
    )
    with serving(settings) as (_, asked):
        listed = ask_running_pipeline(
            asked, "/points", collection="vector_posts", entry_id="e1", with_vectors=1, limit=2
        )
        assert listed == queries.points(
            store, "vector_posts", {"entry_id": "e1"}, with_vectors=True, limit=2
        )
        assert len(listed) == 2 and all(len(p["vector"]) == 3 for p in listed)
        assert len(ask_running_pipeline(asked, "/points", collection="vector_posts")) == 5
        with pytest.raises(ValueError, match="no collection 'nope'"):
            ask_running_pipeline(asked, "/points", collection="nope")
