"""Start-up checks that need no model: each failure is one line naming the variable (exit 2).

They run before the embedding models load (15-60 s), so a bad setting or an unusable place
fails in moments: model folders and chunk sizes (from the model's files), the query port, the
store folder or the Qdrant server.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import warnings

from feature_pipeline.connectors.qdrant.location import prepare_store_folder
from feature_pipeline.connectors.retry import describe_error, retry_with_backoff
from feature_pipeline.domain.types import DataType
from feature_pipeline.redaction import redact
from feature_pipeline.settings import Settings, SettingsError

#: How long one-shot queries (search, counts) wait for a Qdrant server before giving up.
QUERY_STORE_WAIT_S = 3.0


def check_models(settings: Settings, data_types: tuple[DataType, ...] = tuple(DataType)) -> None:
    """Every configured model is a local folder, and its chunk size fits its window (the one
    place this is checked: before the model loads, from the folder's files)."""
    from feature_pipeline.processing.chunking import model_window
    from feature_pipeline.processing.embedding import ModelNotFound, resolve_model_path

    for data_type in data_types:
        variable = f"MODEL_{data_type.value.upper()}"
        try:
            path = resolve_model_path(settings.model_for(data_type))
        except ModelNotFound as exc:
            raise SettingsError(f"{variable}: {exc}") from None
        window = model_window(path)
        if window is None:  # sentence-transformers could not load it either: say so now
            raise SettingsError(
                f"{variable}: {path} does not say how many word pieces the model reads "
                "(max_seq_length in sentence_bert_config.json, or max_position_embeddings in "
                "config.json and model_max_length in tokenizer_config.json)"
            )
        max_seq_length, special = window
        limit = max_seq_length - special
        size = settings.chunk_size_for(data_type)
        if size > limit:
            raise SettingsError(
                f"CHUNK_SIZE_{data_type.value.upper()}={size} exceeds what "
                f"{settings.model_for(data_type)} reads: {max_seq_length} word pieces including "
                f"{special} special tokens, so at most {limit}"
            )


def check_query_port(settings: Settings) -> None:
    """The query service's address can be bound (nothing else listens on QUERY_PORT)."""
    if not settings.query_port:
        return
    address = (settings.query_host, settings.query_port)
    try:
        with socket.create_server(address, reuse_port=False) as server:
            server.close()
    except OSError as exc:
        raise SettingsError(
            f"QUERY_PORT={settings.query_port} on QUERY_HOST={settings.query_host} cannot be "
            f"served: {exc.strerror or exc}. Stop what holds it, pick another port, or set "
            "QUERY_PORT=0 to run without the query service."
        ) from None


def check_store(settings: Settings, *, give_up_after_s: float) -> None:
    """The embedded store's folder is writable and no other process holds it, or the Qdrant
    server answers (retried)."""
    if not settings.qdrant_url:
        from feature_pipeline.connectors.qdrant.store import FeatureStore, StoreLocked

        prepare_store_folder(settings.qdrant_path)
        try:  # opened now, kept open: the models load next
            FeatureStore.open(settings)
        except StoreLocked as exc:
            raise SettingsError(str(exc)) from None
        return
    wait_for_store_server(settings, give_up_after_s=give_up_after_s)


def wait_for_store_server(
    settings: Settings, *, give_up_after_s: float, log_level: int = logging.WARNING
) -> None:
    """Ask the Qdrant server at QDRANT_URL for its collections until it answers, with backoff."""
    from feature_pipeline.connectors.qdrant.sink import STORE_ERRORS
    from feature_pipeline.connectors.qdrant.store import FeatureStore

    url = redact(str(settings.qdrant_url))
    # qdrant-client warns from a thread of its own that it could not read the server's version
    # when the server is down: the line below says so, naming the variable.
    warnings.filterwarnings(
        "ignore", message="Failed to obtain server version", category=UserWarning
    )
    try:
        retry_with_backoff(
            lambda: FeatureStore.open(settings).counts(),
            f"reaching the Qdrant server at {url} (QDRANT_URL)",
            retry_on=STORE_ERRORS,
            give_up_after_s=give_up_after_s,
            log_level=log_level,
        )
    except STORE_ERRORS as exc:
        raise SettingsError(
            f"QDRANT_URL={url}: the Qdrant server did not answer within {give_up_after_s:g}s "
            f"({redact(describe_error(exc))}). Start it, fix QDRANT_URL (or QDRANT_API_KEY), or "
            "unset QDRANT_URL to use the embedded store at QDRANT_PATH."
        ) from None


def check_broker(settings: Settings) -> None:
    """The broker accepts RABBITMQ_URL's credentials and the topology (the consistent-hash
    plugin). A broker that does not answer yet is no error here: `run` waits for it."""
    from pika.exceptions import AMQPConnectionError, AMQPError

    from feature_pipeline.connectors.rabbitmq.publisher import BrokerRefused, connect
    from feature_pipeline.connectors.rabbitmq.topology import declare_topology

    try:
        connection = connect(settings, attempts=1)
    except BrokerRefused as exc:
        raise SettingsError(f"RABBITMQ_URL: {exc.reason} ({exc.url})") from None
    except AMQPConnectionError as exc:
        logging.getLogger(__name__).warning(
            "RabbitMQ does not answer yet (%s); `run` waits for it", redact(describe_error(exc))
        )
        return
    try:
        declare_topology(connection.channel(), settings)  # a TopologyError says what to fix
    finally:
        if connection.is_open:
            with contextlib.suppress(AMQPError):
                connection.close()


def check_service(settings: Settings, *, query_server: bool) -> None:
    """Everything `run` and `backfill` need before loading the models."""
    check_models(settings)
    if query_server:
        check_query_port(settings)
    check_store(settings, give_up_after_s=settings.qdrant_startup_wait_s)
