"""Years of history (issue 21): every periodic query of every process, on a database filled
with one year at the seed's scale, beside the same query on a freshly migrated one.

    .venv/bin/python -m tests.bench.history [--scale N] [--repeat R]

`--scale` is the year's payouts (default 5,000,000, the seed's 80,000 parks paid weekly and
pressing now and then); the year also has two events and two audit entries per payout and one
finished procrastinate job per payout (with procrastinate's three events each), as if the hourly
housekeeping had fallen behind. The fill writes straight into the tables as the schema owner
(INSERT ... SELECT generate_series, triggers off with session_replication_role = replica), with
everything the triggers would have written written by the fill itself: each payout's events,
stamped with consecutive feed positions; the audit log's closed months with their chain heads
and an `audit verify` record per month, so the daily incremental verify skips them as it does in
production (the current month is linked by the audit bench's generator, valid, and walked);
the job counts and instant parks the 0015 triggers keep; webhooks on since the start, every park
delivered up to the feed's end. The empty database is freshly migrated with the same parks.

Then each periodic query is run `--repeat` times on each database, in the order and with the
parameters its process uses (statements that write are run in a transaction rolled back), and
its fastest time (what it reads; the median, printed beside, adds the machine's other load) is
printed beside the empty database's. Goal: <= 10 ms each, and <= 2x the empty database (a
difference under 1 ms, this machine's round-trip noise, counts as even).
The hourly and daily statements are printed with the same goal; the fill's duration and the
database's size come first.

A PostgreSQL of its own (fsync off), or BENCH_DATABASE_URL (a superuser: the bench creates
databases and turns triggers off). The timings share the machine with whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from procrastinate.sql import queries as pq
from psycopg.types.json import Jsonb

from service.audit import chain as audit_chain
from service.audit import store as audit
from service.audit.chain import next_month
from service.core import db, queue
from service.events import outbox as events
from service.events import webhooks
from service.ops import checks, gauges, maintenance, migrate
from service.payouts import manual
from service.payouts import store as payouts
from service.worker import run as run_worker
from tests.bench import audit as audit_bench
from tests.bench.common import bench_server
from tests.conftest import with_dbname

GOAL_MS = 10.0
GOAL_RATIO = 2.0
# Below this difference two timings are the same on this machine (a round trip is 0.1-0.3 ms).
NOISE_MS = 1.0
# The seed's fleet; a smaller scale has fewer parks (about 60 payouts a park a year).
SEED_PARKS = 80_000
IN_FLIGHT = 200
TIMEOUT_MS = 60_000
PERIOD_DAYS = 7
STALLED_SECONDS = 60


def say(message: str) -> None:
    print(message, flush=True)


def parks_for(scale: int) -> int:
    return max(50, min(SEED_PARKS, scale // 60))


# --- the fill ------------------------------------------------------------------------------

FILL_PARKS = """
INSERT INTO parks (park_id, instant_payouts_enabled, registered_at, last_payout_at,
                   last_periodic_attempt_at)
SELECT 'park-' || lpad(i::text, 6, '0'), i %% 3 = 0, now() - interval '400 days',
       -- Spread over the period and two hours: about 1 park in 85 is due now.
       t.at - interval '1 hour', t.at
FROM generate_series(0, %(parks)s - 1) i
CROSS JOIN LATERAL (
    SELECT now() - make_interval(secs => i::float8 / %(parks)s * (86400 * 7 + 7200)) AS at
) t
"""

# Payout i: park i %% parks, created i/n of a year after a year ago; the newest IN_FLIGHT are
# still in flight (one per park), the others final: 70 %% periodic, 30 %% instant; one in 20
# skipped, one in 100 failed, the rest succeeded.
FILL_PAYOUTS = """
INSERT INTO payouts (id, park_id, kind, status, idempotency_key, requested_by, request_id,
                     requested_amount, max_amount, available, amount, currency, billing_params,
                     ordered_at, billing_payout_id, failure_code, attempts, job_id, created_at,
                     updated_at, completed_at)
