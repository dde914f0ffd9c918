"""The Bytewax behaviour the source's acknowledgements rest on, checked on the pinned version.

The RabbitMQ source acks, in the first `next_batch()` after a `snapshot()`, every message read
before that snapshot. That is safe only if Bytewax calls `next_batch()` of the next epoch after
the whole dataflow, sinks included, has finished the closed epoch. Bytewax documents no such
callback; this test pins the behaviour, so an upgrade that changes it fails here first.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from bytewax.run import cli_main

ITEMS_PER_PART = 60


class Journal:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int]] = []  # (kind, partition, item)
        self._lock = threading.Lock()

    def add(self, kind: str, part: str, item: int) -> None:
        with self._lock:
            self.entries.append((kind, part, item))


class _CountingPartition(StatefulSourcePartition[tuple[str, int], None]):
    def __init__(self, part: str, journal: Journal) -> None:
        self._part = part
        self._journal = journal
        self._next = 0

    def next_batch(self) -> list[tuple[str, int]]:
        if self._next >= ITEMS_PER_PART:
            raise StopIteration
        item = self._next
        self._next += 1
        self._journal.add("read", self._part, item)
        time.sleep(0.005)
        return [(self._part, item)]

    def snapshot(self) -> None:
        self._journal.add("snapshot", self._part, self._next - 1)


class CountingSource(FixedPartitionedSource[tuple[str, int], None]):
    def __init__(self, journal: Journal, parts: list[str]) -> None:
        self._journal = journal
        self._parts = parts

    def list_parts(self) -> list[str]:
        return self._parts

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _CountingPartition:
        return _CountingPartition(for_part, self._journal)


class _SlowWriter(StatefulSinkPartition[tuple[str, int], None]):
    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def write_batch(self, items: list[tuple[str, int]]) -> None:
        time.sleep(0.03)  # slower than reading: writes lag behind the epoch boundary
        for part, item in items:
            self._journal.add("written", part, item)

    def snapshot(self) -> None:
        return None


class SlowSink(FixedPartitionedSink[tuple[str, int], None]):
    def __init__(self, journal: Journal, parts: int) -> None:
        self._journal = journal
        self._parts = parts

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self._parts)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SlowWriter:
        return _SlowWriter(self._journal)


@pytest.mark.parametrize("workers", [1, 2])
def test_next_batch_after_a_snapshot_runs_after_the_closed_epoch_is_written(workers: int) -> None:
    journal = Journal()
    parts = ["a", "b", "c"]
    flow = Dataflow("epoch_contract")
    # Items are (partition, number), so the sink can say which read it wrote.
    numbers = op.input("read", flow, CountingSource(journal, parts))
    keyed = op.key_on("key", numbers, lambda item: f"{item[0]}:{item[1]}")
    op.output("write", keyed, SlowSink(journal, workers))
    cli_main(flow, workers_per_process=workers, epoch_interval=timedelta(milliseconds=50))

    entries = journal.entries
    snapshots = 0
    for index, (kind, part, last_read) in enumerate(entries):
        if kind != "snapshot" or last_read < 0:
            continue
        later_reads = [
            i for i, e in enumerate(entries[index + 1 :], index + 1) if e[:2] == ("read", part)
        ]
        if not later_reads:
            continue
        snapshots += 1
        ack_point = later_reads[0]
        written_before = {
            item
            for kind2, part2, item in entries[:ack_point]
            if kind2 == "written" and part2 == part
        }
        missing = set(range(last_read + 1)) - written_before
        assert not missing, f"partition {part}: items {sorted(missing)} acked before written"
    assert snapshots >= 5, "too few epochs closed to check anything"
