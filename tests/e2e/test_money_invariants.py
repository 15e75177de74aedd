"""SPEC section 2's money invariants against an adversary on the wire, in the clock and in the data.

Real API and worker processes, the Billing emulator over HTTP behind a
programmable proxy (tests/helpers/proxy.py) that holds orders past the
client's timeout, changes a park's balance the moment an order arrives or
rewrites Billing's answers; libfaketime shifts one process's clock; SIGSTOP
freezes a worker. Each test ends by checking the books: per park, Billing's
transfers are exactly our succeeded payouts, each under its own id.
"""

from __future__ import annotations

import os
import signal
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict

import httpx
import psycopg
import pytest

from tests.conftest import service_env
from tests.helpers.api import (
    admin_headers,
    assert_books_agree,
    assert_error,
    finish,
    press,
    press_headers,
    register,
    rows,
    set_balance,
    set_faults,
    transfers,
    wait_final,
)
from tests.helpers.procs import Cluster, cluster, wait_for
from tests.helpers.proxy import BillingProxy, Order

pytestmark = pytest.mark.e2e

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
EVERY_SECOND = "* * * * * */1"
Pg = psycopg.Connection[dict[str, Any]]


class Skew(TypedDict):
    """libfaketime's environment: its keys named, so none is taken for worker()'s own."""

    LD_PRELOAD: str
    FAKETIME: str
    FAKETIME_DONT_FAKE_MONOTONIC: str


def skewed(offset: str) -> Skew:
    """Environment that shifts a process's wall clock by `offset` (libfaketime)."""
    if not FAKETIME_LIB.exists():
        pytest.skip("libfaketime is not installed (Debian package faketime; .ci/run installs it)")
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def period_env(seconds: float) -> dict[str, str]:
    return {"PAYOUT_PERIOD_DAYS": str(seconds / 86400), "PERIODIC_SCAN_CRON": EVERY_SECOND}


def payouts_of(pg: Pg, park_id: str) -> list[dict[str, Any]]:
    return rows(
        pg, "SELECT * FROM payouts WHERE park_id = %(p)s ORDER BY created_at, id", p=park_id
    )


def first_final(pg: Pg, park_id: str, timeout: float = 30) -> dict[str, Any]:
    """The park's first payout, once it is final."""
    found: dict[str, Any] = wait_for(
        lambda: (p := payouts_of(pg, park_id)) and p[0]["completed_at"] is not None and p[0],
        timeout=timeout,
        what=f"the first payout of {park_id} to be final",
    )
    return found


# The kinds of payout every adversary below is tried on (SPEC section 8): a plain press, a
# press of a park that pays a fee (the fee is part of the one body), and a manual payout a
# second admin approved (it orders exactly its amount).
KINDS = ("instant", "fee", "manual")
FEE = {"percent": "1.50", "fixed": "0.30"}


def setup_park(api: str, park: str, kind: str) -> None:
    if kind == "fee":
        register(api, park, instant_fee=FEE)
    else:
        register(api, park)


def start_payout(api: str, park: str, kind: str, amount: str) -> dict[str, Any]:
    """A payout of `kind` for `amount`, accepted and queued (a manual one approved)."""
    if kind != "manual":
        return press(api, park, amount)
    body = {"park_id": park, "amount": amount, "reason": "adversary"}
    asked = httpx.post(
        f"{api}/v1/admin/payouts",
        json=body,
        headers={**admin_headers("admin-1"), "Idempotency-Key": uuid.uuid4().hex},
        timeout=10,
    )
    assert 201 == asked.status_code, asked.text
    payout_id = asked.json()["id"]
    approved = httpx.post(
        f"{api}/v1/admin/payouts/{payout_id}/approve", headers=admin_headers("admin-2"), timeout=10
    )
    assert 200 == approved.status_code, approved.text
    result: dict[str, Any] = approved.json()
    return result


def one_body_per_key(proxy: BillingProxy) -> None:
    for key, bodies in proxy.bodies_by_key().items():
        assert [bodies[0]] * len(bodies) == bodies, f"key {key} carried several bodies"