SELECT {payout_id}, 'park-' || lpad((i %% %(parks)s)::text, 6, '0'),
       CASE WHEN i %% 10 < 7 THEN 'periodic' ELSE 'instant' END,
       s.status,
       CASE WHEN i %% 10 >= 7 THEN 'key-' || i END,
       CASE WHEN i %% 10 >= 7 THEN 'user-' || (i %% %(parks)s) END,
       CASE WHEN i %% 10 >= 7 THEN md5('request-' || i) END,
       NULL, 100000, 5000,
       CASE WHEN s.status IN ('succeeded', 'processing') THEN 1234.50 END,
       'RUB',
       CASE WHEN s.status IN ('succeeded', 'processing') THEN '{"account": "40702810"}'::jsonb END,
       CASE WHEN s.status IN ('succeeded', 'processing') THEN t.at + interval '1 second' END,
       CASE WHEN s.status = 'succeeded' THEN 'bp-' || i END,
       CASE WHEN s.status = 'failed' THEN 'bank_rejected' END,
       1, i + 1, t.at, t.at + interval '2 seconds',
       CASE WHEN s.status IN ('succeeded', 'failed', 'skipped') THEN t.at + interval '2 seconds' END
FROM generate_series(0, %(n)s - 1) i
CROSS JOIN LATERAL (SELECT now() - make_interval(secs => (%(n)s - i)::float8 / %(n)s * 365 * 86400)
                    - interval '10 minutes' AS at) t
CROSS JOIN LATERAL (SELECT CASE
    WHEN i >= %(n)s - %(in_flight)s THEN CASE WHEN i %% 2 = 0 THEN 'pending' ELSE 'processing' END
    WHEN i %% 100 = 1 THEN 'failed'
    WHEN i %% 20 = 0 THEN 'skipped'
    ELSE 'succeeded' END AS status) s
"""

# Each payout's events as the triggers write them, created then final, stamped in that order.
FILL_EVENTS = """
CREATE TEMPORARY SEQUENCE fill_positions;
INSERT INTO events (xid, type, park_id, payout_id, created_at, payout, position)
SELECT pg_current_xact_id(), e.type, p.park_id, p.id, e.at, e.payout, nextval('fill_positions')
FROM (SELECT * FROM payouts ORDER BY created_at) p
CROSS JOIN LATERAL (
    SELECT 'payout.created' AS type, p.created_at AS at,
           payout_event_snapshot(p) || '{"status": "pending", "completed_at": null}' AS payout
    UNION ALL
    SELECT 'payout.' || p.status, p.completed_at, payout_event_snapshot(p)
    WHERE p.completed_at IS NOT NULL
) e;
UPDATE events_sequencer SET last_position = (SELECT last_value FROM fill_positions);
"""

# One finished job per final payout (one in 200 failed, one in 500 cancelled), a todo job per
# payout in flight, each with procrastinate's events as its triggers write them.
FILL_JOBS = """
INSERT INTO procrastinate_jobs (id, queue_name, task_name, priority, lock, args, status,
                                attempts)
SELECT i + 1, 'payouts', 'execute_payout', 0, 'park:park-' || lpad((i %% %(parks)s)::text, 6, '0'),
       jsonb_build_object('payout_id', {payout_id}::text),
       (CASE WHEN i >= %(n)s - %(in_flight)s THEN 'todo'
             WHEN i %% 200 = 3 THEN 'failed'
             WHEN i %% 500 = 7 THEN 'cancelled'
             ELSE 'succeeded' END)::procrastinate_job_status,
       CASE WHEN i >= %(n)s - %(in_flight)s THEN 0 ELSE 1 END
FROM generate_series(0, %(n)s - 1) i;
SELECT setval('procrastinate_jobs_id_seq', %(n)s + 1);
INSERT INTO procrastinate_events (job_id, type, at)
SELECT j.id, e.type::procrastinate_job_event_type, e.at
FROM procrastinate_jobs j
JOIN payouts p ON p.job_id = j.id
CROSS JOIN LATERAL (
    SELECT 'deferred' AS type, p.created_at AS at
    UNION ALL SELECT 'started', p.created_at + interval '1 second' WHERE j.status <> 'todo'
    UNION ALL SELECT j.status::text, p.created_at + interval '2 seconds' WHERE j.status <> 'todo'
) e;
"""

# The audit log's closed months: written into their partitions with chains of consecutive
# seqs (links not computed: the month is recorded as verified with its heads' digest, which
# is what the incremental verify checks).
FILL_AUDIT_MONTH = """
INSERT INTO {name} (id, at, actor_type, actor_id, park_id, action, outcome, request_id,
                       payout_id, details, chain_stripe, chain_seq, chain_hash)
