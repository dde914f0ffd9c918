"""The running pipeline's query server: loopback by default, every interface when asked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from feature_pipeline.connectors.qdrant.store import FeatureStore
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
