"""Benchmark: how exactly worker processes hold the global Billing budget, what they cost
when they, not the budget, are the limit, and how soon a press passes a periodic backlog.

    .venv/bin/python -m tests.bench.billing [--rps 10,100,1000] [--seconds 8]
        [--press-backlog 80000] [--presses 20]

For each BILLING_RPS, three `fleet-payouts worker` processes drain a queue of periodic
payouts (one POST /v1/payouts each: the scan left a balance snapshot) against the Billing
emulator (no latency). Figures, read from the emulator's request log:

- peak one-second calls / BILLING_RPS, over the whole run (goal <= 1 + 1/BILLING_RPS);
- achieved calls per second / BILLING_RPS between the 10th and the 90th percentile call,
  while the queue is full (goal >= 0.9);
- round trips to PostgreSQL per payout, procrastinate's fetch and finish included (the
  workers' own count of statements, their idle chores subtracted; goal <= 4);
- DB connections per worker at --concurrency 10 and 100 (sampled);
- beside each, its baseline: payouts per second per worker process and worker CPU per
  payout of the same three workers with no budget to speak of (BILLING_RPS at the
  setting's bound, 100,000) measured in the same run, so whether the workers or the
  budget are the limit can be read off.

Then one worker alone on a pinned core at BILLING_RPS=1000: its process CPU per payout
(goal <= 1.5 ms) and its achieved payouts/s over its CPU-bound rate, 1 / CPU per payout
(goal >= 0.8: bounded by its CPU, not by its waits); from that, three workers' share of a
1,000/s budget on this machine (its cores shared with PostgreSQL and the emulator) and on
three 2-core hosts.

Last, presses while a periodic backlog (--press-backlog payouts, parks Billing does not
know: each still one POST, refused at once) drains at BILLING_RPS=10 through three workers:
seconds from a press's 202 to Billing making its payout, p50 and p95 (goal p95 <= 0.5 s),
beside the same presses with no backlog.

PostgreSQL: BENCH_DATABASE_URL (a server whose user may create databases), or an embedded
one in a temporary directory, fsync off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from service.billing import gate as billing_gate
from service.core import db
from service.core.settings import MAX_RPS, Settings
from service.core.settings import load as load_settings
from service.ops import migrate
from service.payouts import periodic
from service.payouts.execution import Deps
from service.worker.app import app as queue_app
from tests.bench.common import bench_server
from tests.conftest import create_database, drop_database, service_env, with_dbname
from tests.helpers.api import press, register
from tests.helpers.emulator import billing_requests, free_port, peak_in_one_second, run_emulator
from tests.helpers.procs import Proc, wait_for

WORKERS = 3
CONCURRENCY = 10
# The setting's own bound: a value above it makes the workers refuse to start.
UNBUDGETED_RPS = MAX_RPS
NEVER = "0 0 1 1 *"  # the workers' own periodic scan must not add payouts mid-run
PARALLEL_PUTS = 32
MAX_PAYOUTS = 3000
# The goals of issue 21.
ROUND_TRIPS_GOAL = 4.0
CPU_MS_GOAL = 1.5
CPU_BOUND_GOAL = 0.8
PRESS_P95_GOAL_S = 0.5
PRESS_RPS = 10.0
# Statements the workers' chores send while idle are measured over this long, and
# subtracted from a drain's count in proportion to its length.
IDLE_WINDOW_S = 2.0


@dataclasses.dataclass(frozen=True)
class Run:
    rps: float
    payouts: int
    calls: int
    peak_1s: int
    achieved_rps: float  # between the 10th and 90th percentile call
    seconds: float  # first call to last call
    worker_cpu_s: float
    peak_connections: int  # the workers' pooled connections, all together, sampled
    concurrency: int
    statements: float  # the workers' statements during the drain, idle chores subtracted
    workers: int = WORKERS
    # The first worker's wall time during the drain: on CPU, and runnable but waiting for
    # its core (/proc/PID/schedstat; the rest it slept, waiting on I/O or timers).
    on_cpu_s: float = 0.0
    runnable_s: float = 0.0
    measured_s: float = 0.0  # the window those two were read over (the queue filled, drained)

    @property
    def payouts_per_worker_s(self) -> float:
        return self.payouts / self.seconds / self.workers

    @property
    def round_trips(self) -> float:
        return self.statements / self.payouts

    @property
    def cpu_ms_per_payout(self) -> float:
        return 1000 * self.worker_cpu_s / self.payouts


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds on CPU and seconds runnable but waiting for a core, of every thread."""
    on = wait = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "schedstat").read_text().split()
            on += int(fields[0]) / 1e9
            wait += int(fields[1]) / 1e9
    return on, wait


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def set_balances(billing_url: str, parks: list[str]) -> None:
    limit = asyncio.Semaphore(PARALLEL_PUTS)
    async with httpx.AsyncClient(base_url=billing_url, timeout=30) as client:

        async def put(park: str) -> None:
            async with limit:
                body = {"available": "100.00", "currency": "RUB"}
                (await client.put(f"/admin/balances/{park}", json=body)).raise_for_status()

        await asyncio.gather(*(put(p) for p in parks))


