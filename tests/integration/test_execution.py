"""The payout job body, run in-process against a real database and the emulator over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from service.billing.client import BillingClient, Budget
from service.core import db
from service.payouts.execution import Deps, RetryLater, execute_payout
from service.payouts.model import Status
from tests.conftest import make_settings
from tests.helpers.emulator import run_emulator

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


async def test_stale_snapshot_ends_the_payout_and_a_fresh_one_pays(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A refused stale order ends its payout; a follow-up with its own id pays the fresh balance."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "40.00"})
    payout_id = await new_payout(conn, snapshot="90.00")

    assert Status.FAILED == await execute_payout(deps, payout_id)
    refused = await row(conn, payout_id)
    assert ("insufficient_funds", Decimal("90.00")) == (refused["failure_code"], refused["amount"])
    follow_up = await db.fetch_one(
        conn, "SELECT id, status FROM payouts WHERE follows = %(id)s", id=payout_id
    )
    assert follow_up is not None and "pending" == follow_up["status"]

    assert Status.SUCCEEDED == await execute_payout(deps, follow_up["id"])
    assert [("40.00", str(follow_up["id"]))] == [
        (t["amount"], t["idempotency_key"]) for t in transfers(billing_url)
    ]


async def test_a_refused_order_is_never_sent_again(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """Once Billing refused a payout's order, no run sends anything under its key again."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "40.00"})
    payout_id = await new_payout(conn, snapshot="90.00")
    await execute_payout(deps, payout_id)
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "500.00"})
    calls = emulator(billing_url, "GET", "/admin/stats")["requests"]

    assert Status.FAILED == await execute_payout(deps, payout_id)
    assert calls == emulator(billing_url, "GET", "/admin/stats")["requests"]
    assert [] == transfers(billing_url)


