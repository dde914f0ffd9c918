"""PROCESSING_PROCESSES: the dataflow's process step on a pool of processes gives exactly what it
gives in the worker, in the same order, dead letters included."""

from __future__ import annotations

import json

from bytewax.testing import TestingSink, TestingSource, run_main

from feature_pipeline.connectors.files import infer_type, line_to_body
from feature_pipeline.dataflow import build_dataflow
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing.parallel import close_processing_pools
from feature_pipeline.settings import load_settings

from .conftest import SAMPLES


def _messages() -> list[InboundMessage]:
    messages = []
    for path in sorted(SAMPLES.glob("*.jsonl")):
        data_type = infer_type(path)
        if data_type is None:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            messages.append(InboundMessage(source=path.name, body=line_to_body(line, data_type)))
    # Poison, and two versions of one post: order within a document must hold.
    messages.insert(3, InboundMessage(source="q", body=b"{not json"))
    post = json.loads(next(m for m in messages if m.source == "posts.jsonl").body)
    for version in (1, 2):
        event = {"op": "update", "type": "posts", "entry_id": post["entry_id"], "ts": version}
        document = {k: v for k, v in post.items() if k not in ("type", "entry_id")}
        document["content"] = {"text": f"Version {version}. " + document["content"]["text"]}
        messages.append(
            InboundMessage(source="q", body=json.dumps({**event, "document": document}).encode())
        )
    return messages


def _run(processes: int, messages: list[InboundMessage]) -> tuple[list, list]:
    settings = load_settings(_env_file=None, processing_processes=processes)
    changes: list[tuple[str, DocumentChange]] = []
    dead: list[tuple[str, DeadLetter]] = []
    # Batches of 16 so the pool gets several batches, as from the broker.
    source = TestingSource(messages, batch_size=16)
    flow = build_dataflow(settings, source, TestingSink(changes), TestingSink(dead))  # type: ignore[arg-type]
    run_main(flow)
    return changes, dead


def test_a_pool_of_processes_gives_the_same_changes_in_the_same_order() -> None:
    messages = _messages()
    in_worker = _run(0, messages)
    try:
        pooled = _run(2, messages)
    finally:
        close_processing_pools()
    assert len(in_worker[0]) == len(messages) - 1 and len(in_worker[1]) == 1
    assert pooled == in_worker
    # Chunks keep their word-piece ids through the pool (they are pickled, not serialised).
    assert all(c.token_ids for _, change in pooled[0] for c in change.chunks)
    versions = [c.ts for key, c in pooled[0] if key == pooled[0][-1][0]]
    assert versions[-2:] == [1, 2]