# --- orders whose answer is lost ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lost_answer_then_refusal_never_reorders_under_the_same_key(
    system: Cluster, proxy: BillingProxy, billing_url: str, pg: Pg, kind: str
) -> None:
    """Order 1 held past the timeout, the balance dropped, the retry refused: the payout ends
    failed, its key never carries another body, and the late order moves no money."""
    api = system.api()
    system.worker()
    setup_park(api, "lost-1", kind)
    set_balance(billing_url, "lost-1", "100.00")
    proxy.hold = {0: 4.0}

    def balance_drops(order: Order) -> None:
        if len(proxy.orders) == 1:
            set_balance(billing_url, "lost-1", "50.00")

    proxy.on_order = balance_drops
    payout = start_payout(api, "lost-1", kind, "100.00")

    final = wait_final(api, "lost-1", payout["id"])
    assert ("failed", "insufficient_funds") == (final["status"], final["failure_code"])
    assert proxy.landed.wait(timeout=15), "the held order never landed"
    one_body_per_key(proxy)
    assert [] == transfers(billing_url)

    again = start_payout(api, "lost-1", kind, "50.00")
    assert "succeeded" == wait_final(api, "lost-1", again["id"])["status"]
    assert "50.00" == wait_final(api, "lost-1", again["id"])["amount"]
    if kind == "fee":
        assert "1.05" == wait_final(api, "lost-1", again["id"])["fee_amount"]
    one_body_per_key(proxy)
    assert_books_agree(pg, billing_url, "lost-1")


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_outcome_past_the_retry_window_stays_in_flight(
    db_url: str, billing_url: str, proxy: BillingProxy, pg: Pg, tmp_path: Path, kind: str
) -> None:
    """An order applied but unanswered, then Billing down past the window: the payout stays
    processing (a second press is refused as in progress) until Billing answers; one transfer."""
    env = service_env(db_url, proxy.url, BILLING_RETRY_WINDOW_HOURS="0.0003")
    with cluster(env, tmp_path) as system:
        api = system.api()
        system.worker()
        setup_park(api, "unknown-1", kind)
        set_balance(billing_url, "unknown-1", "80.00")
        set_faults(billing_url, apply_then_fail_rate=1.0)
        payout = start_payout(api, "unknown-1", kind, "80.00")
        wait_for(lambda: transfers(billing_url), what="the order to be applied")
        set_faults(billing_url, apply_then_fail_rate=0.0, error_rate=1.0)
        wait_for(
            lambda: len(proxy.orders) >= 4,
            timeout=30,
            what="retries of the order past the retry window",
        )

        assert "processing" == payouts_of(pg, "unknown-1")[0]["status"]
        r = httpx.post(
            f"{api}/v1/payouts/instant",
            json={},
            headers=press_headers("unknown-1", key="second"),
            timeout=10,
        )
        assert_error(r, 409, "payout_in_progress")

        set_faults(billing_url, error_rate=0.0)
        assert "succeeded" == wait_final(api, "unknown-1", payout["id"])["status"]
    assert 1 == len(transfers(billing_url))
    assert_books_agree(pg, billing_url, "unknown-1")


# --- one park's bad data -----------------------------------------------------------------


def test_one_parks_bad_balance_never_stops_the_others(
    db_url: str, billing_url: str, proxy: BillingProxy, pg: Pg, tmp_path: Path
) -> None:
    """A malformed currency and a negative balance in the periodic batch are handled for those
    parks alone (failed invalid_balance, skipped); the healthy park is paid; all audited."""
    set_balance(billing_url, "healthy-1", "100.00")
    set_balance(billing_url, "garbled-1", "100.00")
    set_balance(billing_url, "overdrawn-1", "-10.00")

    def garble(path: str, answer: Any) -> Any:
        items = answer.get("balances", [answer])
        for item in items:
            if item.get("park_id") == "garbled-1":
                item["currency"] = "RU B"
        return answer

    proxy.rewrite = garble
    with cluster(service_env(db_url, proxy.url, **period_env(3)), tmp_path) as system:
        api = system.api()
        for park in ("healthy-1", "garbled-1", "overdrawn-1"):
            register(api, park, instant=False, periodic=True)
        system.worker()

        healthy = first_final(pg, "healthy-1")
        garbled = first_final(pg, "garbled-1")
        overdrawn = first_final(pg, "overdrawn-1")
    assert ("succeeded", "100.00") == (healthy["status"], str(healthy["amount"]))
    assert ("failed", "invalid_balance") == (garbled["status"], garbled["failure_code"])
    assert "skipped" == overdrawn["status"]
    for payout in (healthy, garbled, overdrawn):
        actions = [
            e["action"]
            for e in rows(
                pg,
                "SELECT action FROM audit_log WHERE payout_id = %(id)s ORDER BY at, id",
                id=payout["id"],
            )
        ]
        assert ["payout.periodic.create", f"payout.{payout['status']}"] == actions
    for park in ("healthy-1", "garbled-1", "overdrawn-1"):
        assert_books_agree(pg, billing_url, park)


