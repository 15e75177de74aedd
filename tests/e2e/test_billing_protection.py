"""Billing protected by construction, end to end: worker processes share one budget, one
Retry-After and one breaker through the database, and the emulator over HTTP says when each
call arrived.

Timing figures are read from the emulator's request log (arrivals on its monotonic clock),
never from the test's own sleeps.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import DictRow

from tests.conftest import service_env
from tests.helpers.api import (
    count_final,
    press,
    register,
    rows,
    set_balance,
    set_faults,
    stats,
    statuses,
)
from tests.helpers.emulator import billing_requests, free_port
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

# A call whose slot was handed out before a pause reached the database may
# still leave: its host learns of the pause at its next claim, at most a lease
# (50 ms) plus a send window (25 ms) later, plus the round trip that records
# the pause. Generous here, for CI machines under load.
PROPAGATION_S = 0.5


def parks_with_money(api: str, billing_url: str, prefix: str, n: int) -> list[str]:
    parks = [f"{prefix}-{i:02d}" for i in range(n)]
    for park in parks:
        register(api, park, periodic=False, status=201)
        set_balance(billing_url, park, "100.00")
    return parks


def arrivals(billing_url: str, status: int | None = None) -> list[float]:
    """When Billing's contract requests arrived (all, or those answered with `status`)."""
    return sorted(
        r["at"] for r in billing_requests(billing_url) if status is None or r["status"] == status
    )


def bursts(times: list[float], gap: float) -> list[list[float]]:
    """Arrival times split wherever two are more than `gap` apart."""
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][-1] <= gap:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def wait_rounds(billing_url: str, status: int, rounds: int, what: str) -> None:
    """Wait until Billing has answered `status` in `rounds` bursts a second or more apart."""
    wait_for(
        lambda: len(bursts(arrivals(billing_url, status), gap=1.0)) >= rounds,
        timeout=30,
        interval=0.2,
        what=what,
    )


def gate_row(pg: psycopg.Connection[DictRow]) -> dict[str, Any]:
    return rows(pg, "SELECT * FROM billing_gate")[0]


