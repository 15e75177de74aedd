"""Stalled-job recovery on a host whose clock runs ahead: found by the partition drill, where a
host restarted with its clock +569 s requeued a killed worker's payout jobs 569 s into the
future, and their payouts stayed in flight that long after every fault had healed."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, timedelta

import procrastinate
import procrastinate.utils
import psycopg
import pytest
from psycopg.rows import DictRow

from service.core import db
from service.ops import maintenance
from service.payouts.execution import Deps
from service.worker.app import app

AHEAD = timedelta(hours=1)


class FastClock(dt.datetime):
    """datetime whose now() runs AHEAD of the machine's (a host with a bad clock)."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> FastClock:
        real = dt.datetime.now(tz)
        return cls.fromtimestamp((real + AHEAD).timestamp(), tz)


async def test_a_stalled_job_is_requeued_due_now_by_the_database_clock_on_a_fast_host(
    deps: Deps, pg: psycopg.Connection[DictRow], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job left `doing` by a worker silent past STALLED_JOB_SECONDS is requeued due now by
    the database's clock, not by this host's clock an hour ahead."""
    worker = pg.execute(
        "INSERT INTO procrastinate_workers (last_heartbeat) VALUES (now() - interval '1 hour')"
        " RETURNING id"
    ).fetchone()
    assert worker is not None
    job = pg.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id)"
        " VALUES ('payouts', 'execute_payout', '{}', 'doing', %s) RETURNING id",
        (worker["id"],),
    ).fetchone()
    assert job is not None
    monkeypatch.setattr(procrastinate.utils, "utcnow", lambda: FastClock.now(UTC))
    monkeypatch.setattr(db, "datetime", FastClock)
    monkeypatch.setattr(db, "CLOCK", db.DatabaseClock())  # nothing observed yet

    # A connector of its own: the shared app's keeps the pool an earlier test gave it.
    fresh = app.with_connector(procrastinate.PsycopgConnector())
    async with fresh.open_async(pool=deps.pool):
        assert 1 == await maintenance.recover_stalled_jobs(fresh, deps)

    row = pg.execute(
        "SELECT status, scheduled_at <= now() + interval '5 seconds' AS due"
        " FROM procrastinate_jobs WHERE id = %s",
        (job["id"],),
    ).fetchone()
    assert {"status": "todo", "due": True} == row
