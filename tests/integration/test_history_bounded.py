"""Years of history (issue 21): the gauges every process refreshes every 15 s read a bounded
amount whatever the history (tests/bench/history.py measures it at scale), housekeeping
deletes failed and cancelled jobs too, in short batches, and webhooks switched on do not hand
out the history."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from service.core import db
from service.events import webhooks
from service.ops import gauges, maintenance
from service.payouts import store as payouts
from service.payouts.execution import Deps
from service.worker import run
from tests.conftest import make_settings
from tests.helpers.events import FINAL_COLUMNS, Conn, finish, insert_payout, register_parks

Lock = Callable[[str], None]


@pytest.fixture
def locked(db_url: str) -> Iterator[Lock]:
    """Another session holding a table ACCESS EXCLUSIVE, as a long DDL would: any query that
    reads it waits. Call it with the table's name."""
    sessions: list[psycopg.Connection[tuple[object, ...]]] = []

    def lock(table: str) -> None:
        s = psycopg.connect(db_url)
        sessions.append(s)
        s.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    yield lock
    for s in sessions:
        s.rollback()
        s.close()


async def impatient(url: str) -> db.Conn:
    """The app's connection, giving up on a lock after 1 s (the gauges run every 15 s)."""
    conn = await db.connect(url, name="test")
    await conn.execute("SET lock_timeout = '1s'")
    return conn


def counted(pg: Conn) -> dict[str, int]:
    rows = pg.execute(
        "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs GROUP BY 1"
    ).fetchall()
    return {r["status"]: int(r["n"]) for r in rows}


async def test_the_jobs_gauge_does_not_read_the_queue_table(app_db_url: str, locked: Lock) -> None:
    """The jobs-by-status gauge answers while the queue table is locked: it reads the counts
    kept as jobs change, never the jobs themselves (count(*) took 0.6-0.85 s at 5 M jobs)."""
    locked("procrastinate_jobs")
    conn = await impatient(app_db_url)
    async with conn:
        assert {} == {k: v for k, v in (await gauges.job_counts(conn)).items() if v}


async def test_job_counts_follow_every_change_from_every_session(pg: Conn, app_db_url: str) -> None:
    """Deferred, fetched, finished, retried, deleted and truncated jobs, by the app role
    from two sessions (two stripes): the gauge's counts equal count(*) by status at each
    step."""
    one = psycopg.connect(app_db_url, autocommit=True, row_factory=dict_row)
    two = psycopg.connect(app_db_url, autocommit=True, row_factory=dict_row)
    conn = await db.connect(app_db_url, name="test")
    async with conn:

        async def check() -> None:
            assert counted(pg) == {k: v for k, v in (await gauges.job_counts(conn)).items() if v}

        with one, two:
            one.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " SELECT 'payouts', 'execute_payout', '{}' FROM generate_series(1, 5)"
            )
            await check()
            worker = two.execute("SELECT * FROM procrastinate_register_worker_v1()").fetchone()
            assert worker is not None
            fetched = []
            for _ in range(3):
                row = two.execute(
                    "SELECT id FROM procrastinate_fetch_job_v2(NULL, %s)", (worker["worker_id"],)
                ).fetchone()
                assert row is not None
                fetched.append(row["id"])
            await check()
            one.execute("SELECT procrastinate_finish_job_v1(%s, 'succeeded', false)", (fetched[0],))
            two.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (fetched[1],))
            await check()
            one.execute(
                "SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", (fetched[2],)
            )
            await check()
            two.execute("DELETE FROM procrastinate_jobs WHERE id = %s", (fetched[0],))
            one.execute("UPDATE procrastinate_jobs SET status = 'cancelled' WHERE status = 'todo'")
            await check()
            pg.execute("TRUNCATE procrastinate_jobs CASCADE")
            await check()
            one.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " VALUES ('payouts', 'execute_payout', '{}')"
            )
            await check()


def insert_instant(pg: Conn, park: str, n: int) -> str:
    row = pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, idempotency_key, requested_by)"
        " VALUES (gen_random_uuid(), %s, 'instant', 100000, %s, 'user-1') RETURNING id",
        (park, f"key-{n}"),
    ).fetchone()
    assert row is not None
    return str(row["id"])


