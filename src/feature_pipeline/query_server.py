"""A small local HTTP service in the running pipeline: its status page, health, metrics, and
the store's reads while it holds the embedded store (only one process may open it). On
QUERY_HOST (loopback unless set: there is no authentication); GET only.

    GET /counts                       -> {"cleaned_posts": 87, ...}
    GET /search?q=TEXT&type=posts&k=5 -> [{"score": .., "content": .., ...}]
    GET /points?collection=vector_posts[&entry_id=..][&type=..][&with_vectors=1][&limit=N]
                                      -> [{"id": .., "payload": {..}[, "vector": [..]]}]
    GET /points/page?collection=C[&offset=ID][&limit=N][&where=JSON]
                                      -> {"points": [{"id", "payload"}], "next": ID or null}
    GET /points/by-id?collection=C&ids=ID,ID,...  -> [{"id", "payload"}] (those that exist)
    GET /status                       -> what the status page shows (JSON)
    GET /health                       -> 200 while the process serves
    GET /ready                        -> 200, or 503 {"waiting": {part: reason}}
    GET /metrics                      -> Prometheus text exposition
    GET /                             -> the status page (HTML)
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

from feature_pipeline import queries
from feature_pipeline.connectors.qdrant.store import FeatureStore, Match, Record
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import CONTENT_TYPE, metrics
from feature_pipeline.settings import Settings, SettingsError
from feature_pipeline.status import StatusReader, readiness

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"0.0.0.0"})


class QueryServerUnavailable(RuntimeError):
    pass


#: The status page, served at `/`: one file, no build step; it reads `/status` and `/search`.
STATUS_PAGE = files("feature_pipeline").joinpath("static/status.html")

Params = dict[str, str]
#: A route: the query parameters -> (HTTP status, JSON-able body).
Route = Callable[[Params], tuple[int, Any]]


def routes(settings: Settings, store: FeatureStore, status: StatusReader) -> dict[str, Route]:
    """Every GET path the service answers, besides `/` and `/metrics`."""

    def search(params: Params) -> tuple[int, Any]:
        hits = queries.search(
            settings,
            store,
            params.get("q", ""),
            DataType(params.get("type", "posts")),
            int(params.get("k", "5")),
        )
        return 200, hits

    def points(params: Params) -> tuple[int, Any]:
        where = {k: params[k] for k in ("entry_id", "type") if params.get(k)}
        limit = params.get("limit")
        found = queries.points(
            store,
            params.get("collection", ""),
            where,
            with_vectors=params.get("with_vectors") == "1",
            limit=int(limit) if limit else None,
        )
        return 200, found

    def points_page(params: Params) -> tuple[int, Any]:
        page, next_offset = store.scroll_page(
            params["collection"],
            offset=params.get("offset"),
            limit=int(params.get("limit", "1000")),
            where=json.loads(params.get("where", "{}")) or None,
        )
        return 200, {"points": [asdict(p) for p in page], "next": next_offset}

    def points_by_id(params: Params) -> tuple[int, Any]:
        ids = [i for i in params.get("ids", "").split(",") if i]
        return 200, [asdict(p) for p in store.retrieve(params["collection"], ids)]

    def ready(_: Params) -> tuple[int, Any]:
        waiting = readiness.reasons()
        return (503, {"ready": False, "waiting": waiting}) if waiting else (200, {"ready": True})

    return {
        "/counts": lambda _: (200, queries.counts(store)),
        "/search": search,
        "/points": points,
        "/points/page": points_page,
        "/points/by-id": points_by_id,
        "/status": lambda _: (200, status.status()),
        "/health": lambda _: (200, {"alive": True}),
        "/ready": ready,
    }


def start_query_server(
    settings: Settings, store: FeatureStore, status: StatusReader | None = None
) -> ThreadingHTTPServer:
    """Serve queries on QUERY_HOST:QUERY_PORT from a daemon thread."""
    status = status or StatusReader(settings, store, metrics)
    answers = routes(settings, store, status)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            if url.path == "/":
                self._send(200, STATUS_PAGE.read_bytes(), "text/html; charset=utf-8")
                return
            if url.path == "/metrics":
                status.queue_depths()  # the depth gauges, fresh within CACHE_S
                self._send(200, metrics.prometheus().encode(), CONTENT_TYPE)
                return
            route = answers.get(url.path)
            if route is None:
                self._reply(404, {"error": f"no such path {url.path}"})
                return
            try:
                self._reply(*route(params))
            except (ValueError, KeyError) as exc:
                self._reply(400, {"error": str(exc)})

        def _reply(self, status_code: int, body: Any) -> None:
            self._send(status_code, json.dumps(body).encode(), "application/json")

        def _send(self, status_code: int, data: bytes, content_type: str) -> None:
            self.send_response(status_code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("query server: " + format, *args)

    try:
        server = ThreadingHTTPServer((settings.query_host, settings.query_port), Handler)
    except OSError as exc:  # taken since the start-up check (`startup.check_query_port`)
        raise SettingsError(
            f"QUERY_PORT={settings.query_port} on QUERY_HOST={settings.query_host} cannot be "
            f"served: {exc.strerror or exc}"
        ) from None
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