SELECT %(first)s + g, %(start)s::timestamptz + (%(end)s::timestamptz - %(start)s::timestamptz)
       * (g::float8 / %(count)s),
       CASE WHEN g %% 2 = 0 THEN 'user' ELSE 'system' END,
       CASE WHEN g %% 2 = 0 THEN 'user-' || (g %% %(parks)s) ELSE 'worker' END,
       'park-' || lpad((g %% %(parks)s)::text, 6, '0'),
       CASE WHEN g %% 2 = 0 THEN 'payout.instant.request' ELSE 'payout.succeeded' END,
       'ok', CASE WHEN g %% 2 = 0 THEN md5('request-' || g) END, md5('audit-' || g)::uuid,
       jsonb_build_object('key', 'k-' || g, 'amount', '1234.50'),
       (g %% 8)::smallint, g / 8 + 1, sha256(int8send(%(first)s + g))
FROM generate_series(0, %(count)s - 1) g;
INSERT INTO audit_chain_heads (month, stripe, last_seq, last_hash, first_id, last_id)
SELECT %(month)s, s, (%(count)s - 1 - s) / 8 + 1,
       sha256(int8send(%(first)s + s + 8 * ((%(count)s - 1 - s) / 8))),
       %(first)s + s, %(first)s + s + 8 * ((%(count)s - 1 - s) / 8)
FROM generate_series(0, least(7, %(count)s - 1)) s
ON CONFLICT (month, stripe) DO UPDATE
SET last_seq = excluded.last_seq, last_hash = excluded.last_hash,
    first_id = excluded.first_id, last_id = excluded.last_id;
