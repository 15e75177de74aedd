"""The payout job body, run in-process against a real database and the emulator over HTTP."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from service import db
from service.billing.client import Balance, BillingClient, Budget
from service.domain import Status
from service.execution import Deps, RetryLater, execute_payout
from tests.conftest import make_settings

PARK = "exec-park"


def emulator(billing_url: str, method: str, path: str, body: Any = None) -> Any:
    r = httpx.request(method, f"{billing_url}{path}", json=body)
    r.raise_for_status()
    return r.json()


async def new_payout(conn: db.Conn, *, snapshot: str | None = None) -> uuid.UUID:
    """A pending periodic payout, with the scan's balance snapshot if given."""
    await conn.execute(
        'INSERT INTO parks (park_id, params) VALUES (%s, \'{"iban": "X1"}\') '
        "ON CONFLICT DO NOTHING",
        (PARK,),
    )
    payout_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
        "VALUES (%s, %s, 'periodic', 1000, %s, %s)",
        (payout_id, PARK, snapshot, "RUB" if snapshot else None),
    )
    return payout_id


async def row(conn: db.Conn, payout_id: uuid.UUID) -> dict[str, Any]:
    found = await db.fetch_one(conn, "SELECT * FROM payouts WHERE id = %(id)s", id=payout_id)
    assert found is not None
    return found


def transfers(billing_url: str) -> list[dict[str, Any]]:
    payouts: list[dict[str, Any]] = emulator(billing_url, "GET", "/admin/payouts")["payouts"]
    return payouts


async def test_stale_snapshot_is_reread_once_and_pays_the_fresh_balance(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A snapshot above the real balance gets insufficient_funds; the job re-reads and pays it."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "40.00"})
    payout_id = await new_payout(conn, snapshot="90.00")

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)

    paid = await row(conn, payout_id)
    assert (Decimal("40.00"), Decimal("40.00")) == (paid["amount"], paid["available"])
    assert [("40.00", str(payout_id))] == [
        (t["amount"], t["idempotency_key"]) for t in transfers(billing_url)
    ]


async def test_snapshot_is_used_without_asking_billing_for_the_balance(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A periodic payout with a fresh snapshot costs Billing exactly one call: the order."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "75.00"})
    payout_id = await new_payout(conn, snapshot="75.00")

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    assert 1 == emulator(billing_url, "GET", "/admin/stats")["requests"]


async def test_order_carries_the_park_params(deps: Deps, conn: db.Conn, billing_url: str) -> None:
    """The park's params reach Billing with the order, as recorded on the payout."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "10.00"})
    payout_id = await new_payout(conn)

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    assert [{"iban": "X1"}] == [t["params"] for t in transfers(billing_url)]
    assert {"iban": "X1"} == (await row(conn, payout_id))["billing_params"]


async def test_unknown_outcome_is_settled_by_asking_billing(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """An order applied but answered 500 is found by its key on the retry: one transfer only."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "30.00"})
    emulator(billing_url, "PUT", "/admin/faults", {"apply_then_fail_rate": 1.0})
    payout_id = await new_payout(conn)

    with pytest.raises(RetryLater):
        await execute_payout(deps, payout_id)
    assert "processing" == (await row(conn, payout_id))["status"]

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    assert 1 == len(transfers(billing_url))
    assert transfers(billing_url)[0]["id"] == (await row(conn, payout_id))["billing_payout_id"]


async def test_transient_error_within_the_window_asks_for_a_retry(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A 503 inside the retry window leaves the payout processing and asks to be retried."""
    emulator(billing_url, "PUT", "/admin/faults", {"error_rate": 1.0})
    payout_id = await new_payout(conn)

    with pytest.raises(RetryLater):
        await execute_payout(deps, payout_id)
    current = await row(conn, payout_id)
    assert ("processing", 1) == (current["status"], current["attempts"])
    assert "503" in current["failure_message"]


async def test_billing_throttle_passes_retry_after_to_the_retry(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A 429 from Billing turns into a retry no sooner than its Retry-After."""
    emulator(billing_url, "PUT", "/admin/faults", {"throttle_rate": 1.0})
    payout_id = await new_payout(conn)

    with pytest.raises(RetryLater) as caught:
        await execute_payout(deps, payout_id)
    assert 1.0 == caught.value.retry_after


async def test_outage_longer_than_the_window_fails_billing_unavailable(
    db_url: str, billing_url: str, conn: db.Conn, deps: Deps
) -> None:
    """Past the retry window a still-failing Billing ends the payout failed, billing_unavailable."""
    emulator(billing_url, "PUT", "/admin/faults", {"error_rate": 1.0})
    payout_id = await new_payout(conn)
    short = Deps(
        pool=deps.pool,
        billing=deps.billing,
        settings=make_settings(db_url, billing_url, billing_retry_window=timedelta(0)),
    )

    assert Status.FAILED == await execute_payout(short, payout_id)
    failed = await row(conn, payout_id)
    assert "billing_unavailable" == failed["failure_code"]
    entries = await db.fetch_all(
        conn, "SELECT action, outcome FROM audit_log WHERE payout_id = %(id)s", id=payout_id
    )
    assert [("payout.failed", "billing_unavailable")] == [
        (e["action"], e["outcome"]) for e in entries
    ]


async def test_final_payout_is_left_alone(deps: Deps, conn: db.Conn, billing_url: str) -> None:
    """Running the job again for a finished payout changes nothing and calls nobody."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "5.00"})
    payout_id = await new_payout(conn)
    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    calls = emulator(billing_url, "GET", "/admin/stats")["requests"]
    before = await row(conn, payout_id)

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    assert calls == emulator(billing_url, "GET", "/admin/stats")["requests"]
    assert before == await row(conn, payout_id)


async def test_zero_balance_is_skipped_and_audited(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """Nothing available ends the payout skipped, with no order and a system audit entry."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "0.00"})
    payout_id = await new_payout(conn)

    assert Status.SKIPPED == await execute_payout(deps, payout_id)
    assert [] == transfers(billing_url)
    entries = await db.fetch_all(
        conn, "SELECT actor_type, action FROM audit_log WHERE payout_id = %(id)s", id=payout_id
    )
    assert [("system", "payout.skipped")] == [(e["actor_type"], e["action"]) for e in entries]


async def test_overdrawn_park_is_skipped(deps: Deps, conn: db.Conn, billing_url: str) -> None:
    """A negative balance from Billing ends the payout skipped instead of failing the job."""
    payout_id = await new_payout(conn, snapshot=None)
    await conn.execute("UPDATE payouts SET available = NULL WHERE id = %s", (payout_id,))
    billing = _NegativeBalance(billing_url)
    overdrawn = Deps(pool=deps.pool, billing=billing, settings=deps.settings)

    try:
        assert Status.SKIPPED == await execute_payout(overdrawn, payout_id)
    finally:
        await billing.aclose()
    skipped = await row(conn, payout_id)
    assert (Decimal("0.00"), None) == (skipped["available"], skipped["amount"])


class _NegativeBalance(BillingClient):
    """Billing as it answers for an overdrawn park (the emulator refuses negative balances)."""

    def __init__(self, billing_url: str) -> None:
        super().__init__(billing_url, token=None, timeout=1.0, budget=Budget(1000))

    async def balance(self, park_id: str) -> Balance:
        return Balance(park_id, Decimal("-12.50"), "RUB")
