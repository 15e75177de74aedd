"""The periodic payout scan: pay every park that has not been paid for N days.

State-based, not tick-based: each run pays whoever is due *now*, so ticks
missed during an outage catch up by themselves and a tick deferred twice
creates nothing twice (the due rule, the park row locks and the in-flight
unique index see to it).

Parks are handled in batches of BATCH: one POST /v1/balances/select per
batch, then one transaction that locks the batch's parks and inserts their
payouts, jobs and audit entries with the balance snapshot. Memory stays flat
in the number of parks. A park whose balance Billing left out or sent
unusable (malformed, negative) gets no snapshot: its own job asks, decides
and records why, and the rest of the batch goes on.

One scan runs at a time across all hosts, under a lease with a deadline
(service/core/lease.py: scan_leases, the database's clock) renewed at every batch: a worker
frozen mid-scan keeps nobody waiting longer than STALLED_JOB_SECONDS, after
which it counts as dead anyway. The lease only
saves Billing a second set of balance calls; two scans at once still pay no
park twice (the due rule, park row locks and the in-flight index).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from service.billing.client import Balance, Rejected, Transient
from service.billing.contract import MAX_SELECT_PARK_IDS
from service.core import db, queue
from service.core.lease import Lease
from service.core.values import is_storable_balance
from service.payouts.execution import Deps

logger = logging.getLogger(__name__)
Q = db.queries("periodic")

BATCH = MAX_SELECT_PARK_IDS
LEASE_NAME = "periodic_scan"
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
    lease = Lease(LEASE_NAME, timedelta(seconds=deps.settings.stalled_job_seconds))
    async with deps.pool.connection() as conn:
        if not await lease.take(conn):
            logger.debug("periodic scan already running on another worker")
            return ScanResult(0, 0, skipped_busy=True)
        try:
            while True:
                park_ids = await _due_candidates(
                    conn, period=deps.settings.payout_period, limit=batch_size
                )
                if not park_ids:
                    break
                try:
                    balances = await deps.billing.balances(park_ids)
                except (Transient, Rejected) as exc:
                    # Next tick tries again; a refusal of the whole batch is no
                    # reason to crash the scan job either.
                    logger.warning("periodic scan stopped, Billing unavailable: %s", exc)
                    break
                if not await lease.take(conn):
                    # Frozen past the lease: another scan took over.
                    logger.warning("periodic scan lost its lease; stopping")
                    break
                made = await create_batch(conn, deps, park_ids, balances)
                created += made
                batches += 1
                if made == 0 or len(park_ids) < batch_size:
                    break
            if created >= ANALYZE_AFTER:
                await conn.execute("ANALYZE procrastinate_jobs")
        finally:
            await lease.release(conn)
    if created:
        logger.info("periodic scan created %s payouts in %s batches", created, batches)
    return ScanResult(created, batches)


def snapshot(balance: Balance | None) -> Balance | None:
    """The balance to store with the payout, if the table can keep it as Billing said it."""
    return balance if balance is not None and is_storable_balance(balance.available) else None


async def create_batch(
    conn: db.Conn, deps: Deps, park_ids: list[str], balances: dict[str, Balance]
) -> int:
    """One transaction: lock the still-due parks, insert their payouts, jobs and audit entries;
    how many payouts it made (a park with a payout in flight gets none)."""
    async with conn.transaction():
        locked = await _lock_due(conn, park_ids, period=deps.settings.payout_period)
        if not locked:
            return 0
        known = [snapshot(balances.get(p)) for p in locked]
        return await _insert(conn, deps, locked, known)


# --- the queries (sql/periodic.sql) ---------------------------------------------------


async def _due_candidates(conn: db.Conn, *, period: timedelta, limit: int) -> list[str]:
    return await db.fetch_values(conn, str, Q["due_candidates"], period=period, limit=limit)


async def _lock_due(conn: db.Conn, park_ids: list[str], *, period: timedelta) -> list[str]:
    return await db.fetch_values(conn, str, Q["lock_due"], park_ids=park_ids, period=period)


async def _insert(
    conn: db.Conn, deps: Deps, park_ids: list[str], known: list[Balance | None]
) -> int:
    """The parks' payouts, jobs, audit entries and attempt clocks; how many payouts."""
    return await db.execute(
        conn,
        Q["insert"],
        ids=[uuid.uuid4() for _ in park_ids],
        park_ids=park_ids,
        available=[b.available if b else None for b in known],
        currency=[b.currency if b else None for b in known],
        max_amount=deps.settings.payout_max_amount,
        min_amount=deps.settings.payout_min_amount,
        **queue.payout_job("periodic"),
    )