async def test_an_order_with_an_unknown_outcome_never_fails(
    db_url: str, deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """Past the retry window an order whose answer was lost stays in flight till Billing answers."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "30.00"})
    emulator(billing_url, "PUT", "/admin/faults", {"apply_then_fail_rate": 1.0})
    payout_id = await new_payout(conn)
    with pytest.raises(RetryLater):
        await execute_payout(deps, payout_id)

    emulator(billing_url, "PUT", "/admin/faults", {"apply_then_fail_rate": 0, "error_rate": 1.0})
    expired = Deps(
        pool=deps.pool,
        billing=deps.billing,
        settings=make_settings(db_url, billing_url, billing_retry_window=timedelta(0)),
    )
    with pytest.raises(RetryLater):
        await execute_payout(expired, payout_id)
    assert "processing" == (await row(conn, payout_id))["status"]

    emulator(billing_url, "PUT", "/admin/faults", {"error_rate": 0})
    assert Status.SUCCEEDED == await execute_payout(expired, payout_id)
    assert [str(payout_id)] == [t["idempotency_key"] for t in transfers(billing_url)]


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


async def test_unknown_outcome_is_settled_by_sending_the_same_order(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """An order applied but answered 500 is replayed by its key on the retry: one transfer only."""
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
    """A negative balance ends the payout skipped; the raw figure is in its audit entry only."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "-12.50"})
    payout_id = await new_payout(conn, snapshot=None)

    assert Status.SKIPPED == await execute_payout(deps, payout_id)
    skipped = await row(conn, payout_id)
    assert (None, None) == (skipped["available"], skipped["amount"])
    entry = await db.fetch_one(
        conn, "SELECT details FROM audit_log WHERE payout_id = %(id)s", id=payout_id
    )
    assert entry is not None and "-12.50" == entry["details"]["available"]


async def test_malformed_balance_fails_that_payout_alone(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A balance in a malformed currency ends that payout failed invalid_balance, no retry."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "5.00", "currency": "R$"})
    payout_id = await new_payout(conn)

    assert Status.FAILED == await execute_payout(deps, payout_id)
    assert "invalid_balance" == (await row(conn, payout_id))["failure_code"]
    assert [] == transfers(billing_url)


async def test_amount_below_the_minimum_is_skipped(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A balance under PAYOUT_MIN_AMOUNT is never ordered: the payout ends skipped."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "0.50"})
    payout_id = await new_payout(conn)

    assert Status.SKIPPED == await execute_payout(deps, payout_id)
    assert [] == transfers(billing_url)


async def test_billing_refusing_our_token_fails_no_payout(deps: Deps, conn: db.Conn) -> None:
    """A 401 from Billing (our BILLING_TOKEN is wrong) is not Billing's answer: the payout waits
    in flight, before or after its order, and is paid once the token is right."""
    with run_emulator(env={"BILLING_TOKEN": "right-token-0123456789"}) as guarded:
        emulator(guarded, "PUT", f"/admin/balances/{PARK}", {"available": "20.00"})
        payout_id = await new_payout(conn)
        wrong = BillingClient(
            guarded, token="wrong-token-0123456789", timeout=1.0, budget=Budget(1000)
        )
        right = BillingClient(
            guarded, token="right-token-0123456789", timeout=1.0, budget=Budget(1000)
        )
        try:
            with pytest.raises(RetryLater):
                await execute_payout(Deps(deps.pool, wrong, deps.settings), payout_id)
            assert "processing" == (await row(conn, payout_id))["status"]

            assert Status.SUCCEEDED == await execute_payout(
                Deps(deps.pool, right, deps.settings), payout_id
            )
        finally:
            await wrong.aclose()
            await right.aclose()
        assert [str(payout_id)] == [t["idempotency_key"] for t in transfers(guarded)]


async def test_runs_hold_no_connection_while_billing_answers(
    db_url: str, conn: db.Conn, billing_url: str
) -> None:
    """Eight payouts whose Billing call takes 0.4 s each all succeed on one pooled connection
    that a caller waits at most 1 s for: no run keeps it while it waits on Billing."""
    emulator(billing_url, "PUT", "/admin/faults", {"latency_ms": 400})
    ids = []
    for i in range(8):
        park = f"exec-one-conn-{i}"
        await conn.execute(
            'INSERT INTO parks (park_id, params) VALUES (%s, \'{"iban": "X1"}\')', (park,)
        )
        payout_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
            "VALUES (%s, %s, 'periodic', 1000, 50, 'RUB')",
            (payout_id, park),
        )
        emulator(billing_url, "PUT", f"/admin/balances/{park}", {"available": "50.00"})
        ids.append(payout_id)
    pool = db.make_pool(db_url, name="test-one", min_size=1, max_size=1, timeout=1.0)
    await pool.open(wait=True)
    billing = BillingClient(billing_url, token=None, timeout=5.0, budget=Budget(1000))
    try:
        one = Deps(pool=pool, billing=billing, settings=make_settings(db_url, billing_url))
        done = await asyncio.gather(*(execute_payout(one, i) for i in ids))
    finally:
        await billing.aclose()
        await pool.close()
    assert [Status.SUCCEEDED] * 8 == done


async def test_a_snapshot_payout_costs_two_statements_of_its_own(
    deps: Deps, conn: db.Conn, billing_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic payout with the scan's snapshot takes and records its order in one
    statement: 2 of the worker's own round trips per payout (take, finish), not 3."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "90.00"})
    payout_id = await new_payout(conn, snapshot="90.00")
    sent: list[str] = []
    execute = db.CountingCursor.execute

    async def counted(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        # Not a new pooled connection's set-up, nor the probe of one idle for long.
        if "SET TimeZone" not in str(query) and str(query):
            sent.append(str(query))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(db.CountingCursor, "execute", counted)

    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)

    assert 2 == len(sent), sent
    done = await row(conn, payout_id)
    assert (Decimal("90.00"), {"iban": "X1"}) == (done["amount"], done["billing_params"])


async def test_the_take_decides_the_amount_as_order_amount_does(conn: db.Conn) -> None:
    """payouts_snapshot_order (SQL, the take) names the same amount as domain.order_amount
    (Python, every other decision) for every combination of balance, cap and minimum,
    and nothing (NULL) where Python would not order."""
    from service.payouts.model import order_amount

    balances = ["0", "0.01", "0.99", "1.00", "5.55", "999.99", "1000.00", "1000.01", "5000"]
    caps = ["1.00", "1000.00", "250.50"]
    minimums: list[str | None] = [None, "0.01", "1.00", "10.00", "1000.00"]
    defaults = ["1.00", "0.01", "100.00"]
    cases = []
    for available in balances:
        for cap in caps:
            for minimum in minimums:
                payout_id = uuid.uuid4()
                # One park each: a park has one payout in flight at most.
                await conn.execute("INSERT INTO parks (park_id) VALUES (%s)", (f"g-{payout_id}",))
                await conn.execute(
                    "INSERT INTO payouts (id, park_id, kind, max_amount, min_amount, available,"
                    " currency) VALUES (%s, %s, 'periodic', %s, %s, %s, 'RUB')",
                    (payout_id, f"g-{payout_id}", cap, minimum, available),
                )
                cases.append((payout_id, available, cap, minimum))
    for default in defaults:
        for payout_id, available, cap, minimum in cases:
            found = await db.fetch_one(
                conn,
                "SELECT payouts_snapshot_order(p, %(d)s) AS amount"
                " FROM payouts p WHERE id = %(id)s",
                d=Decimal(default),
                id=payout_id,
            )
            assert found is not None
            floor = Decimal(minimum) if minimum is not None else Decimal(0)
            expected = order_amount(
                Decimal(available), Decimal(cap), None, floor or Decimal(default)
            )
            assert expected == found["amount"], (available, cap, minimum, default)
