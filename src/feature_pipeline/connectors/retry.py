"""Retrying infrastructure calls (broker, store) with backoff; bad input is never retried here.

The one retry helper of the project (tenacity underneath). Its waits wake on the process's stop
request, so SIGTERM/SIGINT end a process within moments even while a service is down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential,
)
from tenacity.stop import stop_base

from feature_pipeline.redaction import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Set by the CLI's signal handler: every retry wait wakes on it and gives up.
stop_requested = threading.Event()


class RetryInterrupted(Exception):
    """A stop was requested while waiting to retry; the caller should wind down."""


def retry_with_backoff(
    action: Callable[[], T],
    what: str,
    *,
    retry_on: tuple[type[BaseException], ...],
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
    attempts: int | None = None,
    give_up_after_s: float | None = None,
    stop: threading.Event | None = None,
    log_level: int = logging.WARNING,
) -> T:
    """Run `action` until it succeeds; log each failure (secrets masked).

    With neither `attempts` nor `give_up_after_s` it retries forever, which is right for a 24/7
    consumer: its messages stay unacknowledged, nothing is lost meanwhile. Otherwise the last
    error is raised. A wait interrupted by `stop` (or the process-wide `stop_requested`) raises
    `RetryInterrupted`. One-shot commands pass a `log_level` below their own, to print one line.
    """
    events = [e for e in (stop, stop_requested) if e is not None]

    def sleep(seconds: float) -> None:
        if _wait_any(events, seconds):
            raise RetryInterrupted(f"stop requested while retrying {what}")

    def log_retry(state: RetryCallState) -> None:
        assert state.outcome is not None and state.next_action is not None
        log.log(
            log_level,
            "%s failed (attempt %d): %s; retrying in %.1fs",
            what,
            state.attempt_number,
            redact(describe_error(state.outcome.exception())),
            state.next_action.sleep,
        )

    conditions: list[stop_base] = []
    if attempts is not None:
        conditions.append(stop_after_attempt(attempts))
    if give_up_after_s is not None:
        conditions.append(stop_after_delay(give_up_after_s))
    retrying = Retrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential(multiplier=first_delay_s, max=max_delay_s),
        stop=stop_any(*conditions) if conditions else stop_never,
        sleep=sleep,
        before_sleep=log_retry,
        reraise=True,
    )
    return retrying(action)


def _wait_any(events: list[threading.Event], seconds: float) -> bool:
    """Sleep `seconds`, returning True as soon as one of `events` is set."""
    if any(e.is_set() for e in events):
        return True
    if len(events) == 1:
        return events[0].wait(seconds)
    # Two events: poll in short steps (a stop needs no faster reaction than this).
    step = 0.1
    waited = 0.0
    while waited < seconds:
        if events[0].wait(min(step, seconds - waited)) or any(e.is_set() for e in events):
            return True
        waited += step
    return False


def describe_error(exc: BaseException | None) -> str:
    """An exception as one short line: its type and message (never a traceback)."""
    if exc is None:
        return "unknown error"
    text = " ".join(str(exc).split())
    if not text and exc.args:  # pika's connection errors keep the reason in args only
        text = " ".join(repr(exc.args[0]).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
