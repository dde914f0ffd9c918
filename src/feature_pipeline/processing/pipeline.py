"""Turns one inbound message into a `DocumentChange` (parse, clean, chunk) or a `DeadLetter`."""

from __future__ import annotations

import logging
import threading

from pydantic import ValidationError

import feature_pipeline.processing.handlers  # noqa: F401  (registers every data type's handlers)
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.domain.events import (
    ChangeEvent,
    DocumentTooLarge,
    InvalidEvent,
    describe_validation_error,
    parse_event,
)
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import TextEncoder, TokenSplitter, load_tokenizer
from feature_pipeline.processing.embedding import resolve_model_path
from feature_pipeline.processing.registry import MissingHandler, Step, registry
from feature_pipeline.settings import Settings

log = logging.getLogger(__name__)


class DocumentProcessor:
    """Per-process processing context: one tokenizer-backed splitter per data type; `process`
    may be called from several threads at once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._encoders: dict[str, TextEncoder] = {}
        self._splitters: dict[DataType, TokenSplitter] = {}
        self._lock = threading.Lock()

    def splitter_for(self, data_type: DataType) -> TokenSplitter:
        with self._lock:
            splitter = self._splitters.get(data_type)
            if splitter is None:
                splitter = self._splitters[data_type] = self._new_splitter(data_type)
            return splitter

    def _new_splitter(self, data_type: DataType) -> TokenSplitter:
        # One tokenizer per model, not per type: the types share a model by default, and
        # loading tokenizer.json takes ~30 ms that a fresh pipeline's first batch would pay.
        path = resolve_model_path(self._settings.model_for(data_type))
        encoder = self._encoders.get(path)
        if encoder is None:
            encoder = self._encoders[path] = TextEncoder(load_tokenizer(path))
        return TokenSplitter(
            encoder.tokenizer,
            max_tokens=self._settings.chunk_size_for(data_type),
            overlap_tokens=self._settings.chunk_overlap,
            encoder=encoder,
        )

    def warm_up(self) -> None:
        """Load every registered data type's splitter now (tokenizers, ~0.1 s), so that a fresh
        pipeline's first message does not wait for them."""
        for data_type in registry.data_types():
            self.splitter_for(data_type)

    def process(self, message: InboundMessage) -> DocumentChange | DeadLetter:
        """Never raises for bad input: every problem with the message becomes a dead letter."""
        try:
            event = parse_event(message.body, max_bytes=self._settings.max_document_bytes)
            return self.process_event(
                event,
                source=message.source,
                published_at=message.published_at,
                body=message.body,
                stamp=message.stamp,
            )
        except DocumentTooLarge as exc:
            return _dead_letter(message, "too_large", str(exc))
        except InvalidEvent as exc:
            return _dead_letter(message, "invalid_event", str(exc))
        except ValidationError as exc:
            return _dead_letter(message, "invalid_document", describe_validation_error(exc))
        except MissingHandler as exc:
            return _dead_letter(message, "unknown_type", str(exc))
        except Exception as exc:  # a handler bug on one document must not stop the pipeline
            log.exception("handler failed on a message from %s", message.source)
            return _dead_letter(message, "handler_error", f"{type(exc).__name__}: {exc}")

    def process_event(
        self,
        event: ChangeEvent,
        source: str = "",
        published_at: float | None = None,
        body: bytes = b"",
        stamp: str | None = None,
    ) -> DocumentChange:
        if event.is_delete:
            return DocumentChange(
                op=event.op,
                type=event.type,
                entry_id=event.entry_id,
                ts=event.ts,
                source=source,
                published_at=published_at,
                body=body,
                stamp=stamp,
            )
        raw = registry.get(event.type, Step.PARSE)(event.document)
        cleaned = registry.get(event.type, Step.CLEAN)(raw, event.entry_id)
        chunks = registry.get(event.type, Step.CHUNK)(cleaned, self.splitter_for(event.type))
        limit = self._settings.max_chunks_per_document
        if len(chunks) > limit:
            raise DocumentTooLarge(
                f"document makes {len(chunks):,} chunks ({len(cleaned.cleaned_content):,} "
                f"characters cleaned), over MAX_CHUNKS_PER_DOCUMENT ({limit:,})"
            )
        return DocumentChange(
            op=event.op,
            type=event.type,
            entry_id=event.entry_id,
            ts=event.ts,
            cleaned=cleaned,
            chunks=tuple(chunks),
            source=source,
            published_at=published_at,
            body=body,
            stamp=stamp,
        )


def _dead_letter(message: InboundMessage, error_type: str, reason: str) -> DeadLetter:
    log.warning("dead-lettering a message from %s: %s: %s", message.source, error_type, reason)
    return DeadLetter(
        source=message.source,
        body=message.body,
        reason=reason,
        error_type=error_type,
        stamp=message.stamp,
        redelivered=message.redelivered,
    )
