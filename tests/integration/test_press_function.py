"""The one-call press (migration 0014, payouts_press_instant) keeps every rule of the press
it replaced (SPEC section 8): fee terms and the subscription's end read under the park's
lock, a returned payout out of the cooldown, and it runs as the app role.

A second session (psycopg, as an admin's PUT would) changes the park and keeps its row
lock while the press runs into it; the test commits once the press is seen waiting.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import sql

from service.core import db
from service.payouts import instant, returns
from service.payouts import store as payouts
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.conftest import make_settings
from tests.helpers.api import (
    app_client,
    assert_error,
    bank_returns,
    lock_waiters,
    press_headers,
    register,
    set_balance,
)

PARK = "press-fn-park"


async def register_park(conn: db.Conn) -> None:
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled, registered_at) "
        "VALUES (%s, true, now() - interval '30 days')",
        (PARK,),
    )


async def clock_passed(admin: psycopg.Connection[Any], column: str) -> bool:
    """The database's clock is past the park's `column` as `admin` sees it."""
    query = sql.SQL("SELECT clock_timestamp() > {} FROM parks WHERE park_id = %s")
    row = admin.execute(query.format(sql.Identifier(column)), (PARK,)).fetchone()
    assert row is not None
    return bool(row[0])


async def press_into_the_lock(
    conn: db.Conn,
    db_url: str,
    admin: psycopg.Connection[Any],
    change: str,
    *,
    commit_after: str | None = None,
) -> instant.Accepted | instant.Refused:
    """Change the park in `admin` (holding its row), press, commit the change once the
    press waits for the lock (and, if given, once the database's clock has passed the
    park's `commit_after` column); the press's outcome."""
    admin.execute(f"UPDATE parks SET {change} WHERE park_id = %s", (PARK,))
    req = instant.InstantRequest(PARK, "user-1", "press-1", "req-1", Decimal("100.00"))

    async def press() -> instant.Accepted | instant.Refused:
        async with await db.connect(db_url, name="press") as c:
            try:
                return await instant.request_instant(c, make_settings(db_url), req)
            except instant.Refused as refusal:
                return refusal

    task = asyncio.ensure_future(press())
    async with asyncio.timeout(20):
        while await lock_waiters(conn) == 0:
            assert not task.done(), "the press finished without waiting for the park's lock"
            await asyncio.sleep(0.02)
        while commit_after is not None:
            if await clock_passed(admin, commit_after):
                break
            await asyncio.sleep(0.02)
    admin.commit()
    async with asyncio.timeout(20):
        return await task


async def test_fee_terms_committed_while_a_press_waits_are_the_payouts(
    conn: db.Conn, db_url: str, admin: psycopg.Connection[Any]
) -> None:
    """A press that waits for the park's lock behind a change of fee terms is accepted with
    the terms that change committed, copied onto the payout."""
    await register_park(conn)
    outcome = await press_into_the_lock(
        conn, db_url, admin, "instant_fee_percent = 2.50, instant_fee_fixed = 1.00"
    )

    assert isinstance(outcome, instant.Accepted)
    rows = await db.fetch_all(conn, "SELECT fee_percent, fee_fixed FROM payouts")
    assert [(Decimal("2.50"), Decimal("1.00"))] == [
        (r["fee_percent"], r["fee_fixed"]) for r in rows
    ]
    assert (Decimal("2.50"), Decimal("1.00")) == (
        outcome.payout.fee_percent,
        outcome.payout.fee_fixed,
    )


async def test_a_subscription_end_committed_while_a_press_waits_refuses_it(
    conn: db.Conn, db_url: str, admin: psycopg.Connection[Any]
) -> None:
    """A press that waits for the park's lock behind an end date set to now is refused
    instant_payouts_disabled with details.reason subscription_ended, audited so, and
    creates no payout."""
    await register_park(conn)
    outcome = await press_into_the_lock(conn, db_url, admin, "instant_payouts_until = now()")

    assert isinstance(outcome, instant.Refused)
    assert ("instant_payouts_disabled", {"reason": "subscription_ended"}) == (
        outcome.code,
        outcome.details,
    )
    entries = await db.fetch_all(
        conn,
        "SELECT outcome, details->>'reason' AS reason FROM audit_log "
        "WHERE action = 'payout.instant.request'",
    )
    assert [("instant_payouts_disabled", "subscription_ended")] == [
        (e["outcome"], e["reason"]) for e in entries
    ]
    assert [] == await db.fetch_all(conn, "SELECT id FROM payouts")


async def test_the_end_date_is_judged_by_the_clock_after_the_lock(
    conn: db.Conn, db_url: str, admin: psycopg.Connection[Any]
) -> None:
    """An end date that passes while the press waits for the park's lock refuses it
    (subscription_ended): the time rules read the database's clock once the lock is held,
    not when the call started."""
    await register_park(conn)
    outcome = await press_into_the_lock(
        conn,
        db_url,
        admin,
        "instant_payouts_until = clock_timestamp() + interval '200 milliseconds'",
        commit_after="instant_payouts_until",
    )

    assert isinstance(outcome, instant.Refused)
    assert ("instant_payouts_disabled", {"reason": "subscription_ended"}) == (
        outcome.code,
        outcome.details,
    )
    assert [] == await db.fetch_all(conn, "SELECT id FROM payouts")


async def test_the_press_runs_as_the_app_role(app_db_url: str, conn: db.Conn) -> None:
    """As fleet_payouts_app the press is accepted (payout, job, audit entry), replayed, and
    refused with its audit entry: the function needs no privilege the app lacks."""
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled, instant_fee_percent, "
        "instant_fee_fixed) VALUES (%s, true, 1.00, 0.00)",
        (PARK,),
    )
    settings = make_settings(app_db_url)
    first = instant.InstantRequest(PARK, "user-1", "k-1", "req-1", Decimal("10.00"))
    second = instant.InstantRequest(PARK, "user-1", "k-2", "req-2", Decimal("10.00"))
    async with await db.connect(app_db_url, name="app-press") as app:
        accepted = await instant.request_instant(app, settings, first)
        replayed = await instant.request_instant(app, settings, first)
        with pytest.raises(instant.Refused) as refused:
            await instant.request_instant(app, settings, second)

    assert (False, True, accepted.payout.id) == (
        accepted.replay,
        replayed.replay,
        replayed.payout.id,
    )
    assert "payout_in_progress" == refused.value.code
    outcomes = await db.fetch_all(
        conn,
        "SELECT outcome, (details ? 'replay') AS replay FROM audit_log "
        "WHERE action = 'payout.instant.request' ORDER BY id",
    )
    assert [("ok", False), ("ok", True), ("payout_in_progress", False)] == [
        (o["outcome"], o["replay"]) for o in outcomes
    ]
    jobs = await db.fetch_all(conn, "SELECT args->>'payout_id' AS id FROM procrastinate_jobs")
    assert [str(accepted.payout.id)] == [j["id"] for j in jobs]


async def test_a_returned_payout_holds_no_cooldown_for_the_next_press(
    db_url: str, deps: Deps, billing_url: str
) -> None:
    """A press right after a succeeded instant payout is refused cooldown_active; once the bank
    returned that payout (and support released the hold) a press is accepted."""
    with app_client(db_url) as api:
        register(api, PARK, instant_fee={"percent": "1.00", "fixed": "0.00"})
        set_balance(billing_url, PARK, "500.00")
        first = api.post(
            "/v1/payouts/instant", json={"amount": "100.00"}, headers=press_headers(PARK, key="k1")
        )
        payout_id = first.json()["id"]
        assert Status.SUCCEEDED == await execute_payout(deps, uuid.UUID(payout_id))
        early = api.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers(PARK, key="k2")
        )
        assert_error(early, 429, "cooldown_active")

        bank_returns(billing_url, payout_id)
        assert 1 == await returns.read(deps)
        register(api, PARK, hold=None)
        after = api.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers(PARK, key="k3")
        )

    assert 202 == after.status_code, after.text


async def _press_hits_the_unique_backstop(
    conn: db.Conn, db_url: str, monkeypatch: pytest.MonkeyPatch, req: instant.InstantRequest
) -> instant.Accepted | instant.Refused:
    """Press as if a payout written without the park's lock had made the press function's
    insert violate a unique index (the backstop the lock makes unreachable)."""
    fetch_one = db.fetch_one

    async def violating(c: db.Conn, query: Any, **params: Any) -> Any:
        if query == payouts.Q["press_instant"]:
            raise psycopg.errors.UniqueViolation("duplicate key value")
        return await fetch_one(c, query, **params)

    monkeypatch.setattr(db, "fetch_one", violating)
    try:
        return await instant.request_instant(conn, make_settings(db_url), req)
    except instant.Refused as refusal:
        return refusal


async def test_a_unique_violation_under_our_key_and_body_is_a_replay(
    conn: db.Conn, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A press whose insert hits the unique indexes, with a payout already made under its key
    and body, answers that payout as a replay (read through the park's typed state)."""
    await register_park(conn)
    req = instant.InstantRequest(PARK, "user-1", "press-1", "req-1", Decimal("100.00"))
    made = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, idempotency_key, "
        "request_fingerprint, requested_by) VALUES (%s, %s, 'instant', 1000, %s, %s, 'user-1')",
        (made, PARK, req.idempotency_key, req.fingerprint),
    )

    outcome = await _press_hits_the_unique_backstop(conn, db_url, monkeypatch, req)

    assert isinstance(outcome, instant.Accepted)
    assert (made, True) == (outcome.payout.id, outcome.replay)


async def test_a_unique_violation_under_another_payout_is_refused_as_in_flight(
    conn: db.Conn, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A press whose insert hits the unique indexes with no payout under its key is refused
    payout_in_progress, and the refusal is audited."""
    await register_park(conn)
    req = instant.InstantRequest(PARK, "user-1", "press-1", "req-1", Decimal("100.00"))
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (uuid.uuid4(), PARK),
    )

    outcome = await _press_hits_the_unique_backstop(conn, db_url, monkeypatch, req)

    assert isinstance(outcome, instant.Refused)
    assert "payout_in_progress" == outcome.code
    audited = await db.fetch_all(
        conn,
        "SELECT outcome FROM audit_log WHERE action = 'payout.instant.request' AND park_id = %(p)s",
        p=PARK,
    )
    assert ["payout_in_progress"] == [r["outcome"] for r in audited]