def succeed_ago(pg: Conn, payout_id: str, ago: str) -> None:
    """pending -> processing -> succeeded, completed `ago` (an interval) before now."""
    columns = FINAL_COLUMNS["succeeded"].replace(
        "completed_at = now()", f"completed_at = now() - interval '{ago}'"
    )
    pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    pg.execute(f"UPDATE payouts SET status = 'succeeded', {columns} WHERE id = %s", (payout_id,))


async def test_the_instant_parks_gauge_counts_parks_by_their_latest_success(
    pg: Conn, app_db_url: str, locked: Lock
) -> None:
    """Distinct parks with a succeeded instant payout in 1, 7 and 30 days, exact at the
    windows' edges, read while the payouts table is locked: periodic, failed and returned
    payouts do not count, a park with two successes counts once, at its latest."""
    register_parks(pg, "a", "b", "c", "d", "e", "f", "g", "h")
    succeed_ago(pg, insert_instant(pg, "a", 1), "20 days")
    succeed_ago(pg, insert_instant(pg, "a", 2), "1 minute")
    succeed_ago(pg, insert_instant(pg, "b", 3), "3 days")
    finish(pg, insert_instant(pg, "c", 4), "failed")
    finish(pg, insert_payout(pg, "d"), "succeeded")
    # e's only success came back from the bank.
    e = insert_instant(pg, "e", 5)
    finish(pg, e, "succeeded")
    pg.execute(
        "UPDATE payouts SET status = 'returned', return_code = 'R01', returned_at = now()"
        " WHERE id = %s",
        (e,),
    )
    # Either side of the 1-day edge, inside the hour it falls in; h a month ago.
    succeed_ago(pg, insert_instant(pg, "f", 6), "1 day - 1 minute")
    succeed_ago(pg, insert_instant(pg, "g", 7), "1 day 1 minute")
    succeed_ago(pg, insert_instant(pg, "h", 8), "31 days")
    locked("payouts")
    conn = await impatient(app_db_url)
    async with conn:
        parks = await payouts.instant_parks(conn)
    assert (2, 4, 4) == (parks["d1"], parks["d7"], parks["d30"])


# The event procrastinate logs when a job enters a status, when not the status's own name.
EVENT = {"todo": "deferred", "doing": "started"}


def add_job(pg: Conn, status: str, finished_ago: str, queue: str = "payouts") -> int:
    """A job in `status` whose last event is `finished_ago` old (as procrastinate logs it)."""
    row = pg.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status)"
        " VALUES (%s, 'execute_payout', '{}', %s) RETURNING id",
        (queue, status),
    ).fetchone()
    assert row is not None
    pg.execute(
        "INSERT INTO procrastinate_events (job_id, type, at)"
        " VALUES (%s, 'deferred', now() - %s::interval - interval '1 minute'),"
        "        (%s, %s, now() - %s::interval)",
        (row["id"], finished_ago, row["id"], EVENT.get(status, status), finished_ago),
    )  # fmt: skip
    return int(row["id"])