def test_currency_change_before_the_order_is_paid_by_a_fresh_payout(
    db_url: str, billing_url: str, proxy: BillingProxy, pg: Pg, tmp_path: Path
) -> None:
    """A periodic order refused currency_mismatch ends failed and is followed at once by a new
    payout, with its own id, that pays the balance in the new currency."""
    set_balance(billing_url, "fx-1", "70.00")

    def currency_changes(order: Order) -> None:
        if len(proxy.orders) == 1:
            set_balance(billing_url, "fx-1", "70.00", currency="USD")

    proxy.on_order = currency_changes
    with cluster(service_env(db_url, proxy.url, **period_env(600)), tmp_path) as system:
        api = system.api()
        register(api, "fx-1", instant=False, periodic=True)
        # Due now: registered a period ago.
        pg.execute(
            "UPDATE parks SET registered_at = now() - interval '1 hour' WHERE park_id = 'fx-1'"
        )
        system.worker()
        paid = wait_for(
            lambda: [p for p in payouts_of(pg, "fx-1") if p["status"] == "succeeded"],
            what="the follow-up payout to succeed",
        )[0]
    first = payouts_of(pg, "fx-1")[0]
    assert ("failed", "currency_mismatch") == (first["status"], first["failure_code"])
    assert (first["id"], "USD", "70.00") == (paid["follows"], paid["currency"], str(paid["amount"]))
    one_body_per_key(proxy)
    assert_books_agree(pg, billing_url, "fx-1")


# --- a frozen worker ---------------------------------------------------------------------


def test_a_worker_frozen_mid_scan_stops_nobody(
    db_url: str, billing_url: str, proxy: BillingProxy, pg: Pg, tmp_path: Path
) -> None:
    """A worker SIGSTOPped while its scan waits on Billing holds the scan only until its lease
    expires: another worker pays the due parks."""
    parks = [f"frozen-{i}" for i in range(3)]
    for park in parks:
        set_balance(billing_url, park, "10.00")
    env = service_env(db_url, proxy.url, STALLED_JOB_SECONDS="4", **period_env(600))
    with cluster(env, tmp_path) as system:
        api = system.api()
        for park in parks:
            register(api, park, instant=False, periodic=True)
        pg.execute("UPDATE parks SET registered_at = now() - interval '1 hour'")
        proxy.hold_path["/v1/balances/select"] = 60.0
        frozen = system.worker()
        try:
            wait_for(lambda: "/v1/balances/select" in proxy.seen, what="the scan to ask Billing")
            os.kill(frozen.pid, signal.SIGSTOP)
            proxy.hold_path.clear()
            system.worker()
            for park in parks:
                assert "succeeded" == first_final(pg, park, timeout=40)["status"]
        finally:
            frozen.kill()
    for park in parks:
        assert_books_agree(pg, billing_url, park)


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_frozen_mid_order_pays_once(
    db_url: str, billing_url: str, proxy: BillingProxy, pg: Pg, tmp_path: Path, kind: str
) -> None:
    """A worker SIGSTOPped while its order waits on Billing: another worker takes the payout
    over once the first counts as dead, resends the same body under the same key, and
    Billing moves the money once."""
    set_balance(billing_url, "stopped-1", "40.00")
    env = service_env(db_url, proxy.url, STALLED_JOB_SECONDS="4")
    with cluster(env, tmp_path) as system:
        api = system.api()
        setup_park(api, "stopped-1", kind)
        proxy.hold = {0: 3.0}
        frozen = system.worker()
        try:
            payout = start_payout(api, "stopped-1", kind, "40.00")
            wait_for(lambda: proxy.orders, what="the first order to reach the proxy")
            os.kill(frozen.pid, signal.SIGSTOP)
            system.worker()
            final = wait_final(api, "stopped-1", payout["id"], timeout=60)
        finally:
            frozen.kill()
    assert ("succeeded", "40.00") == (final["status"], final["amount"])
    one_body_per_key(proxy)
    assert 1 == len(transfers(billing_url))
    assert_books_agree(pg, billing_url, "stopped-1")


