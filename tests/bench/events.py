"""Events benchmark (issue 12): reader throughput through GET /v1/events, and what the outbox
adds to an instant press.

    .venv/bin/python -m tests.bench.events [--scale S]

1. Reader throughput: events per second walking the whole feed (limit=100) through a real
   `fleet-payouts serve` process, against the same pages read with the bare query over
   psycopg in the same run (the database's share of the cost).
2. Outbox cost per instant press: statements the database runs, database time and API CPU
   per accepted press, with the event triggers against the same presses with them disabled.

A PostgreSQL of its own (fsync off, as the test suite's), or BENCH_DATABASE_URL (a superuser:
the bench creates databases and disables triggers). Timings share the machine with whatever
else runs: compare the ratios, not the absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from psycopg.rows import dict_row

from service.core import db
from service.core.settings import Secret, Settings
from service.events import outbox as events
from service.ops import migrate
from service.payouts import instant
from service.worker.app import app as queue_app
from tests.bench.common import bench_server
from tests.conftest import with_dbname
from tests.helpers.metrics import statements_sent

REPO_ROOT = Path(__file__).resolve().parents[2]
API_TOKEN = "bench-api-token-0123456789"
TRIGGERS = ("payouts_events_created", "payouts_events_final")

# Goals, each with its reason.
# A whole periodic batch (80,000 parks: 160,000 events) read by a consumer that was away,
# in about a minute.
READER_GOAL_EVENTS_PER_S = 2_000
# The outbox must not make the press noticeably dearer: one statement more in the database
# (the trigger's INSERT), no round trip more, at most a tenth more database time.
EXTRA_ROUND_TRIPS_GOAL = 0
EXTRA_DB_TIME_GOAL = 0.10


@dataclass(frozen=True)
class Figure:
    name: str
    value: str
    goal: str
    ratio: float
    ratio_of: str
    met: bool

    def render(self) -> str:
        verdict = "met" if self.met else "MISSED"
        return (
            f"{self.name}: {self.value} (goal {self.goal}: {verdict}); "
            f"ratio {self.ratio:.2f} {self.ratio_of}"
        )


# --- the database server and its databases ------------------------------------------------


@contextlib.contextmanager
def database(server_url: str, label: str) -> Iterator[str]:
    name = f"fp_bench_events_{os.getpid()}_{label}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        asyncio.run(migrate.migrate(url))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            # Time spent in the trigger functions themselves (pg_stat_user_functions).
            conn.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, payouts: int) -> int:
    """`payouts` parks, each with one succeeded payout: two events apiece. Returns the count."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO parks (park_id) SELECT 'park-' || i FROM generate_series(1, %s) i",
            (payouts,),
        )
        conn.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount)"
            " SELECT gen_random_uuid(), park_id, 'periodic', 100000 FROM parks"
        )
        conn.execute("UPDATE payouts SET status = 'processing'")
        conn.execute(
            "UPDATE payouts SET status = 'succeeded', available = 500, amount = 123.45,"
            " currency = 'RUB', billing_params = '{}', ordered_at = now(),"
            " billing_payout_id = 'bp-' || id, completed_at = now()"
        )
        conn.execute("VACUUM ANALYZE events")
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


# --- 1. reader throughput ------------------------------------------------------------------


def figure_reader(server_url: str, scale: float) -> Figure:
    with database(server_url, "reader") as url:
        total = fill(url, max(100, int(10_000 * scale)))
        with api_process(url) as api:
            walk_api(api)  # warm-up: connections, plans, caches
            api_rate = max(rate(lambda: walk_api(api), total) for _ in range(2))
        sql_rate = max(rate(lambda: walk_sql(url), total) for _ in range(2))
    return Figure(
        name=f"reader throughput, GET /v1/events?limit=100 over {total:,} events",
        value=f"{api_rate:,.0f} events/s",
        goal=f">= {READER_GOAL_EVENTS_PER_S:,} events/s",
        ratio=api_rate / sql_rate,
        ratio_of=f"of the bare page query over psycopg ({sql_rate:,.0f} events/s)",
        met=api_rate >= READER_GOAL_EVENTS_PER_S,
    )