async def test_housekeeping_deletes_failed_and_cancelled_jobs_after_their_period(
    pg: Conn, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Succeeded jobs go a week after they finished (a webhooks-queue one after an hour),
    failed, cancelled and aborted ones after KEEP_FAILED_JOBS_DAYS, in batches smaller than
    the backlog; younger ones and jobs still to run stay."""
    monkeypatch.setattr(maintenance, "JOB_BATCH", 2)
    days = run.KEEP_FAILED_JOBS_DAYS
    gone = [
        add_job(pg, "succeeded", "8 days"),
        add_job(pg, "succeeded", "9 days"),
        add_job(pg, "succeeded", "10 days"),
        add_job(pg, "succeeded", "2 hours", queue="webhooks"),
        add_job(pg, "failed", f"{days + 1} days"),
        add_job(pg, "failed", f"{days + 2} days"),
        add_job(pg, "cancelled", f"{days + 1} days"),
        add_job(pg, "aborted", f"{days + 1} days"),
    ]
    kept = [
        add_job(pg, "succeeded", "6 days"),
        add_job(pg, "failed", f"{days - 1} days"),
        add_job(pg, "cancelled", "1 day"),
        add_job(pg, "todo", "60 days"),
        add_job(pg, "doing", "60 days"),
    ]
    pool = db.make_pool(db_url, name="test", max_size=2)
    await pool.open(wait=True)
    try:
        deps = Deps(pool=pool, billing=None, settings=None)  # type: ignore[arg-type]
        deleted = await maintenance.delete_finished_jobs(
            deps,
            succeeded_hours=run.KEEP_FINISHED_JOBS_HOURS,
            unsuccessful_days=run.KEEP_FAILED_JOBS_DAYS,
            queue_hours={"webhooks": run.KEEP_WEBHOOK_JOBS_HOURS},
        )
    finally:
        await pool.close()
    left = {r["id"] for r in pg.execute("SELECT id FROM procrastinate_jobs").fetchall()}
    assert (len(gone), set(kept)) == (deleted, left)
    events = pg.execute(
        "SELECT count(*) AS n FROM procrastinate_events WHERE job_id = ANY(%s)", (gone,)
    ).fetchone()
    assert events is not None
    assert 0 == events["n"]


async def test_webhooks_switched_on_start_at_the_feed_s_end(pg: Conn, db_url: str) -> None:
    """Events committed before WEBHOOK_URL is first set are not POSTed (history is read through
    GET /v1/events) nor counted undelivered; what commits after is, and a restart does not skip
    what committed while no process was delivering."""
    register_parks(pg, "a", "b")
    for park in ("a", "b"):
        finish(pg, insert_payout(pg, park), "succeeded")
    sent: list[str] = []

    def consumer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["payout"]["id"])
        return httpx.Response(204)

    settings = make_settings(
        db_url, webhook_url="http://consumer.test/hook", webhook_secret="whsec-0123456789abcdef"
    )
    pool = db.make_pool(db_url, name="test", min_size=1, max_size=4)
    await pool.open(wait=True)
    try:
        first = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(consumer))
        result = await first.run_round()
        async with pool.connection() as conn:
            backlog = await webhooks.backlog(conn)
        await first.aclose()
        assert ([], 0, 0) == (sent, result.handed_out, backlog.events)
        later = insert_payout(pg, "a")
        again = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(consumer))
        await again.run_round()
        await again.aclose()
    finally:
        await pool.close()
    assert [later] == sent


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def test_orphans_are_payouts_whose_job_is_finished_or_gone_found_by_key(
    pg: Conn, conn: db.Conn
) -> None:
    """The completer's query finds the in-flight payouts whose job is gone or finished, not
    those whose job is waiting or running, and probes each job by its key: it never scans
    the queue table, however many finished jobs it holds (it hashed all of them every 15 s)."""
    pg.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status)"
        " SELECT 'payouts', 'execute_payout', '{}', 'succeeded' FROM generate_series(1, 20000)"
    )
    # 200 payouts in flight whose jobs wait their turn, as during a periodic batch.
    pg.execute("INSERT INTO parks (park_id) SELECT 'busy-' || i FROM generate_series(1, 200) i")
    pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " SELECT gen_random_uuid(), park_id, 'periodic', 100000 FROM parks"
    )
    pg.execute(
        "WITH j AS (INSERT INTO procrastinate_jobs (queue_name, task_name, args, lock)"
        "  SELECT 'payouts', 'execute_payout', '{}', 'park:' || park_id FROM parks"
        "  RETURNING id, lock)"
        " UPDATE payouts p SET job_id = j.id FROM j WHERE j.lock = 'park:' || p.park_id"
    )
    register_parks(pg, "gone", "done", "todo", "doing")
    jobs = {"gone": 10_000_000, "done": 1}
    for status in ("todo", "doing"):
        row = pg.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status)"
            " VALUES ('payouts', 'execute_payout', '{}', %s) RETURNING id",
            (status,),
        ).fetchone()
        assert row is not None
        jobs[status] = row["id"]
    for park, job in jobs.items():
        pg.execute("UPDATE payouts SET job_id = %s WHERE id = %s", (job, insert_payout(pg, park)))
    pg.execute("ANALYZE procrastinate_jobs")
    pg.execute("ANALYZE payouts")
    async with conn.transaction():
        found = await payouts.orphans(conn, min_age_seconds=0, limit=500)
        assert ["done", "gone"] == sorted(r["park_id"] for r in found)
        cur = await conn.execute(
            "EXPLAIN (FORMAT JSON) " + payouts.Q["orphans"],
            {"min_age_seconds": 0, "limit": 500},
        )
        row = await cur.fetchone()
    assert row is not None
    plan = row["QUERY PLAN"][0]["Plan"]
    scans = [
        n["Node Type"]
        for n in plan_nodes(plan)
        if n.get("Relation Name") == "procrastinate_jobs" and "Index" not in n["Node Type"]
    ]
    assert [] == scans
