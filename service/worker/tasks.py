"""Task definitions: thin wrappers around the use cases.

The tasks receive their dependencies (pool, Billing client, settings) through
the worker's additional context, set up in service/worker/run.py.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from procrastinate import JobContext, RetryDecision
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy

from service import webhooks
from service.execution import Deps, RetryLater
from service.execution import execute_payout as run_payout
from service.worker.app import app

logger = logging.getLogger(__name__)

QUEUE_PAYOUTS = "payouts"
QUEUE_MAINTENANCE = "maintenance"
QUEUE_WEBHOOKS = "webhooks"

# Workers take the highest priority first. When 80,000 parks come due at
# once their jobs take hours to drain through the Billing budget: a park
# pressing "Pay out now" meanwhile must not wait behind them, and recovery
# (stalled jobs) must not wait behind anything.
PRIORITY_MAINTENANCE = 100
PRIORITY_INSTANT = 50
# Webhook rounds are short and come every second: behind a press, but ahead
# of a periodic backlog that can take hours to drain.
PRIORITY_WEBHOOKS = 25
PRIORITY_PERIODIC = 0


def payout_priority(kind: str) -> int:
    return PRIORITY_INSTANT if kind == "instant" else PRIORITY_PERIODIC


class PayoutRetry(BaseRetryStrategy):
    """Exponential backoff with jitter, capped, honouring Billing's Retry-After.

    There is no attempt limit here: the payout job itself ends the payout as
    `failed` once Billing has been unavailable for the whole retry window,
    and any other error (a database outage, a bug) is worth retrying for as
    long as it takes, visibly (the oldest-in-flight alert).
    """

    def __init__(self, cap_seconds: float = 60.0) -> None:
        self.cap_seconds = cap_seconds

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision:
        base = min(self.cap_seconds, 2.0 ** min(job.attempts, 16))
        delay = base * random.uniform(0.75, 1.25)
        if isinstance(exception, RetryLater) and exception.retry_after is not None:
            delay = max(delay, exception.retry_after)
        if not isinstance(exception, RetryLater):
            logger.exception("job %s failed; retrying in %.1fs", job.id, delay, exc_info=exception)
        return RetryDecision(retry_at=datetime.now(UTC) + timedelta(seconds=delay))


RETRY = PayoutRetry()


def deps_of(context: JobContext) -> Deps:
    extra: dict[str, Any] = context.additional_context or {}
    deps = extra["deps"]
    assert isinstance(deps, Deps)
    return deps


@app.task(name="execute_payout", queue=QUEUE_PAYOUTS, pass_context=True, retry=RETRY)
async def execute_payout(context: JobContext, payout_id: str) -> None:
    """Drive one payout to a final status (see service/execution.py)."""
    await run_payout(deps_of(context), uuid.UUID(payout_id))


# No procrastinate lock nor queueing_lock: rounds exclude each other with a
# lease in the database (a tick that finds it taken ends at once, so ticks
# never pile up), and a queueing_lock would make the stalled-job recovery's
# retry of a dead worker's round hit a unique violation (QUEUE-NOTES).
@app.task(name="deliver_webhooks", queue=QUEUE_WEBHOOKS, pass_context=True)
async def deliver_webhooks(context: JobContext, timestamp: int) -> None:
    """One webhook delivery round (see service/webhooks.py)."""
    extra: dict[str, Any] = context.additional_context or {}
    await webhooks.tick(extra.get("webhooks"))