def rate(walk: Callable[[], int], total: int) -> float:
    """Events per second of one walk over the whole feed (best of the calls is taken)."""
    started = time.perf_counter()
    seen = walk()
    elapsed = time.perf_counter() - started
    assert total == seen, f"walked {seen} events of {total}"
    return total / elapsed


def walk_api(api: str) -> int:
    seen = 0
    after = None
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        while True:
            params = {"limit": 100} | ({"after": after} if after else {})
            r = client.get("/v1/events", params=params)
            r.raise_for_status()
            page = r.json()
            if not page["events"]:
                return seen
            seen += len(page["events"])
            after = page["next_cursor"]


def walk_sql(url: str) -> int:
    seen = 0
    after = events.START
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        while True:
            conn.execute(events.Q["sequence"], {"batch": events.READ_BATCH})
            rows = conn.execute(events.Q["page"], {"after": after, "limit": 100}).fetchall()
            found = [r for r in rows if r["seq"] is not None]
            if not found:
                return seen
            seen += len(found)
            after = int(found[-1]["position"])


@contextlib.contextmanager
def api_process(url: str) -> Iterator[str]:
    with socket_port() as port:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("WEBHOOK_")},
            "DATABASE_URL": url,
            "BILLING_URL": "http://127.0.0.1:9",
            "API_TOKENS": API_TOKEN,
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(REPO_ROOT),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/ping", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    _, err = proc.communicate(timeout=5)
                    raise RuntimeError(f"the API did not start: {err.decode()[-2000:]}")
                time.sleep(0.05)  # polling for start-up, not synchronising
            yield base
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextlib.contextmanager
def socket_port() -> Iterator[int]:
    from fleet_payouts_devkit.processes import free_port

    yield free_port()


# --- 2. the outbox's cost on the instant press -----------------------------------------------


@dataclass(frozen=True)
class PressCost:
    round_trips: float
    server_statements: float
    db_ms: float
    trigger_ms: float
    api_cpu_ms: float


def settings_for(url: str) -> Settings:
    return Settings(
        database_url=Secret(url),
        billing_url="http://127.0.0.1:9",
        api_tokens=(Secret(API_TOKEN),),
        log_level="WARNING",
    )


async def presses(url: str, parks: list[str]) -> PressCost:
    """One accepted press per park, in-process on one connection; the cost of each, averaged."""
    settings = settings_for(url)
    pool = db.make_pool(url, name="bench", min_size=1, max_size=1)
    await pool.open(wait=True)
    try:
        async with queue_app.open_async(pool=pool), pool.connection() as conn:
            dbid = await _dbid(conn)
            # Statements run inside the triggers count too.
            await conn.execute("SET pg_stat_statements.track = 'all'")
            await conn.execute("SELECT pg_stat_statements_reset()")
            triggers_before = await _trigger_ms(conn)
            sent = statements_sent()
            cpu = time.process_time()
            for park in parks:
                req = instant.InstantRequest(
                    park_id=park,
                    user_id="bench",
                    idempotency_key=uuid.uuid4().hex,
                    request_id=uuid.uuid4().hex,
                    amount=None,
                )
                accepted = await instant.request_instant(conn, settings, req)
                assert not accepted.replay
            cpu = time.process_time() - cpu
            sent = statements_sent() - sent
            cur = await conn.execute(
                "SELECT sum(calls) AS calls, sum(total_exec_time) FILTER (WHERE toplevel) AS ms"
                " FROM pg_stat_statements"
                " WHERE dbid = %s AND query NOT LIKE '%%pg_stat_statements%%'",
                (dbid,),
            )
            row = await cur.fetchone()
            trigger_ms = await _trigger_ms(conn) - triggers_before
    finally:
        await pool.close()
    assert row is not None
    n = len(parks)
    return PressCost(
        sent / n, float(row["calls"]) / n, float(row["ms"]) / n, trigger_ms / n, 1000 * cpu / n
    )


async def _trigger_ms(conn: db.Conn) -> float:
    """Milliseconds spent so far in the outbox's trigger functions, this session's included."""
    # This backend's own counts reach the shared statistics when it next goes idle.
    await conn.execute("SELECT pg_stat_force_next_flush()")
    cur = await conn.execute(
        "SELECT coalesce(sum(total_time), 0) AS ms FROM pg_stat_user_functions"
        " WHERE funcname IN ('payouts_events_created', 'payouts_events_final')"
    )
    row = await cur.fetchone()
    assert row is not None
    return float(row["ms"])


