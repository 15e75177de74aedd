"""Recovery and housekeeping that the queue does not do by itself.

procrastinate has no automatic recovery: a job whose worker was killed stays
`doing` for ever (QUEUE-NOTES). This module finds such jobs and requeues
them, and re-drives any in-flight payout whose job is gone: the "completer"
of the idempotent-payments pattern. Both are safe to run from every host at
once: retrying a job twice or deferring a second job for one payout only
makes the payout job run again, and it is idempotent.
"""

from __future__ import annotations

import logging

from procrastinate import App

from service import audit, db, observability, payouts
from service.background import Every
from service.execution import Deps
from service.worker import tasks

logger = logging.getLogger(__name__)
ORPHAN_BATCH = 500


async def recover_stalled_jobs(app: App, deps: Deps) -> int:
    """Requeue `doing` jobs whose worker stopped sending heartbeats."""
    stalled = await app.job_manager.get_stalled_jobs(
        seconds_since_heartbeat=deps.settings.stalled_job_seconds
    )
    count = 0
    for job in stalled:
        logger.warning(
            "requeueing stalled job %s (%s)", job.id, job.task_name, extra={"job_id": job.id}
        )
        await app.job_manager.retry_job(job)
        count += 1
    return count


async def redrive_orphans(deps: Deps) -> int:
    """Give a new job to every in-flight payout whose job is finished or gone."""
    async with deps.pool.connection() as conn, conn.transaction():
        rows = await payouts.orphans(
            conn, min_age_seconds=deps.settings.stalled_job_seconds, limit=ORPHAN_BATCH
        )
        for row in rows:
            job_id = await tasks.execute_payout.configure(
                connection=conn, priority=tasks.payout_priority(row["kind"])
            ).defer_async(payout_id=str(row["id"]))
            await payouts.set_job(conn, row["id"], job_id)
            logger.warning(
                "payout %s had no live job; deferred job %s",
                row["id"],
                job_id,
                extra={"payout_id": str(row["id"]), "park_id": row["park_id"]},
            )
    return len(rows)


async def ensure_partitions(deps: Deps) -> int:
    async with deps.pool.connection() as conn:
        return await audit.ensure_partitions(conn)


# Gauges are read from the database this often by every process (API and
# worker alike), not at scrape time: a scrape never waits on the database.
GAUGE_SECONDS = 15.0


def gauge_refresher(pool: db.Pool) -> Every:
    """Start refreshing the database-backed gauges of this process."""
    return Every(GAUGE_SECONDS, lambda: refresh_gauges(pool), "gauges").start()


async def refresh_gauges(pool: db.Pool) -> None:
    """Queue depth, oldest in-flight payout, product metric, audit runway."""
    async with pool.connection() as conn:
        jobs = await db.fetch_all(
            conn, "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs GROUP BY 1"
        )
        counts = {r["status"]: r["n"] for r in jobs}
        for status in ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted"):
            observability.JOBS.labels(status).set(counts.get(status, 0))
        observability.OLDEST_IN_FLIGHT.set(await payouts.oldest_in_flight_seconds(conn))
        parks = await payouts.instant_parks(conn)
        for window, key in (("1d", "d1"), ("7d", "d7"), ("30d", "d30")):
            observability.INSTANT_PARKS.labels(window).set(parks[key])
        months = await db.fetch_one(conn, audit.Q["months_ahead"])
        observability.AUDIT_MONTHS_AHEAD.set(months["months"] if months else 0)
