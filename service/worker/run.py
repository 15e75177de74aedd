"""`fleet-payouts worker`: the worker process, periodic tasks included.

Each process owns one pool (shared with procrastinate), one Billing client
and its share of the global Billing budget, recomputed from the live worker
count in procrastinate_workers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from procrastinate import JobContext
from procrastinate.worker import Worker

from service import db, gauges, maintenance, periodic, queue, webhooks
from service.background import Every
from service.billing.client import BillingClient, Budget, live_workers
from service.execution import Deps
from service.settings import Settings
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
# A webhook round every second, when WEBHOOK_URL is set (seconds: sixth field).
WEBHOOKS_CRON = "* * * * * *"
# Its finished jobs say nothing the webhook tables do not: an hour is plenty.
KEEP_WEBHOOK_JOBS_HOURS = 1


@app.task(name="periodic_scan", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def periodic_scan(context: JobContext, timestamp: int) -> None:
    """Create periodic payouts for every park due now (timestamp is informational)."""
    await periodic.scan(tasks.deps_of(context))


@app.task(name="maintenance", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def maintenance_task(context: JobContext, timestamp: int) -> None:
    """Requeue stalled jobs and re-drive payouts whose job is gone."""
    deps = tasks.deps_of(context)
    await maintenance.recover_stalled_jobs(app, deps)
    await maintenance.redrive_orphans(deps)


@app.task(name="housekeeping", queue=queue.QUEUE_MAINTENANCE, pass_context=True)
async def housekeeping(context: JobContext, timestamp: int) -> None:
    """Audit partitions ahead, and old finished jobs out of the queue table."""
    await maintenance.ensure_partitions(tasks.deps_of(context))
    await app.job_manager.delete_old_jobs(nb_hours=KEEP_FINISHED_JOBS_HOURS)
    await app.job_manager.delete_old_jobs(
        nb_hours=KEEP_WEBHOOK_JOBS_HOURS, queue=queue.QUEUE_WEBHOOKS
    )


def register_periodic(settings: Settings) -> None:
    """Periodic tasks whose schedule comes from settings are registered at start-up."""
    registry = app.periodic_registry.periodic_tasks
    if ("periodic_scan", "") in registry:
        return
    urgent = queue.PRIORITY_MAINTENANCE
    app.periodic(cron=settings.periodic_scan_cron, priority=urgent)(periodic_scan)
    app.periodic(cron=MAINTENANCE_CRON, priority=urgent)(maintenance_task)
    app.periodic(cron=HOUSEKEEPING_CRON, priority=urgent)(housekeeping)
    if settings.webhook_url:
        app.periodic(cron=WEBHOOKS_CRON, priority=queue.PRIORITY_WEBHOOKS)(tasks.deliver_webhooks)


@contextlib.asynccontextmanager
async def worker_deps(settings: Settings, *, concurrency: int) -> AsyncIterator[Deps]:
    pool = db.make_pool(settings.database_url, name="worker", min_size=2, max_size=concurrency + 4)
    await pool.open(wait=True)
    billing = BillingClient(
        settings.billing_url,
        token=settings.billing_token,
        timeout=settings.billing_timeout_seconds,
        budget=Budget(settings.billing_rps),
    )
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
    dispatcher = webhooks.Dispatcher(deps.pool, settings)
    try:
        yield dispatcher
    finally:
        await dispatcher.aclose()


async def keep_budget_share(deps: Deps, worker: Worker) -> None:
    """Recount live workers as often as they beat, so the shares add up to the budget.

    Until our own worker has registered it is not in the count yet: count
    it anyway, or we would start with another worker's share on top of ours.
    """
    async with deps.pool.connection() as conn:
        live = await live_workers(conn, deps.settings.stalled_job_seconds)
    await deps.billing.budget.set_share(live + (1 if worker.worker_id is None else 0))


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
    tasks.RETRY.cap_seconds = settings.retry_backoff_cap_seconds
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
        # Recount at least every 2 s (a count on a tiny table): when a worker
        # joins, the others shrink their shares within one recount, and the
        # newcomer stays silent towards Billing until they have.
        recount = min(heartbeat, 2.0)
        deps.billing.budget.hold(1.5 * recount)
        await keep_budget_share(deps, worker)
        background = [
            Every(recount, lambda: keep_budget_share(deps, worker), "budget share").start(),
            gauges.gauge_refresher(deps.pool),
        ]
        try:
            await worker.run()  # type: ignore[no-untyped-call]  # procrastinate leaves it unannotated
        finally:
            for chore in background:
                await chore.stop()
