"""Benchmark: how exactly three worker processes hold the global Billing budget, and what
they cost when they, not the budget, are the limit.

    .venv/bin/python -m tests.bench.billing [--rps 10,100,1000] [--seconds 8]

For each BILLING_RPS, three `fleet-payouts worker` processes drain a queue of periodic
payouts (one POST /v1/payouts each: the scan left a balance snapshot) against the Billing
emulator (no latency). Figures, read from the emulator's request log:

- peak one-second calls / BILLING_RPS, over the whole run (goal <= 1 + 1/BILLING_RPS);
- achieved calls per second / BILLING_RPS between the 10th and the 90th percentile call,
  while the queue is full (goal >= 0.9);
- beside each, its baseline: payouts per second per worker process and worker CPU per
  payout of the same three workers with no budget to speak of (BILLING_RPS at the
  setting's bound, 100,000) measured in the same run, so whether the workers or the
  budget are the limit can be read off.

PostgreSQL: BENCH_DATABASE_URL (a server whose user may create databases), or an embedded
one in a temporary directory, fsync off.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psycopg

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
from tests.helpers.emulator import billing_requests, peak_in_one_second, run_emulator
from tests.helpers.procs import Proc, wait_for

WORKERS = 3
CONCURRENCY = 10
# The setting's own bound: a value above it makes the workers refuse to start.
UNBUDGETED_RPS = MAX_RPS
NEVER = "0 0 1 1 *"  # the workers' own periodic scan must not add payouts mid-run
PARALLEL_PUTS = 32
MAX_PAYOUTS = 3000


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

    @property
    def payouts_per_worker_s(self) -> float:
        return self.payouts / self.seconds / WORKERS

    @property
    def cpu_ms_per_payout(self) -> float:
        return 1000 * self.worker_cpu_s / self.payouts


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
) -> Run:
    url = create_database(server_url, template=template)
    procs: list[Proc] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO parks (park_id, registered_at) "
                "SELECT 'bench-' || g, now() - interval '30 days' FROM generate_series(1, %s) g",
                (n,),
            )
            conn.execute("ANALYZE parks")
        httpx.post(f"{billing_url}/admin/reset").raise_for_status()
        asyncio.run(set_balances(billing_url, [f"bench-{i}" for i in range(1, n + 1)]))
        env = service_env(
            url, billing_url, BILLING_RPS=f"{rps:g}", PERIODIC_SCAN_CRON=NEVER, LOG_LEVEL="INFO"
        )
        logs = workdir / f"rps-{rps:g}"
        logs.mkdir(exist_ok=True)
        procs = [
            Proc(["worker", "--concurrency", str(concurrency)], env, logs / f"worker-{i}.log")
            for i in range(WORKERS)
        ]

        def registered() -> bool:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()
            return row is not None and row[0] == WORKERS

        wait_for(registered, timeout=60, interval=0.1, what="the workers to register")
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
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
    )


def report(run: Run, unbudgeted: Run | None) -> bool:
    """Print one BILLING_RPS's figures; True when both goals are met."""
    peak_ratio = run.peak_1s / run.rps
    peak_goal = 1 + 1 / run.rps
    rate_ratio = run.achieved_rps / run.rps
    peak_ok, rate_ok = peak_ratio <= peak_goal + 1e-9, rate_ratio >= 0.9
    print(
        f"\n== BILLING_RPS={run.rps:g}: {WORKERS} workers at --concurrency {run.concurrency}, "
        f"{run.payouts:,} queued payouts =="
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
        f"  DB connections per worker      : {run.peak_connections / WORKERS:.1f} at most "
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the figures; 0 when every run finished (a missed goal is printed, not an error)."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.billing", description=__doc__)
    parser.add_argument("--rps", default="10,100,1000", help="comma-separated BILLING_RPS values")
    parser.add_argument("--seconds", type=float, default=8.0, help="queued work, in seconds")
    parser.add_argument(
        "--concurrency", default="10,100", help="worker --concurrency values, at the last budget"
    )
    args = parser.parse_args(argv)
    budgets = [float(r) for r in args.rps.split(",")]
    workdir = Path(tempfile.mkdtemp(dir="/tmp", prefix="fp-bench-billing-"))
    workdir.chmod(0o755)  # the postgres account must reach the data dir when we are root
    template = f"fp_bench_billing_{os.getpid()}"
    started = time.monotonic()
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
            met = [report(run, unbudgeted) for run in runs]
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nbilling budget: {sum(met)}/{len(met)} budgets met both goals, "
        f"{time.monotonic() - started:.0f} s"
    )
    return 0


def size(rps: float, seconds: float) -> int:
    """Payouts to queue: `seconds` of work at the budget, at least 40. At most 3,000: on two
    cores three workers make ~150 payouts/s, and twenty seconds of that tell all there is."""
    return int(min(MAX_PAYOUTS, max(40, rps * seconds)))


if __name__ == "__main__":
    raise SystemExit(main())
