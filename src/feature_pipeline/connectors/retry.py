"""Retrying infrastructure calls (broker, store) with backoff; bad input is never retried here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def retry_with_backoff(
    action: Callable[[], T],
    what: str,
    *,
    retry_on: tuple[type[BaseException], ...],
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    attempts: int | None = None,
) -> T:
    """Run `action` until it succeeds; log each failure. `attempts=None` retries forever, which is
    right for a 24/7 consumer: its messages stay unacknowledged, nothing is lost meanwhile."""
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except retry_on as exc:
            if attempts is not None and attempt >= attempts:
                raise
            log.warning("%s failed (attempt %d): %r; retrying in %.1fs", what, attempt, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
