"""The periodic payout scan: pay every park that has not been paid for N days.

State-based, not tick-based: each run pays whoever is due *now*, so ticks
missed during an outage catch up by themselves and a tick deferred twice
creates nothing twice (the due rule, the park row locks and the in-flight
unique index see to it).

Parks are handled in batches of BATCH: one POST /v1/balances/select per
batch, then one transaction that locks the batch's parks, defers their jobs
and inserts their payouts with the balance snapshot. Memory stays flat in
the number of parks.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from procrastinate.types import JSONValue

from service import db
from service.billing.client import MAX_SELECT, Balance, Transient
from service.execution import Deps
from service.worker import tasks

logger = logging.getLogger(__name__)
Q = db.queries("periodic")

BATCH = MAX_SELECT
# One scan at a time across all hosts: a second one would only ask Billing
# for balances the first one is about to use.
SCAN_LOCK_KEY = 0x7363_616E
# Past this many new jobs the planner's statistics on procrastinate_jobs are
# stale enough to turn job fetching quadratic (QUEUE-NOTES): re-analyze.
ANALYZE_AFTER = 5000


@dataclass(frozen=True)
class ScanResult:
    created: int
    batches: int
    skipped_busy: bool = False


async def scan(deps: Deps, *, batch_size: int = BATCH) -> ScanResult:
    """Create the periodic payouts of every park due now; return how many."""
    created = batches = 0
    async with deps.pool.connection() as conn:
        got = await db.fetch_one(conn, "SELECT pg_try_advisory_lock(%(k)s) AS got", k=SCAN_LOCK_KEY)
        if not got or not got["got"]:
            logger.info("periodic scan already running on another worker")
            return ScanResult(0, 0, skipped_busy=True)
        try:
            while True:
                rows = await db.fetch_all(
                    conn,
                    Q["due_candidates"],
                    period=deps.settings.payout_period,
                    limit=batch_size,
                )
                park_ids = [r["park_id"] for r in rows]
                if not park_ids:
                    break
                try:
                    balances = await deps.billing.balances(park_ids)
                except Transient as exc:
                    logger.warning("periodic scan stopped, Billing unavailable: %s", exc)
                    break
                made = await create_batch(conn, deps, park_ids, balances)
                created += made
                batches += 1
                if made == 0 or len(park_ids) < batch_size:
                    break
            if created >= ANALYZE_AFTER:
                await conn.execute("ANALYZE procrastinate_jobs")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SCAN_LOCK_KEY,))
    if created:
        logger.info("periodic scan created %s payouts in %s batches", created, batches)
    return ScanResult(created, batches)


async def create_batch(
    conn: db.Conn, deps: Deps, park_ids: list[str], balances: dict[str, Balance]
) -> int:
    """One transaction: lock the still-due parks, defer their jobs, insert their payouts."""
    async with conn.transaction():
        locked = [
            r["park_id"]
            for r in await db.fetch_all(
                conn, Q["lock_due"], park_ids=park_ids, period=deps.settings.payout_period
            )
        ]
        if not locked:
            return 0
        payout_ids = [uuid.uuid4() for _ in locked]
        job_args: list[dict[str, JSONValue]] = [{"payout_id": str(p)} for p in payout_ids]
        deferrer = tasks.execute_payout.configure(connection=conn, priority=tasks.PRIORITY_PERIODIC)
        job_ids = await deferrer.batch_defer_async(*job_args)
        known = [balances.get(p) for p in locked]
        await db.execute(
            conn,
            Q["insert"],
            ids=payout_ids,
            park_ids=locked,
            # A park Billing does not know gets no snapshot: its job asks
            # GET /v1/balance and records Billing's refusal.
            available=[b.available if b else None for b in known],
            currency=[b.currency if b else None for b in known],
            job_ids=job_ids,
            max_amount=deps.settings.payout_max_amount,
        )
    return len(locked)
