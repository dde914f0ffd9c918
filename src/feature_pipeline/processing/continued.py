"""Long documents' processed changes, kept between their turns in this process.

When a long document's turn ends, its event goes back to the queue (see sync.py and
connectors/rabbitmq/continuations.py). Parsing, cleaning and chunking it again on its next turn
would cost ~1 ms a chunk (~11 s for a 10 MB article on two cores) while the documents behind it
wait; so the sink keeps the change here and the process step takes it back when the event
returns, marked `continued`. The key is the message's source and body: the same bytes under the
same settings always make the same change. A miss (another process took the event, the cache
was full, a restart) only means processing it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from feature_pipeline.domain.changes import DocumentChange, InboundMessage

#: Chunks kept in all (~10 KB each with their token ids: ~250 MB); a longer change is not kept.
MAX_CHUNKS = 25_000


def _key(source: str, body: bytes) -> tuple[str, str]:
    return source, hashlib.sha256(body).hexdigest()


class ContinuedChanges:
    """A bounded map of changes waiting for their next turn, oldest dropped first."""

    def __init__(self, max_chunks: int = MAX_CHUNKS) -> None:
        self._max_chunks = max_chunks
        self._changes: OrderedDict[tuple[str, str], DocumentChange] = OrderedDict()
        self._lock = threading.Lock()  # Bytewax workers are threads of one process

    def remember(self, change: DocumentChange) -> None:
        if len(change.chunks) > self._max_chunks:
            return
        key = _key(change.source, change.body)
        with self._lock:
            self._changes[key] = change
            self._changes.move_to_end(key)
            while sum(len(c.chunks) for c in self._changes.values()) > self._max_chunks:
                self._changes.popitem(last=False)

    def take(self, message: InboundMessage) -> DocumentChange | None:
        """The change kept for this continued message, if any (given once)."""
        if not message.continued:
            return None
        with self._lock:
            return self._changes.pop(_key(message.source, message.body), None)

    def __len__(self) -> int:
        return len(self._changes)


#: The process's changes between turns: the sink puts them, the process step takes them.
continued_changes = ContinuedChanges()