def paused_gauge(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "fleet_payouts_billing_breaker_open":
            return float(family.samples[0].value)
    raise AssertionError("fleet_payouts_billing_breaker_open is not exported")


# --- the global budget -------------------------------------------------------------------


@pytest.mark.parametrize("churn", [False, True], ids=["steady", "one-killed-one-late"])
def test_three_workers_share_the_budget_exactly_and_use_it(
    db_url: str,
    billing_url: str,
    tmp_path: Any,
    pg: psycopg.Connection[DictRow],
    churn: bool,
) -> None:
    """Three workers draining 40 queued payouts at BILLING_RPS=4 never send Billing more than 5
    calls in any second and take at most 1.5x the ideal time (calls / 4 per second), also when
    one is SIGKILLed mid-drain and another joins late.
    """
    rps = 4
    with cluster(service_env(db_url, billing_url, BILLING_RPS=str(rps)), tmp_path) as c:
        api = c.api()
        ids = [press(api, park)["id"] for park in parks_with_money(api, billing_url, "q", 40)]
        workers = [c.worker(concurrency=4) for _ in range(3)]
        if churn:
            wait_for(lambda: count_final(pg, ids) >= 6, timeout=30, what="the drain to be underway")
            workers[0].kill()
            c.worker(concurrency=4)

        wait_for(lambda: count_final(pg, ids) == 40, timeout=90, interval=0.2, what="the drain")

    assert {"succeeded": 40} == statuses(pg, ids)
    peak = stats(billing_url)["max_rps_1s"]
    assert peak <= rps + 1, f"Billing saw {peak} calls in one second"
    calls = arrivals(billing_url)
    drain = calls[-1] - calls[0] + 1 / rps
    ideal = len(calls) / rps
    assert drain <= 1.5 * ideal, f"{len(calls)} calls took {drain:.1f}s, ideal {ideal:.1f}s"


# --- the shared back-off ---------------------------------------------------------------------


def test_a_429_storm_silences_every_worker_for_the_retry_after(
    db_url: str, billing_url: str, tmp_path: Any, pg: psycopg.Connection[DictRow]
) -> None:
    """While Billing answers 429 with Retry-After: 3, no worker's call reaches it within 3 s of
    a 429 (beyond the pause's propagation), and every payout succeeds once the storm is over.
    """
    with cluster(service_env(db_url, billing_url, BILLING_RPS="20"), tmp_path) as c:
        api = c.api()
        parks = parks_with_money(api, billing_url, "storm", 12)
        set_faults(billing_url, throttle_rate=1.0, retry_after_s=3)
        for _ in range(3):
            c.worker(concurrency=4)
        ids = [press(api, park)["id"] for park in parks]
        wait_rounds(billing_url, 429, 3, "three rounds of 429s")
        set_faults(billing_url, throttle_rate=0.0)
        wait_for(lambda: count_final(pg, ids) == len(ids), timeout=60, interval=0.2)

    assert {"succeeded": len(ids)} == statuses(pg, ids)
    early = [
        (round(a - t, 3))
        for t, a in itertools.product(arrivals(billing_url, 429), arrivals(billing_url))
        if t + PROPAGATION_S < a < t + 3 - 0.05
    ]
    assert [] == early, "calls reached Billing this long after a 429 with Retry-After: 3"


# --- the breaker -------------------------------------------------------------------------------


def test_breaker_opens_in_an_outage_probes_and_closes_and_no_payout_fails(
    db_url: str, billing_url: str, tmp_path: Any, pg: psycopg.Connection[DictRow]
) -> None:
    """Under sustained 503s the breaker opens on every worker (the gauge says so on a worker that
    saw no failure itself), Billing then sees one probe per cool-off, and once Billing recovers
    the breaker closes and every payout succeeds: none fails from an outage shorter than the
    retry window.
    """
    cooloff = 2.0
    environ = service_env(
        db_url,
        billing_url,
        BILLING_RPS="20",
        BILLING_BREAKER_FAILURES="3",
        BILLING_BREAKER_COOLOFF_SECONDS=str(cooloff),
        BILLING_RETRY_WINDOW_HOURS=str(120 / 3600),
    )
    with cluster(environ, tmp_path) as c:
        api = c.api()
        parks = parks_with_money(api, billing_url, "outage", 8)
        set_faults(billing_url, error_rate=1.0)
        c.worker(concurrency=4)
        ids = [press(api, park)["id"] for park in parks]
        wait_for(lambda: gate_row(pg)["breaker_open"], timeout=30, what="the breaker to open")
        bystander = free_port()
        c.worker(concurrency=4, metrics_port=bystander)
        wait_for(lambda: paused_gauge(bystander) == 1.0, timeout=30, what="the gauge at 1")
        wait_rounds(billing_url, 503, 3, "two probes into the outage")
        set_faults(billing_url, error_rate=0.0)
        wait_for(lambda: count_final(pg, ids) == len(ids), timeout=60, interval=0.2)
        wait_for(lambda: paused_gauge(bystander) == 0.0, timeout=30, what="the gauge at 0")

    assert {"succeeded": len(ids)} == statuses(pg, ids)
    assert (False, 0) == (gate_row(pg)["breaker_open"], gate_row(pg)["consecutive_failures"])
    failed = bursts(arrivals(billing_url, 503), gap=1.0)
    assert len(failed[0]) >= 3, "the breaker opened before three failures"
    assert [1] * (len(failed) - 1) == [len(b) for b in failed[1:]], "more than one probe at once"
    gaps = [later[0] - earlier[-1] for earlier, later in itertools.pairwise(failed)]
    assert all(gap >= cooloff - 0.05 for gap in gaps), f"probes closer than the cool-off: {gaps}"
