"""Periodic payouts: the scan run by the workers' periodic task, end to end and in-process.

Periods are seconds long (PAYOUT_PERIOD_DAYS as a fraction of a day) and the
scan runs every second, so a few periods fit in one test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest

from service.billing.client import BillingClient, Budget
from service.core import db
from service.payouts import periodic
from service.payouts.execution import Deps
from service.worker.app import app
from tests.conftest import make_settings, service_env
from tests.helpers.api import (
    periodic_payouts,
    register,
    rows,
    set_balance,
    spacing_violations,
    stats,
)
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

EVERY_SECOND = "* * * * * */1"


# --- helpers -----------------------------------------------------------------------


def env(db_url: str, billing_url: str, period: timedelta, **overrides: str) -> dict[str, str]:
    return service_env(
        db_url,
        billing_url,
        PAYOUT_PERIOD_DAYS=str(period.total_seconds() / 86400),
        PERIODIC_SCAN_CRON=EVERY_SECOND,
        **overrides,
    )


def succeeded_counts(pg: psycopg.Connection[dict[str, Any]], park_ids: list[str]) -> dict[str, int]:
    return {
        p: sum(1 for x in xs if x["status"] == "succeeded")
        for p, xs in periodic_payouts(pg, park_ids).items()
    }


@contextlib.asynccontextmanager
async def overdue_parks(db_url: str, billing_url: str, parks: list[str]) -> AsyncIterator[Deps]:
    """Job dependencies with a 1 s payout period, and `parks` registered an hour ago (all due)."""
    settings = make_settings(db_url, billing_url, payout_period=timedelta(seconds=1))
    pool = db.make_pool(db_url, name="test", min_size=2, max_size=6)
    await pool.open(wait=True)
    billing = BillingClient(billing_url, token=None, timeout=5, budget=Budget(100))
    try:
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO parks (park_id) SELECT unnest(%s::text[])", (parks,))
            await conn.execute("UPDATE parks SET registered_at = now() - interval '1 hour'")
        yield Deps(pool=pool, billing=billing, settings=settings)
    finally:
        await billing.aclose()
        await pool.close()


async def periodic_counts(pool: db.Pool) -> dict[str, int]:
    """How many periodic payouts each park has (parks without any are left out)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT park_id, count(*) AS n FROM payouts WHERE kind = 'periodic' GROUP BY park_id"
        )
        return {r["park_id"]: r["n"] for r in await cur.fetchall()}


# --- end to end ------------------------------------------------------------------


