"""Parse, clean and chunk a batch of messages on several cores: a pool of processes, each with
its own `DocumentProcessor`, results in the batch's order (so per-document order is kept)."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

#: The processor of a pool process, built once when the process starts.
_processor: DocumentProcessor | None = None


def _start(settings: Settings) -> None:
    global _processor
    _processor = DocumentProcessor(settings)


def _ready(_: int) -> bool:
    return _processor is not None


def _process(message: InboundMessage) -> DocumentChange | DeadLetter:
    assert _processor is not None, "the pool process was not started by ProcessingPool"
    return _processor.process(message)


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
        # A few tasks per process: small enough to balance big and small documents, large
        # enough that pickling round trips stay cheap.
        chunksize = max(1, len(messages) // (4 * self.processes))
        return list(self._executor.map(_process, messages, chunksize=chunksize))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_pools: dict[int, ProcessingPool] = {}
_pools_lock = threading.Lock()


def processing_pool(settings: Settings) -> ProcessingPool:
    """The process-wide pool for these settings (shared by every Bytewax worker)."""
    with _pools_lock:
        pool = _pools.get(id(settings))
        if pool is None:
            pool = _pools[id(settings)] = ProcessingPool(settings, settings.processing_processes)
        return pool


def close_processing_pools() -> None:
    """Stop every pool's processes (tests; at exit Python joins them anyway)."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
