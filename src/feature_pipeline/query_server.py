"""A small local HTTP service in the running pipeline, so `search`/`counts` work while it holds
the embedded store (only one process may open it). On QUERY_HOST (loopback unless set: there is
no authentication); JSON; GET only.

    GET /counts                       -> {"cleaned_posts": 87, ...}
    GET /search?q=TEXT&type=posts&k=5 -> [{"score": .., "content": .., ...}]
    GET /metrics                      -> Prometheus text
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from feature_pipeline import queries
from feature_pipeline.connectors.qdrant.store import FeatureStore
from feature_pipeline.domain.types import DataType
from feature_pipeline.metrics import metrics
from feature_pipeline.settings import Settings, SettingsError

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
                elif url.path == "/metrics":
                    self._reply(200, metrics.prometheus(), content_type="text/plain")
                else:
                    self._reply(404, {"error": f"no such path {url.path}"})
            except ValueError as exc:
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
