"""The retry helper: backoff until success, bounded when asked, and waits that wake on stop."""

from __future__ import annotations

import threading
import time

import pytest

from feature_pipeline.connectors.retry import RetryInterrupted, retry_with_backoff


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"down (call {self.calls})")
        return "up"


def test_retries_until_the_call_succeeds() -> None:
    flaky = Flaky(failures=2)
    assert retry_with_backoff(flaky, "x", retry_on=(ConnectionError,), first_delay_s=0.01) == "up"
    assert flaky.calls == 3


def test_other_errors_are_not_retried() -> None:
    def bad_input() -> None:
        raise ValueError("poison")

    with pytest.raises(ValueError):
        retry_with_backoff(bad_input, "x", retry_on=(ConnectionError,), first_delay_s=0.01)


def test_bounded_retries_raise_the_last_error() -> None:
    flaky = Flaky(failures=100)
    with pytest.raises(ConnectionError, match="call 3"):
        retry_with_backoff(flaky, "x", retry_on=(ConnectionError,), first_delay_s=0.01, attempts=3)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        retry_with_backoff(
            Flaky(100), "x", retry_on=(ConnectionError,), first_delay_s=0.05, give_up_after_s=0.3
        )
    assert time.monotonic() - started < 2


def test_a_stop_request_wakes_a_long_backoff_wait() -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RetryInterrupted):
        retry_with_backoff(
            Flaky(100), "x", retry_on=(ConnectionError,), first_delay_s=60, stop=stop
        )
    assert time.monotonic() - started < 2


def test_retry_log_lines_mask_passwords(caplog: pytest.LogCaptureFixture) -> None:
    def leaky() -> None:
        raise ConnectionError("cannot connect to amqp://user:hunter2@host/")

    with pytest.raises(ConnectionError):
        retry_with_backoff(leaky, "x", retry_on=(ConnectionError,), first_delay_s=0.01, attempts=2)
    assert "amqp://user:***@host/" in caplog.text and "hunter2" not in caplog.text