DELETE FROM audit_chain_heads WHERE month = %(month)s AND last_seq = 0;
INSERT INTO audit_verified_months (month, entries, month_digest)
VALUES (%(month)s, %(count)s, audit_month_digest(%(month)s));
"""

# What the triggers turned off for the fill keep as payouts and jobs change (0015).
FILL_DERIVED = """
INSERT INTO job_status_counts (status, stripe, n)
SELECT status, 0, count(*) FROM procrastinate_jobs GROUP BY status
ON CONFLICT (status, stripe) DO UPDATE SET n = excluded.n;
INSERT INTO instant_payout_parks (park_id, last_succeeded_at)
SELECT park_id, max(completed_at) FROM payouts
WHERE kind = 'instant' AND status = 'succeeded' AND completed_at > now() - interval '30 days'
GROUP BY park_id;
INSERT INTO instant_payout_park_hours (hour, stripe, n)
SELECT date_trunc('hour', last_succeeded_at, 'UTC'), 0, count(*) FROM instant_payout_parks
GROUP BY 1;
"""

FILL_REST = """
-- Webhooks on since the start; every park delivered up to the feed's end.
INSERT INTO webhook_feed (position, started_at)
SELECT last_position, now() - interval '1 year' FROM events_sequencer;
INSERT INTO webhook_feed_parks (park_id, delivered, pending)
SELECT park_id, max(position), max(position) FROM events GROUP BY park_id;
-- A year of daily reconciliations.
INSERT INTO billing_reconciliations (since, until, mismatches, by_kind, finished_at)
SELECT t.at - interval '3 days', t.at, 0, '{}', t.at
FROM generate_series(1, 365) d
CROSS JOIN LATERAL (SELECT now() - make_interval(days => d) AS at) t;
"""


# Payout i's id: consecutive, so the primary key fills in order (a random uuid per row costs
# the fill a random write into a 5 M-entry index each).
PAYOUT_ID = "('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid"
# Their indexes are dropped while these fill and built again after (in one sort each).
BULK_TABLES = ("payouts", "events", "procrastinate_jobs", "procrastinate_events")
INDEXES = """
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
WHERE t.relname = ANY(%s)
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
"""


def fill_current_month(conn: psycopg.Connection[Any], month: date, count: int, first: int) -> None:
    """The current month with valid chains (the daily verify walks it): linked here by the
    audit bench's generator (the chain trigger would take minutes), COPYed with the chain
    triggers off for this transaction, and their heads set."""
    rows, heads = audit_bench.generate(month, count, first, random.Random(20261206))
    with conn.transaction():
        for trigger in ("zz_audit_log_chain", "zz_audit_log_chain_heads"):
            conn.execute(f"ALTER TABLE audit_log DISABLE TRIGGER {trigger}")
        with conn.cursor().copy(
            f"COPY audit_log ({audit_bench.COLUMNS}) FROM STDIN (FORMAT BINARY)"
        ) as cp:
            cp.set_types(audit_bench.TYPES)
            for row in rows:
                cp.write_row(row)
        for trigger in ("zz_audit_log_chain", "zz_audit_log_chain_heads"):
            conn.execute(f"ALTER TABLE audit_log ENABLE ALWAYS TRIGGER {trigger}")
        conn.cursor().executemany(
            "INSERT INTO audit_chain_heads (month, stripe, last_seq, last_hash, first_id, last_id)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (month, stripe) DO UPDATE"
            " SET last_seq = excluded.last_seq, last_hash = excluded.last_hash,"
            " first_id = excluded.first_id, last_id = excluded.last_id",
            heads,
        )


def months_back(this: date, n: int) -> list[date]:
    index = this.year * 12 + this.month - 1
    return [date((index - k) // 12, (index - k) % 12 + 1, 1) for k in range(n, 0, -1)]


def fill(url: str, scale: int) -> None:
    parks = parks_for(scale)
    in_flight = min(IN_FLIGHT, parks, scale // 10)
    p = {"n": scale, "parks": parks, "in_flight": in_flight}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("SET work_mem = '512MB'")
        conn.execute("SET maintenance_work_mem = '1GB'")
        indexes = conn.execute(INDEXES, (list(BULK_TABLES),)).fetchall()
        for name, _ in indexes:
            conn.execute(f"DROP INDEX {name}")
        for label, statement in (
            ("parks", FILL_PARKS),
            ("payouts", FILL_PAYOUTS),
            ("events", FILL_EVENTS),
            ("jobs", FILL_JOBS),
        ):
            began = time.perf_counter()
            with conn.transaction():
                for part in statement.split(";\n"):
                    if part.strip():
                        conn.execute(part.replace("{payout_id}", PAYOUT_ID), p)
            say(f"  filled {label} in {time.perf_counter() - began:.0f} s")
        began = time.perf_counter()
        today = datetime.now(UTC).date()
        current = today.replace(day=1)
        closed = months_back(current, 12)
        entries = 2 * scale
        now_count = max(1, entries * today.day // 365)
        per_month = max(1, (entries - now_count) // len(closed))
        first = 1
        for month in closed:
            name = f"audit_log_{month:%Y_%m}"
            # A table of its own, attached once full: the chain triggers are the parent's
            # (and fire even under replica).
            conn.execute(
                f"CREATE TABLE {name} (LIKE audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
            with conn.transaction():
                for part in FILL_AUDIT_MONTH.replace("{name}", name).split(";\n"):
                    if part.strip():
                        conn.execute(
                            part,
                            {
                                "first": first,
                                "count": per_month,
                                "parks": parks,
                                "month": month,
                                "start": datetime(month.year, month.month, 1, tzinfo=UTC),
                                "end": datetime(
                                    next_month(month).year, next_month(month).month, 1, tzinfo=UTC
                                ),
                            },
                        )
                conn.execute(
                    f"ALTER TABLE audit_log ATTACH PARTITION {name} "
                    f"FOR VALUES FROM ('{month}') TO ('{next_month(month)}')"
                )
            first += per_month
        fill_current_month(conn, current, now_count, first)
        conn.execute(
            "SELECT setval(pg_get_serial_sequence('audit_log', 'id'), %s)", (first + now_count,)
        )
        say(
            f"  filled audit_log in {time.perf_counter() - began:.0f} s "
            f"({first - 1 + now_count:,} entries, {now_count:,} this month)"
        )
        conn.execute("SET session_replication_role = replica")
        for part in (FILL_DERIVED + FILL_REST).split(";\n"):
            if part.strip():
                conn.execute(part)
        began = time.perf_counter()
        for _, definition in indexes:
            conn.execute(definition)
        say(f"  {len(indexes)} indexes built in {time.perf_counter() - began:.0f} s")
        began = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        say(f"  VACUUM ANALYZE in {time.perf_counter() - began:.0f} s")


def fill_parks(url: str, scale: int) -> None:
    """The empty database's fleet: the same parks, with no history (the due scan reads them)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FILL_PARKS, {"parks": parks_for(scale)})
        conn.execute("ANALYZE parks")


