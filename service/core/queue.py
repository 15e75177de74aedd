"""The job queue as the use cases see it: queues, task names, priorities.

Use cases write job rows in the same SQL statement as the payout they drive
(see sql/payouts.sql), so they need only these names, never the worker:
the worker (service/worker/) registers its tasks under the same names.
"""

from __future__ import annotations

from typing import Any

QUEUE_PAYOUTS = "payouts"
QUEUE_MAINTENANCE = "maintenance"
QUEUE_WEBHOOKS = "webhooks"

TASK_EXECUTE_PAYOUT = "execute_payout"

# Workers take the highest priority first. When 80,000 parks come due at
# once their jobs take hours to drain through the Billing budget: a park
# pressing "Pay out now" meanwhile must not wait behind them, and recovery
# (stalled jobs) must not wait behind anything.
PRIORITY_MAINTENANCE = 100
PRIORITY_INSTANT = 50
# A manual payout a second admin approved: support is waiting on it, so it
# goes ahead of a periodic backlog, just behind presses.
PRIORITY_MANUAL = 40
# Webhook rounds are short and come every second: behind a press, but ahead
# of a periodic backlog that can take hours to drain.
PRIORITY_WEBHOOKS = 25
PRIORITY_PERIODIC = 0


PRIORITIES = {"instant": PRIORITY_INSTANT, "manual": PRIORITY_MANUAL}


def payout_priority(kind: str) -> int:
    return PRIORITIES.get(kind, PRIORITY_PERIODIC)


def payout_job(kind: str) -> dict[str, Any]:
    """The query parameters that name a payout's job (queue, task, priority)."""
    return {"queue": QUEUE_PAYOUTS, "task": TASK_EXECUTE_PAYOUT, "priority": payout_priority(kind)}
