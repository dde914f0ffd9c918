r"""The Bytewax dataflow: read messages -> process (parse, clean, chunk) -> write features.

source --process--> DocumentChange --key by document--> FeatureStoreSink (Qdrant)
                \--> DeadLetter    ------------------> dead-letter sink (queue or file)
"""

from __future__ import annotations

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

from feature_pipeline.connectors.qdrant.sink import FeatureStoreSink
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.metrics import metrics
from feature_pipeline.processing.continued import continued_changes
from feature_pipeline.processing.parallel import process_batch, start_processing
from feature_pipeline.settings import Settings


def _process_source_batch(
    settings: Settings, messages: list[InboundMessage]
) -> list[DocumentChange | DeadLetter]:
    """Parse, clean and chunk one source batch, in order (`process_batch`: threads or the
    pool). A long document's continued event takes the change kept from its last turn instead,
    when this process has it."""
    with metrics.timed("processing_seconds"):
        kept = [continued_changes.take(message) for message in messages]
        todo = [message for message, change in zip(messages, kept, strict=True) if change is None]
        made = iter(process_batch(settings, todo) if todo else [])
        return [change if change is not None else next(made) for change in kept]


def build_dataflow(
    settings: Settings,
    source: Source[InboundMessage],
    features: FeatureStoreSink,
    dead_letters: Sink[tuple[str, DeadLetter]],
    name: str = "feature_pipeline",
) -> Dataflow:
    start_processing(settings)
    flow = Dataflow(name)
    messages = op.input("read", flow, source)
    processed = op.flat_map_batch(
        "process", messages, lambda ms: _process_source_batch(settings, ms)
    )
    split = op.branch("split_dead_letters", processed, lambda x: isinstance(x, DocumentChange))
    changes: op.Stream[DocumentChange] = split.trues  # type: ignore[assignment]
    rejected: op.Stream[DeadLetter] = split.falses  # type: ignore[assignment]
    if isinstance(features, FeatureStoreSink):  # a test may pass a plain sink
        features.dead_letters_to(dead_letters)  # changes the store refuses go the same way
    op.output("write_features", op.key_on("by_document", changes, lambda c: c.key), features)
    op.output("write_dead_letters", op.key_on("by_source", rejected, lambda d: "dlq"), dead_letters)
    return flow
