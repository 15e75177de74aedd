"""Payout execution end to end: API, real worker processes, the Billing emulator.

Every test starts its own API and workers (`tests.helpers.procs.cluster`)
against a fresh database and the session's emulator, reset per test.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import service_env
from tests.helpers.api import (
    ADMIN,
    billing_balance,
    count_final,
    get_payout,
    press,
    register,
    rows,
    set_balance,
    set_faults,
    stats,
    transfers,
    wait_final,
)
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

FINAL = ("succeeded", "failed", "skipped")


# --- helpers -----------------------------------------------------------------------


# --- one payout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("balance", "requested", "max_amount", "expected"),
    [
        pytest.param("1000.00", None, "400.00", "400.00", id="limit-binds"),
        pytest.param("1000.00", "250.50", "400.00", "250.50", id="request-binds"),
        pytest.param("120.40", "300.00", "400.00", "120.40", id="balance-below-request"),
    ],
)
def test_instant_payout_moves_min_of_balance_request_and_limit(
    db_url: str,
    billing_url: str,
    tmp_path: Any,
    balance: str,
    requested: str | None,
    max_amount: str,
    expected: str,
) -> None:
    """A pressed instant payout succeeds with min(balance, requested, max) moved once under its id,
    and is recorded on the park and in the audit log.
    """
    environ = service_env(db_url, billing_url, PAYOUT_MAX_AMOUNT=max_amount)
    with cluster(environ, tmp_path) as c:
        api = c.api()
        register(api, "park-a", periodic=False, status=201)
        set_balance(billing_url, "park-a", balance)
        c.worker()
        pressed = press(api, "park-a", requested)

        done = wait_final(api, "park-a", pressed["id"])

        assert ("succeeded", expected, "RUB") == (done["status"], done["amount"], done["currency"])
        moved = transfers(billing_url)
        assert [(pressed["id"], "park-a", expected)] == [
            (t["idempotency_key"], t["park_id"], t["amount"]) for t in moved
        ]
        assert moved[0]["id"] == done["billing_payout_id"]
        assert Decimal(balance) - Decimal(expected) == billing_balance(billing_url, "park-a")
        park = httpx.get(f"{api}/v1/parks/park-a", headers=ADMIN, timeout=10).json()
        assert park["last_payout_at"] is not None
        r = httpx.get(
            f"{api}/v1/audit",
            params={"park_id": "park-a", "action": "payout.succeeded"},
            headers=ADMIN,
            timeout=10,
        )
        entries = r.json()["entries"]
        assert [("system", "ok", pressed["id"])] == [
            (e["actor_type"], e["outcome"], e["payout_id"]) for e in entries
        ]


@pytest.mark.parametrize(
    ("balance", "status", "failure_code"),
    [
        pytest.param("0.00", "skipped", None, id="zero-balance"),
        pytest.param(None, "failed", "park_not_found", id="unknown-to-billing"),
    ],
)
def test_instant_payout_without_money_to_move_orders_nothing(
    db_url: str,
    billing_url: str,
    tmp_path: Any,
    balance: str | None,
    status: str,
    failure_code: str | None,
) -> None:
    """A zero balance ends `skipped` and a park Billing does not know ends `failed`
    (park_not_found), with no transfer either way.
    """
    with cluster(service_env(db_url, billing_url), tmp_path) as c:
        api = c.api()
        register(api, "park-z", periodic=False, status=201)
        if balance is not None:
            set_balance(billing_url, "park-z", balance)
        c.worker()
        pressed = press(api, "park-z")

        done = wait_final(api, "park-z", pressed["id"])

        assert (status, failure_code) == (done["status"], done["failure_code"])
        assert [] == transfers(billing_url)
        park = httpx.get(f"{api}/v1/parks/park-z", headers=ADMIN, timeout=10).json()
        assert park["last_payout_at"] is None


# --- faults -----------------------------------------------------------------------------

FAULTS = {
    "errors": {"error_rate": 0.3},
    "timeouts": {"timeout_rate": 0.3, "timeout_hang_ms": 1500},
    "apply-then-fail": {"apply_then_fail_rate": 0.3},
    "all-three": {
        "error_rate": 0.3,
        "timeout_rate": 0.3,
        "timeout_hang_ms": 1500,
        "apply_then_fail_rate": 0.3,
    },
}
NO_FAULTS = {"error_rate": 0.0, "timeout_rate": 0.0, "apply_then_fail_rate": 0.0}


@pytest.mark.parametrize("faults", list(FAULTS.values()), ids=list(FAULTS))
def test_faulty_billing_still_pays_every_payout_exactly_once(
    db_url: str,
    billing_url: str,
    tmp_path: Any,
    pg: psycopg.Connection[dict[str, Any]],
    faults: dict[str, float],
) -> None:
    """Under injected Billing errors, timeouts and apply-then-fail, every one of 50 payouts ends
    `succeeded` with exactly one transfer of the right amount under its id.
    """
    parks = [f"fault-{i:02d}" for i in range(50)]
    balances = {p: f"{100 + i}.{i:02d}" for i, p in enumerate(parks)}
    with cluster(service_env(db_url, billing_url), tmp_path) as c:
        api = c.api()
        for park in parks:
            register(api, park, periodic=False, status=201)
            set_balance(billing_url, park, balances[park])
        set_faults(billing_url, **faults)
        c.worker()
        c.worker()
        ids = {press(api, park)["id"]: park for park in parks}

        wait_for(
            lambda: count_final(pg, list(ids)) >= 40,
            timeout=60,
            interval=0.1,
            what="most payouts to finish under faults",
        )
        set_faults(billing_url, **NO_FAULTS)
        wait_for(
            lambda: count_final(pg, list(ids)) == len(ids),
            timeout=60,
            interval=0.1,
            what="every payout to finish once faults stopped",
        )

        final = rows(
            pg,
            "SELECT id::text AS id, status, amount, attempts FROM payouts "
            "WHERE id = ANY(%(ids)s::uuid[])",
            ids=list(ids),
        )
        assert any(r["attempts"] > 1 for r in final), "the faults were never felt"
        assert {i: "succeeded" for i in ids} == {r["id"]: r["status"] for r in final}
        moved = transfers(billing_url)
        assert {i: 1 for i in ids} == dict(Counter(t["idempotency_key"] for t in moved))
        assert {i: balances[p] for i, p in ids.items()} == {
            t["idempotency_key"]: t["amount"] for t in moved
        }
        assert {i: Decimal(balances[p]) for i, p in ids.items()} == {
            r["id"]: r["amount"] for r in final
        }


def test_worker_killed_mid_order_payout_completes_once_on_another_worker(
    db_url: str,
    billing_url: str,
    tmp_path: Any,
    pg: psycopg.Connection[dict[str, Any]],
) -> None:
    """A worker SIGKILLed while its order is in flight at Billing leaves a payout that another
    worker finishes `succeeded` with exactly one transfer.
    """
    environ = service_env(db_url, billing_url, BILLING_TIMEOUT_SECONDS="10")
    with cluster(environ, tmp_path) as c:
        api = c.api()
        register(api, "park-k", periodic=False, status=201)
        set_balance(billing_url, "park-k", "777.00")
        set_faults(billing_url, latency_ms=3000)
        first = c.worker()
        pressed = press(api, "park-k")

        # The balance, then (after ordered_at is committed) the order itself:
        # once that has arrived, the order is in flight.
        wait_for(
            lambda: (
                rows(pg, "SELECT ordered_at FROM payouts WHERE id = %(id)s", id=pressed["id"])[0][
                    "ordered_at"
                ]
                is not None
                and stats(billing_url)["requests"] >= 2
            ),
            timeout=30,
            interval=0.05,
            what="the payout order to be in flight at Billing",
        )
        first.kill()
        assert [] == transfers(billing_url), "the kill came after Billing applied the order"
        assert "processing" == get_payout(api, "park-k", pressed["id"])["status"]
        c.worker()

        done = wait_final(api, "park-k", pressed["id"], timeout=60)

        assert ("succeeded", "777.00") == (done["status"], done["amount"])
        moved = transfers(billing_url)
        assert [(pressed["id"], "777.00")] == [(t["idempotency_key"], t["amount"]) for t in moved]
        assert Decimal("0.00") == billing_balance(billing_url, "park-k")