def add_due_parks(url: str, billing_url: str, n: int) -> None:
    """n parks bench-1..n, due for a periodic payout, each with 100.00 RUB at a reset
    emulator."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO parks (park_id, registered_at) "
            "SELECT 'bench-' || g, now() - interval '30 days' FROM generate_series(1, %s) g",
            (n,),
        )
        conn.execute("ANALYZE parks")
    httpx.post(f"{billing_url}/admin/reset").raise_for_status()
    asyncio.run(set_balances(billing_url, [f"bench-{i}" for i in range(1, n + 1)]))


async def fill_queue(settings: Settings, n: int) -> None:
    """The periodic scan, in this process, makes n due parks' payouts and jobs; its own
    Billing calls (one per 1,000 parks) take their slots from the same shared budget."""
    pool = db.make_pool(settings.database_url.reveal(), name="bench", min_size=1, max_size=4)
    await pool.open(wait=True)
    billing = billing_gate.client(pool, settings)
    try:
        async with queue_app.open_async(pool=pool):
            created = (
                await periodic.scan(Deps(pool=pool, billing=billing, settings=settings))
            ).created
        assert n == created, f"the scan made {created} payouts, not {n}"
    finally:
        await billing.aclose()
        await pool.close()


def statements_sent(ports: Sequence[int]) -> float:
    """The workers' statements so far (fleet_payouts_db_queries_total, procrastinate's own
    queries on their pools included)."""
    total = 0.0
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name == "fleet_payouts_db_queries":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def worker_connections(url: str) -> int:
    """Connections the workers hold open right now (their pools, procrastinate's included)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fleet-payouts-worker'"
        ).fetchone()
    return int(row[0]) if row else 0


def final_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM payouts WHERE status IN ('succeeded', 'failed', 'skipped')"
        ).fetchone()
    return int(row[0]) if row else 0


