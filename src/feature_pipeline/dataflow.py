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
from feature_pipeline.processing.continued import continued_changes
from feature_pipeline.processing.parallel import process_in_threads, processing_pool
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

_processors: dict[int, DocumentProcessor] = {}
_processors_lock = threading.Lock()


def _processor(settings: Settings) -> DocumentProcessor:
    """One processor (tokenizers) per process, shared by its workers."""
    with _processors_lock:
        return _processors.setdefault(id(settings), DocumentProcessor(settings))


def _process_batch(
    settings: Settings, messages: list[InboundMessage]
) -> list[DocumentChange | DeadLetter]:
    """Parse, clean and chunk one source batch, in order: on this process's threads
    (PROCESSING_THREADS), or on the processing pool's cores (PROCESSING_PROCESSES). A long
    document's continued event takes the change kept from its last turn instead, when this
    process has it."""
    with metrics.timed("processing_seconds"):
        kept = [continued_changes.take(message) for message in messages]
        todo = [message for message, change in zip(messages, kept, strict=True) if change is None]
        if not todo:
            processed: list[DocumentChange | DeadLetter] = []
        elif settings.processing_processes:
            processed = processing_pool(settings).process(todo)
        else:
            processed = process_in_threads(_processor(settings), todo, settings.processing_threads)
        made = iter(processed)
        return [change if change is not None else next(made) for change in kept]


def build_dataflow(
    settings: Settings,
    source: Source[InboundMessage],
    features: FeatureStoreSink,
    dead_letters: Sink[tuple[str, DeadLetter]],
    name: str = "feature_pipeline",
) -> Dataflow:
    if settings.processing_processes:
        processing_pool(settings)  # started before the first message, see ProcessingPool
    else:
        _processor(settings).warm_up()
    flow = Dataflow(name)
    messages = op.input("read", flow, source)
    processed = op.flat_map_batch("process", messages, lambda ms: _process_batch(settings, ms))
    split = op.branch("split_dead_letters", processed, lambda x: isinstance(x, DocumentChange))
    changes: op.Stream[DocumentChange] = split.trues  # type: ignore[assignment]
    rejected: op.Stream[DeadLetter] = split.falses  # type: ignore[assignment]
    if isinstance(features, FeatureStoreSink):  # a test may pass a plain sink
        features.dead_letters_to(dead_letters)  # changes the store refuses go the same way
    op.output("write_features", op.key_on("by_document", changes, lambda c: c.key), features)
    op.output("write_dead_letters", op.key_on("by_source", rejected, lambda d: "dlq"), dead_letters)
    return flow
