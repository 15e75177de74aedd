"""Task definitions: thin wrappers around the use cases.

The tasks receive their dependencies (pool, Billing client, settings) through
the worker's additional context, set up in service/worker/run.py. Their
names, queues and priorities are service/core/queue.py's: the use cases write job
rows in SQL under those names.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import Any

from procrastinate import JobContext, RetryDecision
from procrastinate.exceptions import JobAborted
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy

from service.core import db, observability, queue, retry
from service.core.invariant import InvariantError
from service.events import webhooks
from service.payouts.execution import Deps, RetryLater
from service.payouts.execution import execute_payout as run_payout
from service.worker.app import app

logger = logging.getLogger(__name__)


class Backoff(Exception):
    """A payout run's error on its way to the retry strategy, with the backoff cap of
    the worker's own Settings."""

    def __init__(self, cause: Exception, cap_seconds: float) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause
        self.cap_seconds = cap_seconds


class PayoutRetry(BaseRetryStrategy):
    """Exponential backoff with jitter, capped, honouring Billing's Retry-After.

    There is no attempt limit here: the payout job itself ends a payout that
    has ordered nothing once Billing has been unavailable for the whole retry
    window, an order is retried until Billing answers, and any other error
    (a database outage, a bug) is worth retrying for as long as it takes,
    visibly (the in-flight alerts).

    The retry time is written by the database's clock (db.CLOCK): every
    worker compares it with the database's now(), so a host whose clock is
    hours off neither hammers Billing nor waits for hours.

    The cap is the worker's RETRY_BACKOFF_CAP_SECONDS, carried by the Backoff the
    task raises (the strategy is built at import, before any Settings exist);
    DEFAULT_CAP_SECONDS only for an error that did not pass through the task.
    """

    DEFAULT_CAP_SECONDS = 60.0

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision:
        cap = self.DEFAULT_CAP_SECONDS
        if isinstance(exception, Backoff):
            cap, exception = exception.cap_seconds, exception.cause
        if isinstance(exception, asyncio.CancelledError | JobAborted):
            # The worker is stopping (a deploy) and cut the job short: not an
            # error. The payout is hand-back-safe at any point (a later run resends
            # Billing under the same key), so another worker takes it at once.
            logger.info(
                "worker stopping: payout handed back to the queue (job %s)",
                job.id,
                extra={"payout_id": job.task_kwargs.get("payout_id"), "job_id": job.id},
            )
            return RetryDecision(retry_at=db.CLOCK.now())
        retry_after = exception.retry_after if isinstance(exception, RetryLater) else None
        delay = retry.delay(job.attempts, cap=cap, retry_after=retry_after)
        if not isinstance(exception, RetryLater):
            logger.exception("job %s failed; retrying in %.1fs", job.id, delay, exc_info=exception)
        return RetryDecision(retry_at=db.CLOCK.now() + timedelta(seconds=delay))


RETRY = PayoutRetry()


def deps_of(context: JobContext) -> Deps:
    extra: dict[str, Any] = context.additional_context or {}
    deps = extra["deps"]
    if not isinstance(deps, Deps):
        raise InvariantError("isinstance(deps, Deps)")
    return deps


@app.task(name=queue.TASK_EXECUTE_PAYOUT, queue=queue.QUEUE_PAYOUTS, pass_context=True, retry=RETRY)
async def execute_payout(context: JobContext, payout_id: str) -> None:
    """Drive one payout to a final status (see service/payouts/execution.py); the log
    context's kind is the payout's own, bound once the run has read it."""
    deps = deps_of(context)
    with observability.log_context(payout_id=payout_id, job_id=context.job.id):
        try:
            await run_payout(deps, uuid.UUID(payout_id))
        except Exception as exc:
            raise Backoff(exc, deps.settings.retry_backoff_cap_seconds) from exc


# Kept for the jobs that workers of the version before still defer during a
# rolling deploy: webhooks are a chore of every worker now (service/events/webhooks.py).
@app.task(name="deliver_webhooks", queue=queue.QUEUE_WEBHOOKS, pass_context=True)
async def deliver_webhooks(context: JobContext, timestamp: int) -> None:
    """A tick of the version before: nothing to do (see service/events/webhooks.py)."""
    extra: dict[str, Any] = context.additional_context or {}
    await webhooks.tick(extra.get("webhooks"))
