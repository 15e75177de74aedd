"""The paid instant option (SPEC section 8): fee terms and end date per park, the fee fixed
with the order and sent to Billing, the quote; real PostgreSQL, the emulator over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import db
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.helpers.api import (
    ADMIN,
    app_client,
    assert_error,
    park_headers,
    press_headers,
    register,
    set_balance,
    transfers,
)

PARK = "fee-park"
FEE = {"percent": "1.50", "fixed": "0.30"}


@pytest.fixture
def api(db_url: str, billing_url: str) -> Iterator[TestClient]:
    """The API on this test's database, its quotes reading the session's emulator."""
    with app_client(db_url, billing_url=billing_url) as c:
        yield c


def press(api: TestClient, amount: str | None = None, key: str = "k1") -> Any:
    body = {"amount": amount} if amount is not None else {}
    return api.post("/v1/payouts/instant", json=body, headers=press_headers(PARK, key=key))


def test_fee_and_end_date_are_set_shown_cleared_and_audited(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """PUT /v1/parks sets instant_fee and instant_payouts_until, the park object shows them,
    null clears them, and each change is in the audit entry."""
    until = "2031-01-02T03:04:05Z"
    body = register(api, PARK, instant_fee=FEE, instant_payouts_until=until).json()
    assert (FEE, until) == (body["instant_fee"], body["instant_payouts_until"])
    shown = api.get(f"/v1/parks/{PARK}", headers=ADMIN).json()
    assert (FEE, until) == (shown["instant_fee"], shown["instant_payouts_until"])

    left_alone = register(api, PARK, instant=False).json()
    assert (FEE, until) == (left_alone["instant_fee"], left_alone["instant_payouts_until"])

    cleared = register(api, PARK, instant=None, instant_fee=None, instant_payouts_until=None).json()
    assert (None, None) == (cleared["instant_fee"], cleared["instant_payouts_until"])
    changes = [
        r["details"]["changes"]
        for r in sql.execute(
            "SELECT details FROM audit_log WHERE park_id = %s AND action LIKE 'park.%%' "
            "ORDER BY id",
            (PARK,),
        ).fetchall()
    ]
    assert FEE == changes[0]["instant_fee"] and until == changes[0]["instant_payouts_until"]
    assert {"instant_fee": None, "instant_payouts_until": None} == changes[-1]


@pytest.mark.parametrize(
    "fee",
    [
        {"percent": "100.01", "fixed": "0.00"},
        {"percent": "1.00"},
        {"percent": 1, "fixed": "0.00"},
        {"percent": "1.00", "fixed": "-1.00"},
        {"percent": "1.001", "fixed": "0.00"},
        {"percent": "1.00", "fixed": "0.00", "cap": "5.00"},
        "1%",
    ],
)
def test_a_malformed_fee_is_refused_and_changes_nothing(api: TestClient, fee: Any) -> None:
    """A fee that is not {"percent": 0-100, "fixed": >= 0} as decimal strings is a 400."""
    register(api, PARK)
    r = api.put(f"/v1/parks/{PARK}", json={"instant_fee": fee}, headers=ADMIN)
    assert_error(r, 400, "invalid_request")
    assert None is api.get(f"/v1/parks/{PARK}", headers=ADMIN).json()["instant_fee"]


@pytest.mark.parametrize("until", ["tomorrow", "2030-01-01T00:00:00", 5])
def test_a_malformed_end_date_is_refused(api: TestClient, until: Any) -> None:
    """instant_payouts_until is null or an RFC 3339 timestamp with its zone; else a 400."""
    register(api, PARK)
    r = api.put(f"/v1/parks/{PARK}", json={"instant_payouts_until": until}, headers=ADMIN)
    assert_error(r, 400, "invalid_request")


def test_any_past_end_date_is_accepted_and_ends_the_subscription(api: TestClient) -> None:
    """instant_payouts_until in year 1 is a past date like any other (main f057951): stored,
    and a press is then refused subscription_ended."""
    until = "0001-01-01T00:00:00Z"
    assert until == register(api, PARK, instant_payouts_until=until).json()["instant_payouts_until"]
    body = assert_error(press(api, "10.00"), 403, "instant_payouts_disabled")
    assert {"reason": "subscription_ended"} == body["details"]


def test_a_press_after_the_end_date_is_refused_subscription_ended(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """After instant_payouts_until a press is 403 instant_payouts_disabled with
    details.reason subscription_ended, audited, and availability says so."""
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    register(api, PARK, instant_payouts_until=past)
    body = assert_error(press(api, "10.00"), 403, "instant_payouts_disabled")
    assert {"reason": "subscription_ended"} == body["details"]
    shown = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert (False, "instant_payouts_disabled", {"reason": "subscription_ended"}) == (
        shown["available"],
        shown["reason"],
        shown["details"],
    )
    outcomes = [
        r["outcome"]
        for r in sql.execute(
            "SELECT outcome FROM audit_log WHERE action = 'payout.instant.request'"
        ).fetchall()
    ]
    assert ["instant_payouts_disabled"] == outcomes
    assert [] == sql.execute("SELECT id FROM payouts").fetchall()


def test_a_press_before_the_end_date_is_accepted(api: TestClient) -> None:
    """An end date still ahead changes nothing: the press is accepted."""
    register(api, PARK, instant_payouts_until=(datetime.now(UTC) + timedelta(days=1)).isoformat())
    assert 202 == press(api, "10.00").status_code


def test_availability_shows_the_fee(api: TestClient) -> None:
    """GET /v1/payouts/instant/availability carries the park's fee terms (null without)."""
    register(api, PARK)
    plain = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert None is plain["fee"]
    register(api, PARK, instant_fee=FEE)
    shown = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert (True, FEE) == (shown["available"], shown["fee"])


