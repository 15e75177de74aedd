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

from service.audit import store as audit
from service.core import db
from service.core.invariant import InvariantError
from service.payouts import manual
from service.payouts import store as payouts
from service.payouts.execution import Deps

logger = logging.getLogger(__name__)
Q = db.queries("maintenance")
ORPHAN_BATCH = 500


async def recover_stalled_jobs(app: App, deps: Deps) -> int:
    """Requeue `doing` jobs whose worker stopped sending heartbeats."""
    stalled = await app.job_manager.get_stalled_jobs(
        seconds_since_heartbeat=deps.settings.stalled_job_seconds
    )
    if stalled:
        # Due now by the database's clock: procrastinate's default (this host's clock) would
        # put each job off by as much as this host's clock is ahead, its payout in flight.
        async with deps.pool.connection() as conn:
            row = await db.fetch_one(conn, Q["db_now"])
            if row is None:
                raise InvariantError("row is not None")
            db.CLOCK.observe(row["db_now"])
    count = 0
    for job in stalled:
        logger.warning(
            "requeueing stalled job %s (%s)", job.id, job.task_name, extra={"job_id": job.id}
        )
        await app.job_manager.retry_job(job, retry_at=db.CLOCK.now())
        count += 1
    return count


async def redrive_orphans(deps: Deps) -> int:
    """Give a new job to every in-flight payout whose job is finished or gone."""
    async with deps.pool.connection() as conn, conn.transaction():
        rows = await payouts.orphans(
            conn, min_age_seconds=deps.settings.stalled_job_seconds, limit=ORPHAN_BATCH
        )
        for row in rows:
            job_id = await payouts.redrive(conn, row["id"], row["kind"])
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


async def expire_manual_payouts(deps: Deps) -> int:
    """Manual payouts nobody approved in time end `expired` (system audit entries)."""
    async with deps.pool.connection() as conn:
        expired = await manual.expire_due(conn)
    if expired:
        logger.info("%s manual payouts expired unapproved", expired)
    return expired


# Finished jobs are deleted this many at a time, each batch a statement (and a
# transaction) of its own, up to JOB_BATCHES_PER_RUN a run: a backlog (housekeeping
# stopped for a while) is worked off over the hourly runs, never in one long delete.
JOB_BATCH = 200
JOB_BATCHES_PER_RUN = 500


async def delete_finished_jobs(
    deps: Deps, *, succeeded_hours: float, unsuccessful_days: float, queue_hours: dict[str, float]
) -> int:
    """Delete succeeded jobs `succeeded_hours` after they finished (`queue_hours`: sooner
    for those queues), failed, cancelled and aborted ones `unsuccessful_days` after;
    returns how many. Payout rows and the audit log keep the history."""
    passes: list[tuple[str, dict[str, object]]] = [
        ("delete_old_succeeded_jobs", {"hours": succeeded_hours}),
        ("delete_old_unsuccessful_jobs", {"days": unsuccessful_days}),
    ]
    passes += [("delete_old_queue_jobs", {"queue": q, "hours": h}) for q, h in queue_hours.items()]
    deleted = 0
    async with deps.pool.connection() as conn:
        for query, params in passes:
            for _ in range(JOB_BATCHES_PER_RUN):
                count = await db.execute(conn, Q[query], batch=JOB_BATCH, **params)
                deleted += count
                if count < JOB_BATCH:
                    break
    if deleted:
        logger.info("deleted %s finished jobs", deleted)
    return deleted