# --- clocks that disagree ----------------------------------------------------------------


def test_an_api_host_ahead_by_two_hours_still_enforces_the_cooldown(
    db_url: str, billing_url: str, pg: Pg, tmp_path: Path
) -> None:
    """Two API hosts, one clock two hours ahead, a one-hour cooldown: both refuse the second
    press, by the database's clock."""
    env = service_env(db_url, billing_url, INSTANT_PAYOUT_COOLDOWN_HOURS="1")
    with cluster(env, tmp_path) as system:
        api = system.api()
        ahead = system.api(**skewed("+2h"))
        register(api, "clock-1")
        first = press(api, "clock-1")
        finish(pg, first["id"], "succeeded")

        for host in (api, ahead):
            r = httpx.post(
                f"{host}/v1/payouts/instant",
                json={},
                headers=press_headers("clock-1", key=uuid.uuid4().hex),
                timeout=10,
            )
            body = assert_error(r, 429, "cooldown_active")
            assert 3000 < int(r.headers["Retry-After"]) <= 3600, body


def test_a_worker_behind_by_two_hours_schedules_retries_in_the_future(
    db_url: str, billing_url: str, pg: Pg, tmp_path: Path
) -> None:
    """A worker whose clock lags two hours writes its retry time by the database's clock:
    the retry is due in the future, so back-off holds during an outage."""
    set_faults(billing_url, error_rate=1.0)
    with cluster(service_env(db_url, billing_url), tmp_path) as system:
        api = system.api()
        system.worker(**skewed("-2h"))
        register(api, "behind-1")
        set_balance(billing_url, "behind-1", "10.00")
        payout = press(api, "behind-1")
        job = wait_for(
            lambda: rows(
                pg,
                "SELECT j.scheduled_at > now() AS future, j.scheduled_at - now() AS wait "
                "FROM procrastinate_jobs j JOIN payouts p ON p.job_id = j.id "
                "WHERE p.id = %(id)s AND j.attempts >= 1 AND j.status = 'todo'",
                id=payout["id"],
            ),
            what="the first retry to be scheduled",
        )[0]
    assert job["future"], job["wait"]
    assert timedelta(hours=1) > job["wait"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_worker_ahead_by_two_hours_keeps_the_whole_retry_window(
    db_url: str, billing_url: str, pg: Pg, tmp_path: Path, kind: str
) -> None:
    """A worker two hours ahead, a one-hour retry window and a short Billing outage: the payout
    is retried, not failed, and succeeds once Billing is back."""
    set_faults(billing_url, error_rate=1.0)
    env = service_env(db_url, billing_url, BILLING_RETRY_WINDOW_HOURS="1")
    with cluster(env, tmp_path) as system:
        api = system.api()
        system.worker(**skewed("+2h"))
        setup_park(api, "ahead-1", kind)
        set_balance(billing_url, "ahead-1", "10.00")
        payout = start_payout(api, "ahead-1", kind, "10.00")
        wait_for(
            lambda: payouts_of(pg, "ahead-1")[0]["attempts"] >= 2,
            what="a second attempt",
        )
        assert "processing" == payouts_of(pg, "ahead-1")[0]["status"]
        set_faults(billing_url, error_rate=0.0)
        assert "succeeded" == wait_final(api, "ahead-1", payout["id"])["status"]
    assert_books_agree(pg, billing_url, "ahead-1")