def test_due_parks_are_paid_once_per_period(
    db_url: str, billing_url: str, tmp_path: Any, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """With a 4 s period, each enabled park with money gets one periodic payout per period, a
    zero-balance park is asked at most once per period, disabled parks never, and Billing sees
    about one call per payout (one POST /v1/payouts each, plus one balances/select per batch).
    """
    period = timedelta(seconds=4)
    paid = [f"per-{i:02d}" for i in range(10)]
    disabled = ["off-1", "off-2"]
    empty = "zero-1"
    everyone = [*paid, *disabled, empty]
    # The limit keeps money on the balances for the next period.
    environ = env(db_url, billing_url, period, PAYOUT_MAX_AMOUNT="100.00")
    with cluster(environ, tmp_path) as c:
        api = c.api()
        workers = [c.worker() for _ in range(3)]
        wait_for(
            lambda: rows(pg, "SELECT count(*) AS n FROM procrastinate_workers")[0]["n"] == 3,
            timeout=30,
            interval=0.1,
            what="three workers to be registered",
        )
        for park in [*paid, *disabled]:
            set_balance(billing_url, park, "1000.00")
        set_balance(billing_url, empty, "0.00")
        for park in everyone:
            register(api, park, instant=None, periodic=park not in disabled, status=201)

        # Due one period after registration, paid within the next one.
        first = wait_for(
            lambda: (n := succeeded_counts(pg, paid)) and min(n.values()) >= 1 and n,
            timeout=2 * period.total_seconds() + 3,
            interval=0.2,
            what="every enabled park's first periodic payout",
        )
        assert {p: 1 for p in paid} == first
        second = wait_for(
            lambda: (n := succeeded_counts(pg, paid)) and min(n.values()) >= 2 and n,
            timeout=2 * period.total_seconds() + 3,
            interval=0.2,
            what="every enabled park's second periodic payout",
        )
        assert {p: 2 for p in paid} == second
        for worker in workers:
            worker.stop()

        by_park = periodic_payouts(pg, everyone)
        elapsed = rows(
            pg,
            "SELECT extract(epoch FROM now() - registered_at)::float8 AS s "
            "FROM parks WHERE park_id = %(p)s",
            p=empty,
        )[0]["s"]
        assert {p: [] for p in paid} == {p: spacing_violations(by_park[p], period) for p in paid}
        assert {p: [] for p in disabled} == {p: by_park[p] for p in disabled}
        skipped = by_park[empty]
        assert len(skipped) >= 1
        assert {"skipped"} == {x["status"] for x in skipped}
        assert len(skipped) <= elapsed / period.total_seconds() + 1
        assert [] == spacing_violations(skipped, period)
        assert {"succeeded"} == {x["status"] for p in paid for x in by_park[p]}
        assert {"100.00"} == {f"{x['amount']:.2f}" for p in paid for x in by_park[p]}

        # One POST /v1/balances/select per scan batch (one batch transaction,
        # so one created_at), then one POST /v1/payouts per payout with money.
        created = [x for xs in by_park.values() for x in xs]
        batches = len({x["created_at"] for x in created})
        with_money = sum(1 for x in created if x["status"] == "succeeded")
        requests = stats(billing_url)["requests"]
        assert requests <= with_money + batches + 2, (
            f"{requests} Billing requests for {with_money} payouts in {batches} batches"
        )


def test_parks_due_during_an_outage_are_paid_when_a_worker_comes_back(
    db_url: str, billing_url: str, tmp_path: Any, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """Parks that became due while no worker ran are each paid once as soon as a worker starts,
    though the ticks of the outage were missed.
    """
    period = timedelta(seconds=3)
    parks = [f"late-{i:02d}" for i in range(12)]
    with cluster(env(db_url, billing_url, period), tmp_path) as c:
        api = c.api()
        for i, park in enumerate(parks):
            set_balance(billing_url, park, f"{200 + i}.00")
            register(api, park, instant=None, periodic=True, status=201)
        # Two whole periods without a worker: several scan ticks are missed.
        wait_for(
            lambda: rows(
                pg,
                "SELECT bool_and(registered_at <= now() - 2 * %(p)s) AS due FROM parks",
                p=period,
            )[0]["due"],
            timeout=30,
            interval=0.2,
            what="every park to be overdue",
        )
        assert {p: [] for p in parks} == periodic_payouts(pg, parks)
        c.worker()

        counts = wait_for(
            lambda: (n := succeeded_counts(pg, parks)) and min(n.values()) >= 1 and n,
            timeout=30,
            interval=0.2,
            what="every overdue park to be paid",
        )

        assert {p: 1 for p in parks} == counts
        by_park = periodic_payouts(pg, parks)
        assert {p: f"{200 + i}.00" for i, p in enumerate(parks)} == {
            p: f"{by_park[p][0]['amount']:.2f}" for p in parks
        }
        transfers = httpx.get(f"{billing_url}/admin/payouts", timeout=10).json()["payouts"]
        assert sorted(str(by_park[p][0]["id"]) for p in parks) == sorted(
            t["idempotency_key"] for t in transfers
        )


# --- in-process ---------------------------------------------------------------------


async def test_doubled_scan_tick_creates_each_payout_once(db_url: str, billing_url: str) -> None:
    """Two scans at once, then a third after them, create exactly one periodic payout per due park
    between them, and the third creates none.
    """
    parks = [f"tick-{i:02d}" for i in range(25)]
    async with httpx.AsyncClient(base_url=billing_url) as billing_admin:
        for park in parks:
            r = await billing_admin.put(
                f"/admin/balances/{park}", json={"available": "10.00", "currency": "RUB"}
            )
            r.raise_for_status()
    async with overdue_parks(db_url, billing_url, parks) as deps:
        async with app.open_async(pool=deps.pool):
            together = await asyncio.gather(
                periodic.scan(deps, batch_size=10), periodic.scan(deps, batch_size=10)
            )
            after = await periodic.scan(deps, batch_size=10)
        counts = await periodic_counts(deps.pool)

    assert {p: 1 for p in parks} == counts
    assert len(parks) == sum(r.created for r in together)
    assert 0 == after.created


async def test_doubled_batch_without_the_scan_lock_creates_each_payout_once(
    db_url: str, billing_url: str
) -> None:
    """Two batch transactions for the same due parks at once (the scan's advisory lock bypassed)
    create exactly one periodic payout per park: the row locks and due re-check decide.
    """
    parks = [f"dup-{i:02d}" for i in range(20)]
    async with overdue_parks(db_url, billing_url, parks) as deps:

        async def one_batch() -> int:
            async with deps.pool.connection() as conn:
                return await periodic.create_batch(conn, deps, parks, {})

        async with app.open_async(pool=deps.pool):
            made = await asyncio.gather(one_batch(), one_batch())
        counts = await periodic_counts(deps.pool)

    assert {p: 1 for p in parks} == counts
    assert len(parks) == sum(made)