def prepare(url: str) -> int:
    """What every database needs to run the periodic queries: a registered worker, webhooks on."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT * FROM procrastinate_register_worker_v1()").fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO webhook_feed (position) SELECT last_position FROM events_sequencer "
            "ON CONFLICT (id) DO NOTHING"
        )
        return int(row[0])


# --- the periodic queries ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    name: str
    who: str  # which processes run it, and how often
    run: Callable[[db.Conn, int], Awaitable[Any]]


async def _rolled_back(conn: db.Conn, query: Any, **params: Any) -> None:
    async with conn.transaction(force_rollback=True):
        await db.execute(conn, query, **params)


def _q(query: Any, **params: Any) -> Callable[[db.Conn, int], Awaitable[Any]]:
    async def run(conn: db.Conn, worker_id: int) -> Any:
        return await db.fetch_all(conn, query, **params)

    return run


def _rb(query: Any, **params: Any) -> Callable[[db.Conn, int], Awaitable[Any]]:
    async def run(conn: db.Conn, worker_id: int) -> Any:
        return await _rolled_back(conn, query, **params)

    return run


async def _fetch_job(conn: db.Conn, worker_id: int) -> None:
    await _rolled_back(conn, pq["fetch_job"], queues=None, worker_id=worker_id)


async def _heartbeat(conn: db.Conn, worker_id: int) -> None:
    await db.fetch_all(conn, pq["update_heartbeat"], worker_id=worker_id)


async def _periodic_defer(conn: db.Conn, worker_id: int) -> None:
    tick = int(time.time())
    await _rolled_back(
        conn,
        pq["defer_periodic_job"],
        queue=queue.QUEUE_MAINTENANCE,
        lock=None,
        queueing_lock=None,
        task_name="maintenance",
        priority=queue.PRIORITY_MAINTENANCE,
        periodic_id="",
        defer_timestamp=tick,
        args=Jsonb({"timestamp": tick}),
    )


async def _verify(conn: db.Conn, worker_id: int) -> None:
    result = await audit_chain.verify(conn, report=lambda _: None, full=False, record=False)
    if isinstance(result, audit_chain.Broken):
        raise RuntimeError(f"audit verify found a broken link: {result}")


async def _webhook_due(conn: db.Conn, worker_id: int) -> None:
    for failing, slots in ((False, webhooks.HEALTHY_SLOTS), (True, webhooks.FAILING_SLOTS)):
        await db.fetch_all(
            conn,
            webhooks.Q["due"],
            busy=[],
            failing=failing,
            parks=slots,
            per_park=webhooks.EVENTS_PER_PARK,
        )


async def _ensure_partitions(conn: db.Conn, worker_id: int) -> None:
    await audit.ensure_partitions(conn)


def queries() -> list[Query]:
    every = "API and worker, every 15 s"
    worker15 = "worker, every 15 s"
    period = timedelta(days=PERIOD_DAYS)
    return [
        # The gauges every process refreshes (service/ops/gauges.py), in its order.
        Query("gauge: jobs by status", every, lambda c, w: gauges.job_counts(c)),
        Query("gauge: oldest in flight", every, lambda c, w: payouts.in_flight_ages(c)),
        Query("gauge: instant parks", every, lambda c, w: payouts.instant_parks(c)),
        Query("gauge: audit months ahead", every, _q(audit.Q["months_ahead"])),
        Query("gauge: manual pending approval", every, lambda c, w: manual.waiting(c)),
        Query("gauge: webhook backlog", every, lambda c, w: webhooks.backlog(c)),
        Query("gauge: reconciliation", worker15, _q(db.queries("reconcile")["latest_run"])),
        Query("gauge: checks", worker15, lambda c, w: checks.states(c)),
        Query("billing gate state", "worker, every 1 s", _q(db.queries("billing")["gate_state"])),
        # Job fetching and the worker's own upkeep (procrastinate's queries).
        Query("job fetch", "worker, each job and each poll", _fetch_job),
        Query("worker heartbeat", "worker, every 10 s", _heartbeat),
        Query(
            "jobs to abort",
            "worker, every 5 s",
            _q(pq["list_jobs_to_abort"], queue_name=None),
        ),
        Query("periodic defer", "worker, each periodic task's tick", _periodic_defer),
        # The maintenance task (every 15 s).
        Query(
            "stalled jobs",
            worker15,
            _q(
                pq["select_stalled_jobs_by_heartbeat"],
                seconds_since_heartbeat=STALLED_SECONDS,
                queue=None,
                task_name=None,
            ),
        ),
        Query(
            "orphan payouts",
            worker15,
            _rb(payouts.Q["orphans"], min_age_seconds=STALLED_SECONDS, limit=500),
        ),
        Query(
            "manual expiry", worker15, _rb(payouts.Q["expire"], id=None, limit=manual.EXPIRE_BATCH)
        ),
        # The periodic scan (every 5 min), its first batch.
        Query(
            "due scan",
            "worker, every 5 min",
            _q(db.queries("periodic")["due_candidates"], period=period, limit=1000),
        ),
        Query("returns cursor", "worker, every 30 s", _q(db.queries("returns")["cursor"])),
        # The webhook dispatcher's turn (every 0.2 s while WEBHOOK_URL is set).
        Query("webhooks: stamp", "worker, every 0.2 s", lambda c, w: events.sequence(c)),
        Query(
            "webhooks: hand out",
            "worker, every 0.2 s",
            _rb(webhooks.Q["hand_out"], limit=webhooks.HAND_OUT_BATCH),
        ),
        Query("webhooks: due parks", "worker, every 0.2 s", _webhook_due),
        # Housekeeping (hourly) and the daily verify.
        Query("housekeeping: audit partitions", "worker, hourly", _ensure_partitions),
        Query(
            "housekeeping: events expiry batch",
            "worker, hourly",
            _rb(events.Q["expire"], days=90.0, batch=events.EXPIRE_BATCH),
        ),
        *housekeeping_jobs(),
        Query("audit verify (incremental)", "daily", _verify),
    ]


def housekeeping_jobs() -> list[Query]:
    """One batch of each pass of maintenance.delete_finished_jobs (as the hourly run)."""
    batch = maintenance.JOB_BATCH
    return [
        Query(
            "housekeeping: succeeded jobs batch",
            "worker, hourly",
            _rb(
                maintenance.Q["delete_old_succeeded_jobs"],
                batch=batch,
                hours=run_worker.KEEP_FINISHED_JOBS_HOURS,
            ),
        ),
        Query(
            "housekeeping: failed jobs batch",
            "worker, hourly",
            _rb(
                maintenance.Q["delete_old_unsuccessful_jobs"],
                batch=batch,
                days=run_worker.KEEP_FAILED_JOBS_DAYS,
            ),
        ),
        Query(
            "housekeeping: webhook jobs batch",
            "worker, hourly",
            _rb(
                maintenance.Q["delete_old_queue_jobs"],
                batch=batch,
                queue=queue.QUEUE_WEBHOOKS,
                hours=run_worker.KEEP_WEBHOOK_JOBS_HOURS,
            ),
        ),
    ]


async def measure(url: str, repeat: int, worker_id: int) -> dict[str, tuple[float, float]]:
    """Fastest and median milliseconds of each query, `repeat` runs (one warm-up first)."""
    conn = await db.connect(url, name="bench-history")
    timings: dict[str, tuple[float, float]] = {}
    async with conn:
        await conn.execute(f"SET statement_timeout = {TIMEOUT_MS}")
        for query in queries():
            samples = []
            try:
                await query.run(conn, worker_id)
                for _ in range(repeat):
                    began = time.perf_counter()
                    await query.run(conn, worker_id)
                    samples.append((time.perf_counter() - began) * 1000)
                timings[query.name] = (min(samples), statistics.median(samples))
            except psycopg.errors.QueryCanceled:
                timings[query.name] = (float("inf"), float("inf"))
    return timings


def database_size(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        found = {}
        for table in ("payouts", "events", "audit_log", "procrastinate_jobs", "parks"):
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            found[table] = int(row[0]) if row else 0
    return found


def ms(value: float) -> str:
    return "timeout" if value == float("inf") else f"{value:.2f} ms"


def report(empty: dict[str, tuple[float, float]], full: dict[str, tuple[float, float]]) -> bool:
    """Each query's fastest run decides (what it reads; the median adds the machine's other
    load), the median beside it."""
    all_met = True
    width = max(len(q.name) for q in queries())
    say(
        f"{'query':<{width}}  {'history':>10}  {'empty':>9}  {'ratio':>6}  goal  "
        f"{'medians':>19}  who"
    )
    for query in queries():
        (h, hm), (e, em) = full[query.name], empty[query.name]
        met = h <= GOAL_MS and (h <= GOAL_RATIO * e or h - e < NOISE_MS)
        all_met = all_met and met
        ratio = h / e if e > 0 else float("inf")
        say(
            f"{query.name:<{width}}  {ms(h):>10}  {ms(e):>9}  x{ratio:>5.1f}  "
            f"{'met ' if met else 'MISS'}  {ms(hm):>9} {ms(em):>9}  {query.who}"
        )
    return all_met


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.history", description=__doc__)
    parser.add_argument("--scale", type=int, default=5_000_000, help="payouts in the year")
    parser.add_argument("--repeat", type=int, default=15, help="runs of each query")
    parser.add_argument(
        "--keep", action="store_true", help="keep the databases (BENCH_DATABASE_URL)"
    )
    parser.add_argument(
        "--reuse", metavar="PREFIX", help="measure <PREFIX>_year and _empty kept by --keep"
    )
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)
    # Under /var/tmp, traversable: the postgres account must reach the data dir when we are root.
    workdir = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="fp-bench-history-"))
    workdir.chmod(0o755)
    try:
        with bench_server(workdir) as server_url:
            return run(server_url, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(server_url: str, args: argparse.Namespace) -> int:
    prefix = args.reuse or f"fp_bench_history_{os.getpid()}"
    names = {label: f"{prefix}_{label}" for label in ("empty", "year")}
    urls = {label: with_dbname(server_url, name) for label, name in names.items()}
    try:
        say(f"history bench: one year at {args.scale:,} payouts ({parks_for(args.scale):,} parks)")
        if args.reuse:
            say(f"fill: reusing {names['year']} and {names['empty']} as they are")
        else:
            with psycopg.connect(server_url, autocommit=True) as admin:
                for name in names.values():
                    admin.execute(f'CREATE DATABASE "{name}"')
            for url in urls.values():
                asyncio.run(migrate.migrate(url))
            fill_parks(urls["empty"], args.scale)
            began = time.perf_counter()
            fill(urls["year"], args.scale)
            say(f"fill: {time.perf_counter() - began:.0f} s")
        rows = counts(urls["year"])
        say(
            ", ".join(f"{table} {n:,}" for table, n in rows.items())
            + f"; database size {database_size(urls['year']) / 2**30:.2f} GiB "
            f"(empty: {database_size(urls['empty']) / 2**20:.0f} MiB, freshly migrated with "
            "the same parks and no history)"
        )
        empty = asyncio.run(measure(urls["empty"], args.repeat, prepare(urls["empty"])))
        full = asyncio.run(measure(urls["year"], args.repeat, prepare(urls["year"])))
        say(
            f"every periodic query, fastest of {args.repeat} runs (goal <= {GOAL_MS:g} ms and "
            f"<= {GOAL_RATIO:g}x empty; under {NOISE_MS:g} ms apart counts as even); medians "
            "(history, empty) beside:"
        )
        met = report(empty, full)
        say(f"history bench: {'every goal met' if met else 'goals MISSED (see MISS above)'}")
        return 1 if args.fail_on_miss and not met else 0
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            for name in names.values() if not (args.keep or args.reuse) else ():
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    raise SystemExit(main())