async def test_a_fee_carrying_payout_orders_its_amount_with_the_fee(
    api: TestClient, deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """An instant payout of a park with a fee orders `amount` with fee_amount sent as `fee`;
    net_amount reaches the park; the payout object shows both."""
    register(api, PARK, instant_fee=FEE)
    set_balance(billing_url, PARK, "1000.00")
    payout_id = press(api, "100.00").json()["id"]

    assert Status.SUCCEEDED == await execute_payout(deps, uuid.UUID(payout_id))
    shown = api.get(f"/v1/payouts/{payout_id}", headers=park_headers(PARK)).json()
    # 100.00 x 1.50 % = 1.50, + 0.30 fixed
    assert ("100.00", "1.80", "98.20") == (
        shown["amount"],
        shown["fee_amount"],
        shown["net_amount"],
    )
    assert [(payout_id, "100.00", "1.80")] == [
        (t["idempotency_key"], t["amount"], t.get("fee")) for t in transfers(billing_url)
    ]


async def test_the_fee_terms_are_those_of_the_press(
    api: TestClient, deps: Deps, billing_url: str
) -> None:
    """Fee terms changed after a press do not change that payout's fee: they were fixed with it."""
    register(api, PARK, instant_fee=FEE)
    set_balance(billing_url, PARK, "1000.00")
    payout_id = press(api, "100.00").json()["id"]
    register(api, PARK, instant_fee={"percent": "50.00", "fixed": "0.00"})

    assert Status.SUCCEEDED == await execute_payout(deps, uuid.UUID(payout_id))
    assert ["1.80"] == [t.get("fee") for t in transfers(billing_url)]


async def test_a_payout_whose_net_would_be_under_the_minimum_is_skipped(
    api: TestClient, deps: Deps, billing_url: str
) -> None:
    """When the fee leaves the park less than PAYOUT_MIN_AMOUNT, nothing is ordered: skipped."""
    register(api, PARK, instant_fee={"percent": "0.00", "fixed": "9.50"})
    set_balance(billing_url, PARK, "1000.00")
    payout_id = press(api, "10.00").json()["id"]

    assert Status.SKIPPED == await execute_payout(deps, uuid.UUID(payout_id))
    assert [] == transfers(billing_url)


async def test_periodic_payouts_carry_no_fee(
    api: TestClient, deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A periodic payout of a park with a fee orders no fee (fee_amount null)."""
    register(api, PARK, instant_fee=FEE)
    set_balance(billing_url, PARK, "50.00")
    payout_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (payout_id, PARK),
    )
    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    assert [("50.00", None)] == [(t["amount"], t.get("fee")) for t in transfers(billing_url)]


def test_the_database_refuses_a_fee_that_does_not_add_up(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """The schema checks net_amount = amount - fee_amount >= 0, and no fee on other kinds."""
    register(api, PARK, instant_fee=FEE)
    payout_id = press(api, "100.00").json()["id"]
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute(
            "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', "
            "billing_params = '{}', fee_amount = 1.80, net_amount = 98.21 WHERE id = %s",
            (payout_id,),
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        sql.execute(
            "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', "
            "billing_params = '{}', fee_amount = 101, net_amount = -1 WHERE id = %s",
            (payout_id,),
        )
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="fee"):
        sql.execute(
            "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', "
            "billing_params = '{}', ordered_at = now() WHERE id = %s",
            (payout_id,),
        )


def test_an_ordered_fee_never_changes(api: TestClient, sql: psycopg.Connection[DictRow]) -> None:
    """Once the order is recorded, its fee is part of the body: the trigger refuses a change."""
    register(api, PARK, instant_fee=FEE)
    payout_id = press(api, "100.00").json()["id"]
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    sql.execute(
        "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', "
        "billing_params = '{}', fee_amount = 1.80, net_amount = 98.20, ordered_at = now() "
        "WHERE id = %s",
        (payout_id,),
    )
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="cannot change"):
        sql.execute(
            "UPDATE payouts SET fee_amount = 0.80, net_amount = 99.20 WHERE id = %s",
            (payout_id,),
        )


def test_the_quote_splits_what_a_press_would_order(
    api: TestClient, sql: psycopg.Connection[DictRow], billing_url: str
) -> None:
    """GET /v1/payouts/instant/quote answers amount, fee and net for Billing's balance now,
    and creates nothing."""
    register(api, PARK, instant_fee={"percent": "1.00", "fixed": "0.00"})
    set_balance(billing_url, PARK, "500.00")
    headers = park_headers(PARK)
    asked = api.get("/v1/payouts/instant/quote?amount=100.00", headers=headers)
    assert 200 == asked.status_code, asked.text
    assert {"amount": "100.00", "fee_amount": "1.00", "net_amount": "99.00", "currency": "RUB"} == (
        asked.json()
    )
    everything = api.get("/v1/payouts/instant/quote", headers=headers).json()
    assert ("500.00", "5.00", "495.00") == (
        everything["amount"],
        everything["fee_amount"],
        everything["net_amount"],
    )
    assert [] == sql.execute("SELECT id FROM payouts").fetchall()


def test_the_quote_of_a_free_park_has_no_fee(api: TestClient, billing_url: str) -> None:
    """A park without fee terms is quoted its amount with null fee and net."""
    register(api, PARK)
    set_balance(billing_url, PARK, "80.00")
    body = api.get("/v1/payouts/instant/quote?amount=100.00", headers=park_headers(PARK)).json()
    assert {"amount": "80.00", "fee_amount": None, "net_amount": None, "currency": "RUB"} == body


@pytest.mark.parametrize("amount", ["abc", "1.001", "-5", "0", "1e3", ""])
def test_a_malformed_quote_amount_is_a_400(api: TestClient, amount: str) -> None:
    """The quote's amount is read like a press's: a positive decimal string, else 400."""
    register(api, PARK)
    r = api.get(f"/v1/payouts/instant/quote?amount={amount}", headers=park_headers(PARK))
    assert_error(r, 400, "invalid_request")


def test_the_quote_of_an_unknown_park_is_a_404(api: TestClient) -> None:
    """A park we do not know is 404 park_not_found, before Billing is asked."""
    r = api.get("/v1/payouts/instant/quote", headers=park_headers("nobody"))
    assert_error(r, 404, "park_not_found")


def test_the_quote_answers_503_while_billing_is_away(db_url: str) -> None:
    """Billing out of reach: 503 unavailable with Retry-After, never a 500."""
    with app_client(db_url, billing_url="http://127.0.0.1:9") as api:
        register(api, PARK)
        r = api.get("/v1/payouts/instant/quote", headers=park_headers(PARK))
    assert_error(r, 503, "unavailable")
    assert "Retry-After" in r.headers


def test_fees_are_decimal_in_the_database(
    sql: psycopg.Connection[DictRow], api: TestClient
) -> None:
    """The fee columns are numeric: Decimal in, Decimal out."""
    register(api, PARK, instant_fee=FEE)
    row = sql.execute(
        "SELECT instant_fee_percent, instant_fee_fixed FROM parks WHERE park_id = %s", (PARK,)
    ).fetchone()
    assert row is not None
    assert (Decimal("1.50"), Decimal("0.30")) == (
        row["instant_fee_percent"],
        row["instant_fee_fixed"],
    )
