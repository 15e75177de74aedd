"""The one back-off: how long to wait before the next try of something that failed.

Exponential (base * 2^attempt, the exponent bounded so it never overflows), capped,
with a +/-25 % jitter so that callers which failed together (every worker after a
Billing outage, every webhook of a consumer that came back) do not retry together.
A Retry-After the other side sent wins over a shorter back-off: it knows better.

Used by the payout job's retry strategy (service/worker/tasks.py), webhook deliveries
(service/events/webhooks.py), the reconciliation's transient errors
(service/ops/reconcile.py), the audit partitions' lock timeouts (service/audit/store.py)
and DDL lock timeouts (service/core/db.py). tests/unit/test_retry.py fails if another
exponential formula appears in service/.
"""

from __future__ import annotations

import random

JITTER = 0.25
"""The delay is spread uniformly over [1 - JITTER, 1 + JITTER] times the capped back-off."""

MAX_EXPONENT = 16
"""2^16 s is 18 h: beyond every cap used here, and float-safe for any attempt count."""


def delay(
    attempt: int,
    *,
    cap: float,
    base: float = 1.0,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before try number `attempt + 1` (`attempt` tries have failed, from 0).

    `min(cap, base * 2^attempt)`, jittered by +/-JITTER, and never less than `retry_after`.
    """
    backoff = min(cap, base * 2.0 ** min(max(attempt, 0), MAX_EXPONENT))
    jittered = backoff * random.uniform(1.0 - JITTER, 1.0 + JITTER)
    if retry_after is not None:
        return max(jittered, retry_after)
    return jittered