def run_once(
    server_url: str,
    template: str,
    billing_url: str,
    workdir: Path,
    rps: float,
    n: int,
    concurrency: int = CONCURRENCY,
    *,
    workers: int = WORKERS,
    pin: bool = False,
) -> Run:
    """Drain n periodic payouts through `workers` workers at `rps`; with `pin`, each worker
    runs on one core of its own (the last ones), so its CPU time is its own core's."""
    url = create_database(server_url, template=template)
    procs: list[Proc] = []
    try:
        add_due_parks(url, billing_url, n)
        env = service_env(
            url, billing_url, BILLING_RPS=f"{rps:g}", PERIODIC_SCAN_CRON=NEVER, LOG_LEVEL="INFO"
        )
        logs = workdir / f"rps-{rps:g}-w{workers}-c{concurrency}"
        logs.mkdir(exist_ok=True)
        ports = [free_port() for _ in range(workers)]
        procs = [
            Proc(
                ["worker", "--concurrency", str(concurrency), "--metrics-port", str(port)],
                env,
                logs / f"worker-{i}.log",
            )
            for i, port in enumerate(ports)
        ]
        if pin:
            cores = sorted(os.sched_getaffinity(0))
            for i, p in enumerate(procs):
                os.sched_setaffinity(p.pid, {cores[-1 - i % len(cores)]})

        def registered() -> bool:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
            return row is not None and row[0] == workers

        wait_for(registered, timeout=60, interval=0.1, what="the workers to register")
        wait_for(lambda: statements_sent(ports) > 0, timeout=30, what="the workers' metrics")
        idle_from, idle_started = statements_sent(ports), time.monotonic()
        time.sleep(IDLE_WINDOW_S)  # a measurement window, not a synchronisation
        idle_rate = (statements_sent(ports) - idle_from) / (time.monotonic() - idle_started)
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        sched_before = schedstat(procs[0].pid)
        sent_before, started = statements_sent(ports), time.monotonic()
        asyncio.run(fill_queue(load_settings(env), n))
        peak = [0]

        def drained() -> bool:
            peak[0] = max(peak[0], worker_connections(url))
            return final_count(url) >= n or any(not p.alive() for p in procs)

        wait_for(
            drained,
            timeout=60 + 3 * n / min(rps, 300),
            interval=0.2,
            what=f"{n} payouts to finish",
        )
        if any(not p.alive() for p in procs):
            raise RuntimeError(f"a worker died:\n{procs[0].tail()}")
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        on_cpu, runnable = (
            a - b for a, b in zip(schedstat(procs[0].pid), sched_before, strict=True)
        )
        measured = time.monotonic() - started
        statements = statements_sent(ports) - sent_before
        statements -= idle_rate * (time.monotonic() - started)
    finally:
        for p in procs:
            p.stop()
        drop_database(server_url, url)

    times = sorted(r["at"] for r in billing_requests(billing_url))
    orders = sorted(r["at"] for r in billing_requests(billing_url) if r["method"] == "POST")
    lo, hi = orders[len(orders) // 10], orders[(9 * len(orders)) // 10]
    achieved = (9 * len(orders) // 10 - len(orders) // 10) / (hi - lo) if hi > lo else 0.0
    return Run(
        rps=rps,
        payouts=n,
        calls=len(times),
        peak_1s=peak_in_one_second(times),
        achieved_rps=achieved,
        seconds=times[-1] - times[0],
        worker_cpu_s=cpu,
        peak_connections=peak[0],
        concurrency=concurrency,
        statements=max(0.0, statements),
        workers=workers,
        on_cpu_s=on_cpu,
        runnable_s=runnable,
        measured_s=measured,
    )


def report(run: Run, unbudgeted: Run | None) -> bool:
    """Print one BILLING_RPS's figures; True when both goals are met."""
    peak_ratio = run.peak_1s / run.rps
    peak_goal = 1 + 1 / run.rps
    rate_ratio = run.achieved_rps / run.rps
    peak_ok, rate_ok = peak_ratio <= peak_goal + 1e-9, rate_ratio >= 0.9
    print(
        f"\n== BILLING_RPS={run.rps:g}: {run.workers} workers at --concurrency "
        f"{run.concurrency}, {run.payouts:,} queued payouts =="
    )
    print(
        f"  peak one-second calls / limit : {peak_ratio:.3f}  ({run.peak_1s} calls; "
        f"goal <= {peak_goal:.3f})  {'PASS' if peak_ok else 'MISS'}"
    )
    print(
        f"  achieved rate / limit         : {rate_ratio:.3f}  ({run.achieved_rps:.1f} calls/s "
        f"while the queue is full; goal >= 0.9)  {'PASS' if rate_ok else 'MISS'}"
    )
    print(
        f"  drain                          : {run.calls:,} calls in {run.seconds:.1f} s; "
        f"{run.payouts_per_worker_s:.0f} payouts/s per worker, "
        f"{run.cpu_ms_per_payout:.2f} ms worker CPU per payout"
    )
    print(
        f"  round trips per payout         : {run.round_trips:.2f}  (goal <= "
        f"{ROUND_TRIPS_GOAL:g}: fetch, take, final write, finish, gate claims shared)  "
        f"{'PASS' if run.round_trips <= ROUND_TRIPS_GOAL else 'MISS'}"
    )
    print(
        f"  DB connections per worker      : {run.peak_connections / run.workers:.1f} at most "
        f"(sampled; --concurrency {run.concurrency})"
    )
    if unbudgeted is not None:
        share = run.achieved_rps / unbudgeted.achieved_rps
        print(
            f"  baseline, no budget            : the same workers make "
            f"{unbudgeted.achieved_rps:.0f} calls/s ({unbudgeted.payouts_per_worker_s:.0f} "
            f"payouts/s per worker, {unbudgeted.cpu_ms_per_payout:.2f} ms CPU per payout); "
            f"budgeted / unbudgeted = {share:.2f}"
        )
    return peak_ok and rate_ok


def report_one_worker(one: Run, three: Run | None) -> bool:
    """One pinned worker at BILLING_RPS=1000: CPU per payout and how CPU-bound it is; with
    the three workers' run at the same budget, their share of it here and on 2-core hosts."""
    cpu_s = one.worker_cpu_s / one.payouts
    achieved = one.payouts / one.seconds
    bound = 1 / cpu_s if cpu_s > 0 else float("inf")
    ratio = achieved / bound
    cores = len(os.sched_getaffinity(0))
    cpu_ok, ratio_ok = 1000 * cpu_s <= CPU_MS_GOAL, ratio >= CPU_BOUND_GOAL
    print(
        f"\n== one worker, pinned to one core, BILLING_RPS={one.rps:g}, --concurrency "
        f"{one.concurrency}, {one.payouts:,} queued payouts =="
    )
    print(
        f"  worker CPU per payout          : {1000 * cpu_s:.2f} ms  (process CPU time; goal <= "
        f"{CPU_MS_GOAL:g} ms)  {'PASS' if cpu_ok else 'MISS'}"
    )
    print(
        f"  achieved / CPU-bound rate      : {ratio:.2f}  ({achieved:.0f} payouts/s of "
        f"{bound:.0f} = 1 / CPU per payout; goal >= {CPU_BOUND_GOAL:g})  "
        f"{'PASS' if ratio_ok else 'MISS'}"
    )
    print(
        f"  round trips per payout         : {one.round_trips:.2f}  (goal <= "
        f"{ROUND_TRIPS_GOAL:g})  {'PASS' if one.round_trips <= ROUND_TRIPS_GOAL else 'MISS'}"
    )
    wall = one.measured_s or 1.0
    asleep = max(0.0, wall - one.on_cpu_s - one.runnable_s)
    print(
        f"  its wall time (schedstat)      : on CPU {100 * one.on_cpu_s / wall:.0f}%, runnable "
        f"but waiting for its core {100 * one.runnable_s / wall:.0f}% (other processes on "
        f"it), asleep {100 * asleep / wall:.0f}%; where the rest goes: "
        "python -m tests.bench.worker_profile"
    )
    if three is not None:
        here = min(three.rps, cores / cpu_s)
        hosts = min(three.rps, 3 * 2 / cpu_s)
        print(
            f"  three workers, 1,000/s budget  : {three.achieved_rps / three.rps:.2f} of it "
            f"here ({three.achieved_rps:.0f} calls/s; CPU limit: {cores} cores shared with "
            f"PostgreSQL, the emulator and this bench, at most {cores / cpu_s:.0f} payouts/s "
            f"if the workers had them all: {here / three.rps:.2f} of the budget); three "
            f"2-core hosts: {3 * 2 / cpu_s:.0f} payouts/s of CPU = "
            f"{hosts / three.rps:.2f} of the budget"
        )
    return cpu_ok and ratio_ok


@dataclasses.dataclass(frozen=True)
class Presses:
    idle: list[float]  # seconds from a press's 202 to Billing making its payout
    backlog: list[float]
    backlog_size: int


def _made_at(billing_url: str, key: str) -> datetime | None:
    r = httpx.get(f"{billing_url}/admin/payouts", timeout=10)
    r.raise_for_status()
    for p in r.json()["payouts"]:
        if p["idempotency_key"] == key:
            return datetime.fromisoformat(p["created_at"].replace("Z", "+00:00"))
    return None


def _press_once(api: str, billing_url: str, park: str) -> float:
    """Seconds from the press's answer to Billing making its payout (one host's wall clock)."""
    from datetime import UTC

    payout = press(api, park)
    answered = datetime.now(UTC)
    made = wait_for(
        lambda: _made_at(billing_url, payout["id"]),
        timeout=60,
        interval=0.02,
        what="the press's payout at Billing",
    )
    return float((made - answered).total_seconds())


def run_presses(
    server_url: str, template: str, billing_url: str, workdir: Path, backlog: int, presses: int
) -> Presses:
    """Presses with no backlog, then while `backlog` periodic payouts drain at PRESS_RPS."""
    url = create_database(server_url, template=template)
    procs: list[Proc] = []
    try:
        httpx.post(f"{billing_url}/admin/reset").raise_for_status()
        env = service_env(url, billing_url, BILLING_RPS=f"{PRESS_RPS:g}", PERIODIC_SCAN_CRON=NEVER)
        logs = workdir / "presses"
        logs.mkdir(exist_ok=True)
        port = free_port()
        procs.append(Proc(["serve", "--port", str(port)], env, logs / "api.log"))
        api = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{api}/ping", timeout=1).status_code == 200, timeout=30)
        parks = [f"press-{i}" for i in range(2 * presses)]
        for park in parks:
            register(api, park, periodic=False, status=201)
        asyncio.run(set_balances(billing_url, parks))
        procs += [
            Proc(["worker", "--concurrency", str(CONCURRENCY)], env, logs / f"worker-{i}.log")
            for i in range(WORKERS)
        ]

        def registered() -> bool:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
            return row is not None and row[0] == WORKERS

        wait_for(registered, timeout=60, interval=0.1, what="the workers to register")
        idle = [_press_once(api, billing_url, park) for park in parks[:presses]]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO parks (park_id, params) "
                "SELECT 'backlog-' || g, '{\"iban\": \"X\"}' FROM generate_series(1, %s) g",
                (backlog,),
            )
            conn.execute(
                "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency)"
                " SELECT gen_random_uuid(), park_id, 'periodic', 1000, 10, 'RUB' FROM parks"
                " WHERE park_id LIKE 'backlog-%%'"
            )
            # A statement of its own: an UPDATE does not see rows its own statement's
            # CTEs inserted, and a payout without its job_id is re-driven as an orphan.
            conn.execute(
                "WITH job AS ("
                "  INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)"
                "  SELECT 'payouts', 'execute_payout', 0, jsonb_build_object('payout_id', id::text)"
                "  FROM payouts WHERE park_id LIKE 'backlog-%%' RETURNING id, args"
                ") UPDATE payouts p SET job_id = job.id FROM job"
                " WHERE p.id = (job.args->>'payout_id')::uuid"
            )
            conn.execute("ANALYZE procrastinate_jobs")
            conn.execute("ANALYZE payouts")

        def draining() -> bool:
            return len(billing_requests(billing_url)) >= 2 * presses + 3 * PRESS_RPS

        wait_for(draining, timeout=60, interval=0.2, what="the backlog to drain")
        busy = [_press_once(api, billing_url, park) for park in parks[presses:]]
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"a process died:\n{p.tail()}")
    finally:
        for p in procs:
            p.stop()
        drop_database(server_url, url)
    return Presses(idle, busy, backlog)


