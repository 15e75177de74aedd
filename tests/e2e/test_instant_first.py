"""Instant payouts first at Billing (issue 21): a press does not queue behind a periodic
backlog, in the worker's slots, at its process's gate or at the other processes' claims.

Real worker processes, the real emulator over HTTP; the order in which Billing made the
payouts is Billing's own list (GET /admin/payouts, in the order they were made).
"""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow

from tests.conftest import service_env
from tests.helpers.api import press, register, set_balance
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

BACKLOG = 2000
PRESSES = 3


def queue_periodic_backlog(pg: psycopg.Connection[DictRow], billing_url: str, n: int) -> None:
    """n due parks with money, each with a pending periodic payout (the scan's snapshot
    on it) and its job, as the periodic scan leaves them."""
    pg.execute(
        "INSERT INTO parks (park_id, params) "
        "SELECT 'backlog-' || g, '{\"iban\": \"X\"}' FROM generate_series(1, %s) g",
        (n,),
    )
    pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
        "SELECT gen_random_uuid(), park_id, 'periodic', 1000, 10, 'RUB' FROM parks "
        "WHERE park_id LIKE 'backlog-%%'"
    )
    pg.execute(
        "WITH job AS ("
        "  INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)"
        "  SELECT 'payouts', 'execute_payout', 0, jsonb_build_object('payout_id', id::text)"
        "  FROM payouts WHERE kind = 'periodic' RETURNING id, args"
        ") UPDATE payouts p SET job_id = job.id FROM job WHERE p.id::text = job.args->>'payout_id'"
    )
    pg.execute("ANALYZE procrastinate_jobs")
    with httpx.Client(base_url=billing_url, timeout=10) as client:
        for i in range(1, n + 1):
            body = {"available": "10.00", "currency": "RUB"}
            client.put(f"/admin/balances/backlog-{i}", json=body).raise_for_status()


def made(billing_url: str) -> list[dict[str, Any]]:
    """The payouts Billing made, in the order it made them."""
    r = httpx.get(f"{billing_url}/admin/payouts", timeout=10)
    r.raise_for_status()
    payouts: list[dict[str, Any]] = r.json()["payouts"]
    return payouts


def test_a_press_reaches_billing_ahead_of_a_periodic_backlog(
    db_url: str, billing_url: str, pg: psycopg.Connection[DictRow], tmp_path: Any
) -> None:
    """With 2,000 periodic payouts queued and two workers' thirty slots all waiting on a
    BILLING_RPS=20 budget, each press's order reaches Billing with at most 15 periodic orders
    made between its acceptance and its own: within 0.75 s of the budget (two calls, each
    urgent), where it waited behind 53 to 73 of them before this change."""
    queue_periodic_backlog(pg, billing_url, BACKLOG)
    with cluster(service_env(db_url, billing_url, BILLING_RPS="20"), tmp_path) as c:
        api = c.api()
        pressed = [f"press-{i}" for i in range(PRESSES)]
        for park in pressed:
            register(api, park, periodic=False, status=201)
            set_balance(billing_url, park, "100.00")
        c.worker(concurrency=15)
        c.worker(concurrency=15)
        wait_for(lambda: len(made(billing_url)) >= 40, timeout=60, what="the backlog to drain")

        ahead = []
        for park in pressed:
            before = len(made(billing_url))
            key: str = press(api, park)["id"]

            def arrived(key: str = key) -> bool:
                return any(p["idempotency_key"] == key for p in made(billing_url))

            wait_for(
                arrived,
                timeout=30,
                interval=0.05,
                what="the press's order at Billing",
            )
            keys = [p["idempotency_key"] for p in made(billing_url)]
            ahead.append(keys.index(key) - before)

    assert max(ahead) <= 15, ahead
