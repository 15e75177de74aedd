"""The payout job's retry strategy takes its backoff cap from the worker's Settings."""

from __future__ import annotations

from procrastinate.jobs import Job

from service.core import db
from service.payouts.execution import RetryLater
from service.worker.tasks import RETRY, Backoff


def job(attempts: int) -> Job:
    return Job(
        id=1,
        queue="payouts",
        lock=None,
        queueing_lock=None,
        task_name="execute_payout",
        task_kwargs={"payout_id": "x"},
        attempts=attempts,
    )


def delay_s(exception: BaseException, attempts: int) -> float:
    decision = RETRY.get_retry_decision(exception=exception, job=job(attempts))
    assert decision.retry_at is not None
    return (decision.retry_at - db.CLOCK.now()).total_seconds()


def test_the_cap_comes_with_the_error_from_the_workers_settings() -> None:
    """At the 10th attempt (2^10 s uncapped) the delay is within jitter of the Backoff's cap."""
    assert 0.7 <= delay_s(Backoff(RetryLater("busy"), cap_seconds=1.0), 10) <= 1.3
    assert 3.7 <= delay_s(Backoff(RuntimeError("bug"), cap_seconds=5.0), 10) <= 6.3


def test_retry_after_still_wins_over_a_shorter_backoff() -> None:
    """Billing's Retry-After (30 s) outlasts a 1 s cap."""
    late = Backoff(RetryLater("429", retry_after=30.0), cap_seconds=1.0)
    assert 29.0 <= delay_s(late, 1) <= 30.5
