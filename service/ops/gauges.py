"""Database-backed gauges: queue depth, in-flight ages, product metric, audit runway, webhooks.

Read from the database every GAUGE_SECONDS (15 by default) by every process (API and
worker alike), not at scrape time: a scrape never waits on the database.
"""

from __future__ import annotations

from service.audit import store as audit
from service.core import db, observability
from service.core.background import Every
from service.events import webhooks
from service.ops import checks
from service.payouts import manual
from service.payouts import store as payouts


def gauge_refresher(pool: db.Pool, seconds: float) -> Every:
    """Start refreshing the database-backed gauges of this process every `seconds`."""
    return Every(seconds, lambda: refresh_gauges(pool), "gauges").start()


JOB_STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted")


async def job_counts(conn: db.Conn) -> dict[str, int]:
    """procrastinate jobs by status (the queue-depth gauge): counted as they change
    (migrations/0015), a few rows whatever the queue table holds."""
    rows = await db.fetch_all(
        conn, "SELECT status::text AS status, sum(n) AS n FROM job_status_counts GROUP BY 1"
    )
    return {r["status"]: int(r["n"]) for r in rows}


async def refresh_gauges(pool: db.Pool) -> None:
    async with pool.connection() as conn:
        counts = await job_counts(conn)
        for status in JOB_STATUSES:
            observability.JOBS.labels(status).set(counts.get(status, 0))
        oldest, oldest_order = await payouts.in_flight_ages(conn)
        observability.OLDEST_IN_FLIGHT.set(oldest)
        observability.OLDEST_OPEN_ORDER.set(oldest_order)
        parks = await payouts.instant_parks(conn)
        for window, key in (("1d", "d1"), ("7d", "d7"), ("30d", "d30")):
            observability.INSTANT_PARKS.labels(window).set(parks[key])
        months = await db.fetch_one(conn, audit.Q["months_ahead"])
        observability.AUDIT_MONTHS_AHEAD.set(months["months"] if months else 0)
        waiting, oldest_waiting = await manual.waiting(conn)
        observability.MANUAL_PENDING_APPROVAL.set(waiting)
        observability.MANUAL_OLDEST_PENDING_APPROVAL.set(oldest_waiting)
        webhook_backlog = await webhooks.backlog(conn)
        observability.EVENTS_UNDELIVERED.set(webhook_backlog.events)
        observability.EVENTS_OLDEST_UNDELIVERED.set(webhook_backlog.oldest_seconds)


async def refresh_check_gauges(pool: db.Pool) -> None:
    """The scheduled checks' verdicts (workers only: see observability.AUDIT_VERIFY_BROKEN)."""
    async with pool.connection() as conn:
        for state in await checks.states(conn):
            observability.CHECK_EXPECTED_SINCE.labels(state.check_name).set(state.expected_since)
            if state.check_name == checks.AUDIT_VERIFY:
                observability.AUDIT_VERIFY_LAST_RUN.set(state.last_run)
                observability.AUDIT_VERIFY_BROKEN.set(1 if state.last_ok is False else 0)