async def _dbid(conn: db.Conn) -> int:
    cur = await conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
    row = await cur.fetchone()
    assert row is not None
    return int(row["oid"])


def figure_press_cost(server_url: str, scale: float) -> Figure:
    per_round = max(20, int(300 * scale))
    rounds = 5
    with database(server_url, "with") as with_url, database(server_url, "without") as bare_url:
        with psycopg.connect(bare_url, autocommit=True) as conn:
            for trigger in TRIGGERS:
                conn.execute(f"ALTER TABLE payouts DISABLE TRIGGER {trigger}")
        for url in (with_url, bare_url):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO parks (park_id, instant_payouts_enabled)"
                    " SELECT 'park-' || i, true FROM generate_series(1, %s) i",
                    (per_round * (rounds + 1),),
                )
        costs: dict[str, list[PressCost]] = {"with": [], "without": []}
        # A warm-up round each, then rounds in alternating order: on a shared machine,
        # drift and "who runs first" hit both sides alike.
        for r in range(rounds + 1):
            parks = [f"park-{i}" for i in range(r * per_round + 1, (r + 1) * per_round + 1)]
            sides = [("with", with_url), ("without", bare_url)]
            for label, url in sides if r % 2 else reversed(sides):
                cost = asyncio.run(presses(url, parks))
                if r:
                    costs[label].append(cost)
        with psycopg.connect(with_url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
            assert row is not None and per_round * (rounds + 1) == row[0]
    on = _median(costs["with"])
    off = _median(costs["without"])
    share = on.trigger_ms / on.db_ms
    extra_trips = on.round_trips - off.round_trips
    print(
        f"  per press, with / without the outbox triggers:"
        f" round trips {on.round_trips:.1f} / {off.round_trips:.1f};"
        f" statements run by the database {on.server_statements:.1f} /"
        f" {off.server_statements:.1f};"
        f" database time {on.db_ms:.3f} / {off.db_ms:.3f} ms"
        f" (of which the trigger {1000 * on.trigger_ms:.0f} us);"
        f" API CPU {on.api_cpu_ms:.3f} / {off.api_cpu_ms:.3f} ms",
        flush=True,
    )
    return Figure(
        name=f"outbox cost per instant press ({per_round} presses x {rounds} rounds)",
        value=(
            f"trigger {1000 * on.trigger_ms:.0f} us = {share:.0%} of the press's database time,"
            f" +{on.server_statements - off.server_statements:.1f} statement in the database,"
            f" +{extra_trips:.1f} round trips"
        ),
        goal=f"+{EXTRA_ROUND_TRIPS_GOAL} round trips, trigger <= {EXTRA_DB_TIME_GOAL:.0%}",
        ratio=on.db_ms / off.db_ms,
        ratio_of="database time per press with / without the triggers (noisy when shared)",
        met=extra_trips <= EXTRA_ROUND_TRIPS_GOAL and share <= EXTRA_DB_TIME_GOAL,
    )


def _median(costs: list[PressCost]) -> PressCost:
    return PressCost(
        statistics.median(c.round_trips for c in costs),
        statistics.median(c.server_statements for c in costs),
        statistics.median(c.db_ms for c in costs),
        statistics.median(c.trigger_ms for c in costs),
        statistics.median(c.api_cpu_ms for c in costs),
    )


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Print each figure with its goal and its same-run baseline; 0 when all were measured."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.events")
    parser.add_argument("--scale", type=float, default=1.0, help="1 = 20,000 events")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-bench-events-"))
    workdir.chmod(0o755)  # the postgres account must reach the data dir when we are root
    failed = 0
    try:
        with bench_server(workdir) as url:
            print(f"events bench: scale {args.scale:g}, {os.cpu_count()} CPUs", flush=True)
            for fn in (figure_reader, figure_press_cost):
                try:
                    print(fn(url, args.scale).render(), flush=True)
                except Exception as exc:
                    failed += 1
                    print(f"{fn.__name__}: ERROR {exc!r}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
