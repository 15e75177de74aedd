"""Bank returns (SPEC section 8): Billing's feed read under a lease, `succeeded -> returned`,
the park held and due again, unknown keys kept for reconciliation; emulator over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import db
from service.payouts import returns
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.helpers.api import (
    ADMIN,
    app_client,
    bank_returns,
    billing_balance,
    outside_return,
    park_headers,
    press_headers,
    register,
    set_balance,
)

PARK = "ret-park"


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with app_client(db_url) as c:
        yield c


def billing_calls(billing_url: str) -> int:
    calls: int = httpx.get(f"{billing_url}/admin/stats").json()["requests"]
    return calls


async def paid_instant(
    api: TestClient, deps: Deps, billing_url: str, amount: str = "100.00"
) -> str:
    """A succeeded instant payout of PARK (fee-carrying), by the real job against the emulator."""
    register(api, PARK, instant_fee={"percent": "1.00", "fixed": "0.00"})
    set_balance(billing_url, PARK, "500.00")
    r = api.post(
        "/v1/payouts/instant", json={"amount": amount}, headers=press_headers(PARK, key="k1")
    )
    payout_id: str = r.json()["id"]
    assert Status.SUCCEEDED == await execute_payout(deps, uuid.UUID(payout_id))
    return payout_id


def audit_of(sql: psycopg.Connection[DictRow], park: str) -> list[tuple[str, str, str]]:
    return [
        (r["actor_type"], r["actor_id"], r["action"])
        for r in sql.execute(
            "SELECT actor_type, actor_id, action FROM audit_log WHERE park_id = %s "
            "AND actor_id = 'returns-reader' ORDER BY id",
            (park,),
        ).fetchall()
    ]


async def test_a_returned_payout_is_returned_held_audited_and_an_event(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """The reader moves the payout succeeded -> returned with Billing's code and time, puts the
    park on hold by the system, audits it and writes event payout.returned."""
    payout_id = await paid_instant(api, deps, billing_url)
    bank_returns(billing_url, payout_id)
    assert "500.00" == str(billing_balance(billing_url, PARK))

    assert 1 == await returns.read(deps)
    shown = api.get(f"/v1/payouts/{payout_id}", headers=park_headers(PARK)).json()
    assert ("returned", "account_closed", "100.00", "1.00") == (
        shown["status"],
        shown["return_code"],
        shown["amount"],
        shown["fee_amount"],
    )
    assert shown["returned_at"] is not None
    park = api.get(f"/v1/parks/{PARK}", headers=ADMIN).json()
    assert ("payout_returned: account_closed", "system") == (
        park["hold"]["reason"],
        park["hold"]["by"],
    )
    assert None is park["last_payout_at"]
    assert [
        ("system", "returns-reader", "payout.returned"),
        ("system", "returns-reader", "park.update"),
    ] == audit_of(sql, PARK)
    events = sql.execute(
        "SELECT type FROM events WHERE payout_id = %s ORDER BY seq", (payout_id,)
    ).fetchall()
    assert ["payout.created", "payout.succeeded", "payout.returned"] == [e["type"] for e in events]


async def test_reading_again_applies_nothing_twice(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """A second run reads after the saved cursor; a return read again (cursor lost) is a no-op."""
    payout_id = await paid_instant(api, deps, billing_url)
    bank_returns(billing_url, payout_id)
    assert 1 == await returns.read(deps)
    assert 0 == await returns.read(deps)
    sql.execute("UPDATE billing_returns_cursor SET cursor = NULL")
    assert 0 == await returns.read(deps)
    assert 1 == len(audit_of(sql, PARK)) // 2
    assert [] == sql.execute("SELECT * FROM billing_returns_unmatched").fetchall()


async def test_a_returned_payout_starts_no_cooldown_and_the_park_is_due_again(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """Once support releases the hold, the returned payout neither holds a cooldown nor counts
    as the last payout: the button is live and the park is due for a periodic payout."""
    payout_id = await paid_instant(api, deps, billing_url)
    before = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert "cooldown_active" == before["reason"]
    bank_returns(billing_url, payout_id)
    await returns.read(deps)
    register(api, PARK, hold=None)
    after = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert (True, None) == (after["available"], after["reason"])
    # Registered a period ago: only the returned payout kept it from being due.
    sql.execute(
        "UPDATE parks SET registered_at = now() - interval '8 days' WHERE park_id = %s", (PARK,)
    )
    due = sql.execute(
        db.queries("periodic")["due_candidates"],
        {"period": timedelta(days=7), "limit": 10},
    ).fetchall()
    assert [PARK] == [r["park_id"] for r in due]


async def test_a_return_for_a_key_we_do_not_know_is_kept_not_applied(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """A return under an unknown key (or a payout not succeeded here) changes no payout and no
    park: it is kept for reconciliation."""
    payout_id = await paid_instant(api, deps, billing_url)
    unknown = str(uuid.uuid4())
    for key in (unknown, "not-a-uuid"):
        outside_return(billing_url, key, "wrong_iban")
    assert 0 == await returns.read(deps)
    kept = sql.execute(
        "SELECT idempotency_key, code FROM billing_returns_unmatched ORDER BY idempotency_key"
    ).fetchall()
    assert sorted([(unknown, "wrong_iban"), ("not-a-uuid", "wrong_iban")]) == [
        (r["idempotency_key"], r["code"]) for r in kept
    ]
    row = sql.execute("SELECT status FROM payouts WHERE id = %s", (payout_id,)).fetchone()
    assert row is not None and "succeeded" == row["status"]
    park = api.get(f"/v1/parks/{PARK}", headers=ADMIN).json()
    assert None is park["hold"]


async def test_the_reader_waits_for_the_lease(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """While another reader holds the lease, a run reads nothing (no Billing call)."""
    payout_id = await paid_instant(api, deps, billing_url)
    bank_returns(billing_url, payout_id)
    sql.execute(
        "INSERT INTO scan_leases (name, holder, expires_at)"
        " VALUES ('returns', 'someone-else', now() + interval '1 minute')"
    )
    calls = billing_calls(billing_url)
    assert 0 == await returns.read(deps)
    assert calls == billing_calls(billing_url)


def test_only_a_succeeded_payout_can_be_returned(sql: psycopg.Connection[DictRow]) -> None:
    """The trigger refuses `returned` from any status but succeeded, and any other change
    a return would smuggle in."""
    sql.execute("INSERT INTO parks (park_id) VALUES (%s)", (PARK,))
    failed = uuid.uuid4()
    sql.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (failed, PARK),
    )
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (failed,))
    sql.execute(
        "UPDATE payouts SET status = 'failed', failure_code = 'x', completed_at = now()"
        " WHERE id = %s",
        (failed,),
    )
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        sql.execute(
            "UPDATE payouts SET status = 'returned', return_code = 'c', returned_at = now()"
            " WHERE id = %s",
            (failed,),
        )
    paid = uuid.uuid4()
    sql.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (paid, PARK),
    )
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (paid,))
    sql.execute(
        "UPDATE payouts SET status = 'succeeded', available = 500, amount = 100, currency = 'RUB',"
        " billing_params = '{}', ordered_at = now(), billing_payout_id = 'b', completed_at = now()"
        " WHERE id = %s",
        (paid,),
    )
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="return changes"):
        sql.execute(
            "UPDATE payouts SET status = 'returned', return_code = 'c', returned_at = now(),"
            " amount = 1 WHERE id = %s",
            (paid,),
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute("UPDATE payouts SET status = 'returned' WHERE id = %s", (paid,))


def test_the_emulator_feed_lists_returns_in_order(billing_url: str) -> None:
    """GET /v1/returns pages the returns in the order recorded; the cursor moves past them."""
    for i in range(3):
        outside_return(billing_url, f"k{i}")
    first: dict[str, Any] = httpx.get(f"{billing_url}/v1/returns?limit=2").json()
    assert ["k0", "k1"] == [r["idempotency_key"] for r in first["returns"]]
    rest = httpx.get(f"{billing_url}/v1/returns?after={first['next_cursor']}").json()
    assert ["k2"] == [r["idempotency_key"] for r in rest["returns"]]
    empty = httpx.get(f"{billing_url}/v1/returns?after={rest['next_cursor']}").json()
    assert ([], rest["next_cursor"]) == (empty["returns"], empty["next_cursor"])
    assert 400 == httpx.get(f"{billing_url}/v1/returns?after=x").status_code
    assert (
        404
        == httpx.post(f"{billing_url}/admin/payouts/nope/return", json={"code": "c"}).status_code
    )
