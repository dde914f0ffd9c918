"""A small local HTTP service in the running pipeline, so `search`/`counts` work while it holds
the embedded store (only one process may open it). On QUERY_HOST (loopback unless set: there is
no authentication); JSON; GET only.

    GET /counts                       -> {"cleaned_posts": 87, ...}
    GET /search?q=TEXT&type=posts&k=5 -> [{"score": .., "content": .., ...}]
    GET /points?collection=vector_posts[&entry_id=..][&type=..][&with_vectors=1][&limit=N]
                                      -> [{"id": .., "payload": {..}[, "vector": [..]]}]
    GET /points/page?collection=C[&offset=ID][&limit=N][&where=JSON]
                                      -> {"points": [{"id", "payload"}], "next": ID or null}
    GET /points/by-id?collection=C&ids=ID,ID,...  -> [{"id", "payload"}] (those that exist)
    GET /metrics                      -> Prometheus text
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from feature_pipeline import queries
from feature_pipeline.connectors.qdrant.store import FeatureStore, Match, Record
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"0.0.0.0"})


class QueryServerUnavailable(RuntimeError):
    pass


def start_query_server(settings: Settings, store: FeatureStore) -> ThreadingHTTPServer:
    """Serve queries on QUERY_HOST:QUERY_PORT from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            try:
                if url.path == "/counts":
                    self._reply(200, queries.counts(store))
                elif url.path == "/search":
                    hits = queries.search(
                        settings,
                        store,
                        params.get("q", ""),
                        DataType(params.get("type", "posts")),
                        int(params.get("k", "5")),
                    )
                    self._reply(200, hits)
                elif url.path == "/points":
                    where = {k: params[k] for k in ("entry_id", "type") if params.get(k)}
                    limit = params.get("limit")
                    found = queries.points(
                        store,
                        params.get("collection", ""),
                        where,
                        with_vectors=params.get("with_vectors") == "1",
                        limit=int(limit) if limit else None,
                    )
                    self._reply(200, found)
                elif url.path == "/points/page":
                    points, next_offset = store.scroll_page(
                        params["collection"],
                        offset=params.get("offset"),
                        limit=int(params.get("limit", "1000")),
                        where=json.loads(params.get("where", "{}")) or None,
                    )
                    self._reply(200, {"points": [asdict(p) for p in points], "next": next_offset})
                elif url.path == "/points/by-id":
                    ids = [i for i in params.get("ids", "").split(",") if i]
                    points = store.retrieve(params["collection"], ids)
                    self._reply(200, [asdict(p) for p in points])
                elif url.path == "/metrics":
                    self._reply(200, metrics.prometheus(), content_type="text/plain")
                else:
                    self._reply(404, {"error": f"no such path {url.path}"})
            except (ValueError, KeyError) as exc:
                self._reply(400, {"error": str(exc)})

        def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("query server: " + format, *args)

    server = ThreadingHTTPServer((settings.query_host, settings.query_port), Handler)
    threading.Thread(target=server.serve_forever, name="query-server", daemon=True).start()
    log.info("serving queries on http://%s:%d", settings.query_host, server.server_address[1])
    return server


def _client_host(settings: Settings) -> str:
    # A server on every interface is reached on loopback from its own host.
    return "127.0.0.1" if settings.query_host in WILDCARD_HOSTS else settings.query_host


def ask_running_pipeline(settings: Settings, path: str, **params: object) -> Any:
    """GET a path of the running pipeline's query server."""
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
    host = _client_host(settings)
    url = f"http://{host}:{settings.query_port}{path}" + (f"?{query}" if query else "")
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(json.loads(exc.read()).get("error", str(exc))) from None
    except OSError as exc:
        raise QueryServerUnavailable(
            f"the store is locked by another process and no pipeline answers on {url}: {exc}"
        ) from None


class RunningPipelineReader:
    """The store's read-only views (`store.PointReader`), asked page by page of the running
    pipeline that holds the embedded store."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def scroll_page(
        self,
        collection: str,
        *,
        offset: str | None,
        limit: int,
        where: Match | None = None,
        with_vectors: bool = False,
    ) -> tuple[list[Record], str | None]:
        if with_vectors:
            raise ValueError("the running pipeline serves payloads only")
        params: dict[str, object] = {"collection": collection, "limit": limit}
        if offset is not None:
            params["offset"] = offset
        if where:
            params["where"] = json.dumps(dict(where))
        page = ask_running_pipeline(self._settings, "/points/page", **params)
        return [Record(**p) for p in page["points"]], page["next"]

    def retrieve(
        self, collection: str, ids: Sequence[str], *, with_vectors: bool = False
    ) -> list[Record]:
        if with_vectors:
            raise ValueError("the running pipeline serves payloads only")
        if not ids:
            return []
        found = ask_running_pipeline(
            self._settings, "/points/by-id", collection=collection, ids=",".join(ids)
        )
        return [Record(**p) for p in found]