def report_presses(result: Presses) -> bool:
    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]

    busy, idle = result.backlog, result.idle
    ok = p95(busy) <= PRESS_P95_GOAL_S
    print(
        f"\n== presses while {result.backlog_size:,} periodic payouts drain at "
        f"BILLING_RPS={PRESS_RPS:g} ({WORKERS} workers at --concurrency {CONCURRENCY}) =="
    )
    print(
        f"  press to Billing, with backlog : p50 {statistics.median(busy):.3f} s, p95 "
        f"{p95(busy):.3f} s, max {max(busy):.3f} s over {len(busy)} presses  (goal p95 <= "
        f"{PRESS_P95_GOAL_S:g} s)  {'PASS' if ok else 'MISS'}"
    )
    print(
        f"  baseline, no backlog           : p50 {statistics.median(idle):.3f} s, p95 "
        f"{p95(idle):.3f} s over {len(idle)} presses"
    )
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """Run the figures; 0 when every run finished (a missed goal is printed, not an error)."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.billing", description=__doc__)
    parser.add_argument("--rps", default="10,100,1000", help="comma-separated BILLING_RPS values")
    parser.add_argument("--seconds", type=float, default=8.0, help="queued work, in seconds")
    parser.add_argument(
        "--concurrency", default="10,100", help="worker --concurrency values, at the last budget"
    )
    parser.add_argument(
        "--press-backlog", type=int, default=80_000, help="periodic payouts queued for presses"
    )
    parser.add_argument("--presses", type=int, default=20, help="presses measured, each case")
    args = parser.parse_args(argv)
    budgets = [float(r) for r in args.rps.split(",")]
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-bench-billing-"))
    workdir.chmod(0o755)  # the postgres account must reach the data dir when we are root
    template = f"fp_bench_billing_{os.getpid()}"
    started = time.monotonic()
    print(f"billing bench: load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    try:
        with bench_server(workdir) as server_url, run_emulator() as billing_url:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{template}"')
            asyncio.run(migrate.migrate(with_dbname(server_url, template)))
            runs = [
                run_once(server_url, template, billing_url, workdir, rps, size(rps, args.seconds))
                for rps in budgets
            ]
            # The other concurrencies, at the last (largest) budget: connections per worker.
            last = budgets[-1]
            runs += [
                run_once(
                    server_url, template, billing_url, workdir, last, size(last, args.seconds), c
                )
                for c in (int(x) for x in args.concurrency.split(","))
                if c != CONCURRENCY
            ]
            n = max(r.payouts for r in runs)
            unbudgeted = run_once(server_url, template, billing_url, workdir, UNBUDGETED_RPS, n)
            one = run_once(
                server_url,
                template,
                billing_url,
                workdir,
                1000.0,
                size(1000.0, args.seconds),
                workers=1,
                pin=True,
            )
            presses = run_presses(
                server_url, template, billing_url, workdir, args.press_backlog, args.presses
            )
            met = [report(run, unbudgeted) for run in runs]
            at_1000 = next(
                (r for r in runs if r.rps == 1000.0 and r.concurrency == CONCURRENCY), None
            )
            met.append(report_one_worker(one, at_1000))
            met.append(report_presses(presses))
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nbilling bench: {sum(met)}/{len(met)} sets of figures met their goals, "
        f"{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f} at the end"
    )
    return 0


def size(rps: float, seconds: float) -> int:
    """Payouts to queue: `seconds` of work at the budget, at least 40. At most 3,000: on two
    cores three workers make ~150 payouts/s, and twenty seconds of that tell all there is."""
    return int(min(MAX_PAYOUTS, max(40, rps * seconds)))


if __name__ == "__main__":
    raise SystemExit(main())
