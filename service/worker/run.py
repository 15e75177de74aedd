"""`fleet-payouts worker`: the worker process, periodic tasks included.

Each process owns one pool (shared with procrastinate) and one Billing client
whose calls pass the shared gate (service/billing/gate.py): the global
budget, Billing's Retry-After and the breaker, coordinated through the database.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from procrastinate import JobContext
from procrastinate.worker import Worker

from service.billing import gate as billing_gate
from service.core import db, queue
from service.core.background import Every
from service.core.settings import Settings
from service.events import outbox as events
from service.events import webhooks
from service.ops import gauges, maintenance, reconcile
from service.payouts import periodic, returns
from service.payouts.execution import Deps
from service.worker import tasks
from service.worker.app import app

logger = logging.getLogger(__name__)

# Recovery runs often: a stalled payout is found within this plus the
# stall threshold. Housekeeping (partitions, old jobs) runs hourly.
MAINTENANCE_CRON = "* * * * * */15"
HOUSEKEEPING_CRON = "17 * * * *"
# Finished jobs are kept a week for support, then deleted so the queue
# table stays small; payouts and audit_log keep the history.
KEEP_FINISHED_JOBS_HOURS = 24 * 7
# Failed, cancelled and aborted jobs are kept longer: the JobsFailed alert asks
# someone to look at each (ops/runbooks/README.md, "JobsFailed").
KEEP_FAILED_JOBS_DAYS = 30
# Reconciliation with Billing once a day, at a quiet hour (UTC) and off the
# hour, when housekeeping and everyone else's cron jobs run.
RECONCILE_CRON = "40 3 * * *"
# Billing's returns feed: SPEC 8 asks for at least once a minute; twice
# leaves room for a run that found the lease taken.
RETURNS_CRON = "* * * * * */30"
# Pooled connections per worker, whatever its concurrency: a payout run borrows one
# for each of its statements and none while it waits on Billing or the budget;
# procrastinate keeps one for LISTEN and borrows one to fetch and finish jobs.
WORKER_POOL_SIZE = 8
# How often a worker reads the shared Billing pause for its gauge.
GATE_REFRESH_SECONDS = 1.0
# deliver_webhooks jobs were deferred by workers of the version before (webhooks
# are a chore of each worker now); their finished jobs say nothing: an hour.
KEEP_WEBHOOK_JOBS_HOURS = 1


@app.task(name="periodic_scan", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def periodic_scan(context: JobContext, timestamp: int) -> None:
    """Create periodic payouts for every park due now (timestamp is informational)."""
    await periodic.scan(tasks.deps_of(context))


@app.task(name="maintenance", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def maintenance_task(context: JobContext, timestamp: int) -> None:
    """Requeue stalled jobs, re-drive payouts whose job is gone, expire unapproved ones."""
    deps = tasks.deps_of(context)
    await maintenance.recover_stalled_jobs(app, deps)
    await maintenance.redrive_orphans(deps)
    await maintenance.expire_manual_payouts(deps)


@app.task(name="housekeeping", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def housekeeping(context: JobContext, timestamp: int) -> None:
    """Audit partitions ahead, old finished jobs (failed ones too) out of the queue table,
    old events out."""
    deps = tasks.deps_of(context)
    await maintenance.ensure_partitions(deps)
    async with deps.pool.connection() as conn:
        await events.expire(conn, deps.settings.events_retention_days)
    # In short batches by primary key: procrastinate's delete_old_jobs reads the whole
    # queue table and its events at every run (seconds once it holds millions).
    await maintenance.delete_finished_jobs(
        deps,
        succeeded_hours=KEEP_FINISHED_JOBS_HOURS,
        unsuccessful_days=KEEP_FAILED_JOBS_DAYS,
        queue_hours={queue.QUEUE_WEBHOOKS: KEEP_WEBHOOK_JOBS_HOURS},
    )


@app.task(name="reconcile", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def reconcile_task(context: JobContext, timestamp: int) -> None:
    """Compare the last days with Billing: a run record, an audit entry and the gauge."""
    await reconcile.run_daily(tasks.deps_of(context))


@app.task(name="read_returns", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def read_returns(context: JobContext, timestamp: int) -> None:
    """Apply the payouts the bank sent back (see service/payouts/returns.py)."""
    await returns.read(tasks.deps_of(context))


def register_periodic(settings: Settings) -> None:
    """Periodic tasks whose schedule comes from settings are registered at start-up."""
    registry = app.periodic_registry.periodic_tasks
    if ("periodic_scan", "") in registry:
        return
    urgent = queue.PRIORITY_MAINTENANCE
    app.periodic(cron=settings.periodic_scan_cron, priority=urgent)(periodic_scan)
    app.periodic(cron=MAINTENANCE_CRON, priority=urgent)(maintenance_task)
    app.periodic(cron=HOUSEKEEPING_CRON, priority=urgent)(housekeeping)
    app.periodic(cron=RETURNS_CRON, priority=urgent)(read_returns)
    # Not urgent: it may wait behind payouts, never the other way round.
    app.periodic(cron=RECONCILE_CRON, priority=queue.PRIORITY_PERIODIC)(reconcile_task)


@contextlib.asynccontextmanager
async def worker_deps(settings: Settings, *, concurrency: int) -> AsyncIterator[Deps]:
    pool = db.make_pool(
        settings.database_url.reveal(),
        name="worker",
        min_size=2,
        max_size=min(WORKER_POOL_SIZE, concurrency + 4),
    )
    await pool.open(wait=True)
    billing = billing_gate.client(pool, settings)
    try:
        yield Deps(pool=pool, billing=billing, settings=settings)
    finally:
        await billing.aclose()
        await pool.close()


@contextlib.asynccontextmanager
async def webhook_dispatcher(
    deps: Deps, settings: Settings
) -> AsyncIterator[webhooks.Dispatcher | None]:
    """The webhook dispatcher, with its own HTTP client; None without WEBHOOK_URL."""
    if not settings.webhook_url:
        yield None
        return
    # Its first turn switches webhooks on (the first time WEBHOOK_URL is set,
    # deliveries start with what commits from then on).
    dispatcher = webhooks.Dispatcher(deps.pool, settings)
    try:
        yield dispatcher
    finally:
        await dispatcher.aclose()


class QuietHandBack(logging.Filter):
    """procrastinate logs a job cut short by a graceful stop with the CancelledError's
    traceback; our retry strategy already said which payout went back, at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "action", None) in ("job_aborted", "job_aborted_retry"):
            record.exc_info = None
            record.exc_text = None
        return True


