"""PROCESSING_PROCESSES and PROCESSING_THREADS: the dataflow's process step on a pool of processes,
or on threads, gives exactly what one thread of the worker gives, in the same order, dead letters
included."""

from __future__ import annotations

import json

from bytewax.testing import TestingSink, TestingSource, run_main

from feature_pipeline.connectors.files import infer_type, line_to_body
from feature_pipeline.dataflow import build_dataflow
from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing.parallel import balanced_tasks, close_processing_pools
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


def _run(processes: int, messages: list[InboundMessage], threads: int = 1) -> tuple[list, list]:
    settings = load_settings(
        _env_file=None, processing_processes=processes, processing_threads=threads
    )
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


def test_threads_give_the_same_changes_in_the_same_order() -> None:
    messages = _messages()
    one_thread = _run(0, messages, threads=1)
    threaded = _run(0, messages, threads=3)
    assert len(one_thread[0]) == len(messages) - 1 and len(one_thread[1]) == 1
    assert threaded == one_thread
    versions = [c.ts for key, c in threaded[0] if key == threaded[0][-1][0]]
    assert versions[-2:] == [1, 2]


def test_tasks_are_balanced_by_size_and_cover_every_message_once() -> None:
    # A batch like the benchmark's: many small posts, a few large repositories at the end.
    sizes = [2_000] * 87 + [40_000] * 5 + [507_000, 401_000, 314_000, 224_000, 220_000, 187_000]
    tasks = balanced_tasks(sizes, 8)
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))
    assert len(tasks) <= 8
    loads = [sum(sizes[i] for i in task) for task in tasks]
    assert loads == sorted(loads, reverse=True)  # the largest task is sent first
    # Each large document in a task of its own; no task above the largest document.
    large = [i for i, size in enumerate(sizes) if size > 100_000]
    assert len({next(t for t, task in enumerate(tasks) if i in task) for i in large}) == 6
    assert max(loads) == max(sizes)
    # Two processes taking the tasks in order end within one large document of each other.
    ends = [0, 0]
    for load in loads:
        ends[ends.index(min(ends))] += load
    assert abs(ends[0] - ends[1]) <= max(sizes)


def test_fewer_messages_than_tasks_and_an_empty_batch() -> None:
    assert balanced_tasks([5, 1], 8) == [[0], [1]]
    assert balanced_tasks([], 8) == []
