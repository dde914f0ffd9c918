"""Parse, clean and chunk a batch of messages on several cores, results in the batch's order (so
per-document order is kept): on threads of the worker's process (its tokenizer runs without the
GIL), or on a pool of processes, each with its own `DocumentProcessor`."""

from __future__ import annotations

import heapq
import multiprocessing
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Generic, TypeVar, cast

from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

#: The processor of a pool process, built once when the process starts.
_processor: DocumentProcessor | None = None

Shared = TypeVar("Shared")


class _OnePerKey(Generic[Shared]):
    """Objects made once per key and shared by every thread of the process (a processor or a
    pool per settings, a thread pool per size): the first caller makes it, under the lock."""

    def __init__(self) -> None:
        self._items: dict[Hashable, Shared] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Shared]) -> Shared:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = make()
            return item

    def take_all(self) -> list[Shared]:
        """Every object made so far, forgotten here (the caller closes them)."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
            return items


def _start(settings: Settings) -> None:
    global _processor
    _processor = DocumentProcessor(settings)
    _processor.warm_up()


def _ready(_: int) -> bool:
    return _processor is not None


def _process(messages: list[InboundMessage]) -> list[DocumentChange | DeadLetter]:
    assert _processor is not None, "the pool process was not started by ProcessingPool"
    return [_processor.process(message) for message in messages]


#: Thread pools by size.
_thread_pools: _OnePerKey[ThreadPoolExecutor] = _OnePerKey()
#: The worker process's own processor per settings (tokenizers), shared by its Bytewax workers.
_local_processors: _OnePerKey[DocumentProcessor] = _OnePerKey()


def _local_processor(settings: Settings) -> DocumentProcessor:
    return _local_processors.get(id(settings), lambda: DocumentProcessor(settings))


def start_processing(settings: Settings) -> None:
    """Before the first message, so that it does not wait: the processing pool's processes
    (PROCESSING_PROCESSES), or this process's tokenizers."""
    if settings.processing_processes:
        processing_pool(settings)
    else:
        _local_processor(settings).warm_up()


def process_batch(
    settings: Settings, messages: list[InboundMessage]
) -> list[DocumentChange | DeadLetter]:
    """Parse, clean and chunk messages, results in order: on the processing pool's processes
    (PROCESSING_PROCESSES), else on this process's threads (PROCESSING_THREADS)."""
    if settings.processing_processes:
        return processing_pool(settings).process(messages)
    return process_in_threads(_local_processor(settings), messages, settings.processing_threads)


def process_in_threads(
    processor: DocumentProcessor, messages: list[InboundMessage], threads: int
) -> list[DocumentChange | DeadLetter]:
    """`processor.process` of each message on up to `threads` threads, results in order.

    One document's tokenizing (Rust, the GIL released) runs while another's Python (cleaning,
    packing chunks) holds the GIL: measured on the bench corpus on 2 cores, the process step
    took 0.85-0.9 s on 3 threads against 1.08-1.10 s on one."""
    if threads <= 1 or len(messages) <= 1:
        return [processor.process(message) for message in messages]
    pool = _thread_pools.get(threads, lambda: ThreadPoolExecutor(threads, "processing"))
    return list(pool.map(processor.process, messages))


def balanced_tasks(sizes: Sequence[int], tasks: int) -> list[list[int]]:
    """The indexes of `sizes` in at most `tasks` groups of about equal total size, largest group
    first (the longest-processing-time-first rule): a batch's few large documents (a
    repository can be half a batch's work) land in different groups, so no process is left
    with most of the work while the others idle."""
    bins: list[tuple[int, int]] = [(0, b) for b in range(max(1, min(tasks, len(sizes))))]
    members: list[list[int]] = [[] for _ in bins]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, b = heapq.heappop(bins)
        members[b].append(index)
        heapq.heappush(bins, (load + sizes[index], b))
    loads = {b: load for load, b in bins}
    return [members[b] for b in sorted(loads, key=lambda b: -loads[b]) if members[b]]


class ProcessingPool:
    """`processes` processes started with `spawn`: the pipeline's process runs threads (Bytewax,
    pika, torch), which a fork would copy in whatever state they are in."""

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.processes = processes
        self._executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(settings,),
        )
        # Start every process now (imports, tokenizers), not on the first batch: a drain's
        # clock and a message's freshness should not pay for it, and a failure shows at start.
        if not all(self._executor.map(_ready, range(processes))):
            raise RuntimeError("a processing process did not start")

    def process(self, messages: list[InboundMessage]) -> list[DocumentChange | DeadLetter]:
        # A few tasks per process, balanced by body size and the largest sent first: enough
        # to even out big and small documents, few enough that round trips stay cheap.
        tasks = balanced_tasks([len(m.body) for m in messages], 4 * self.processes)
        futures = [self._executor.submit(_process, [messages[i] for i in task]) for task in tasks]
        results: list[DocumentChange | DeadLetter | None] = [None] * len(messages)
        for task, future in zip(tasks, futures, strict=True):
            for index, result in zip(task, future.result(), strict=True):
                results[index] = result
        missing = [i for i, result in enumerate(results) if result is None]
        if missing:  # every index is in exactly one task (balanced_tasks): a bug if not
            raise RuntimeError(f"the pool returned no result for messages {missing[:5]}")
        return cast(list[DocumentChange | DeadLetter], results)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_pools: _OnePerKey[ProcessingPool] = _OnePerKey()


def processing_pool(settings: Settings) -> ProcessingPool:
    """The process-wide pool for these settings (shared by every Bytewax worker)."""
    return _pools.get(id(settings), lambda: ProcessingPool(settings, settings.processing_processes))


def close_processing_pools() -> None:
    """Stop every pool's processes (tests; at exit Python joins them anyway)."""
    for pool in _pools.take_all():
        pool.close()
