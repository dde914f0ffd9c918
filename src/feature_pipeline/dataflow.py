r"""The Bytewax dataflow: read messages -> process (parse, clean, chunk) -> write features.

source --process--> DocumentChange --key by document--> FeatureStoreSink (Qdrant)
                \--> DeadLetter    ------------------> dead-letter sink (queue or file)
"""

from __future__ import annotations

import threading

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.metrics import metrics
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

_processors: dict[int, DocumentProcessor] = {}
_processors_lock = threading.Lock()


def _processor(settings: Settings) -> DocumentProcessor:
    """One processor (tokenizers) per process, shared by its workers."""
    with _processors_lock:
        return _processors.setdefault(id(settings), DocumentProcessor(settings))


def _process(settings: Settings, message: InboundMessage) -> DocumentChange | DeadLetter:
    with metrics.timed("processing_seconds"):
        return _processor(settings).process(message)


def build_dataflow(
    settings: Settings,
    source: Source[InboundMessage],
    features: FeatureStoreSink,
    dead_letters: Sink[tuple[str, DeadLetter]],
    name: str = "feature_pipeline",
) -> Dataflow:
    flow = Dataflow(name)
    messages = op.input("read", flow, source)
    processed = op.map("process", messages, lambda m: _process(settings, m))
    split = op.branch("split_dead_letters", processed, lambda x: isinstance(x, DocumentChange))
    changes: op.Stream[DocumentChange] = split.trues  # type: ignore[assignment]
    rejected: op.Stream[DeadLetter] = split.falses  # type: ignore[assignment]
    op.output("write_features", op.key_on("by_document", changes, lambda c: c.key), features)
    op.output("write_dead_letters", op.key_on("by_source", rejected, lambda d: "dlq"), dead_letters)
    return flow