async def run_worker(settings: Settings, *, concurrency: int, metrics_port: int | None) -> None:
    logging.getLogger("procrastinate.worker").addFilter(QuietHandBack())
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port)
    register_periodic(settings)
    heartbeat = settings.stalled_job_seconds / 6
    async with (
        worker_deps(settings, concurrency=concurrency) as deps,
        app.open_async(pool=deps.pool),
        webhook_dispatcher(deps, settings) as dispatcher,
    ):
        worker = Worker(
            app=app,
            concurrency=concurrency,
            additional_context={"deps": deps, "webhooks": dispatcher},
            fetch_job_polling_interval=settings.worker_poll_seconds,
            shutdown_graceful_timeout=settings.shutdown_grace_seconds,
            install_signal_handlers=True,
            # A worker is declared dead after stalled_job_seconds without a
            # heartbeat: beat six times as often, so only a dead one is.
            update_heartbeat_interval=heartbeat,
            stalled_worker_timeout=settings.stalled_job_seconds,
        )
        background = [
            # The pause gauge must fall back to 0 on hosts that are not calling.
            Every(GATE_REFRESH_SECONDS, deps.billing.budget.refresh, "billing gate").start(),
            gauges.gauge_refresher(deps.pool, settings.gauge_seconds),
            Every(
                settings.gauge_seconds,
                lambda: reconcile.refresh_gauges(deps.pool),
                "reconciliation gauge",
            ).start(),
            Every(
                settings.gauge_seconds,
                lambda: gauges.refresh_check_gauges(deps.pool),
                "check gauges",
            ).start(),
        ]
        if dispatcher is not None:
            # Webhooks: the process holding the feed's lease delivers, the others wait.
            background.append(Every(webhooks.TURN_SECONDS, dispatcher.chore, "webhooks").start())
        try:
            await worker.run()  # type: ignore[no-untyped-call]  # procrastinate leaves it unannotated
        finally:
            for chore in background:
                await chore.stop()
