"""Cancel, holds and refused actions on record: the API against a real database and emulator."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import db
from service.payouts import cancel, periodic
from service.payouts.execution import Deps, execute_payout
from tests.conftest import ADMIN_TOKEN, API_TOKEN
from tests.helpers.api import (
    ADMIN,
    assert_error,
    park_headers,
    press_headers,
    register,
    rows,
    set_balance,
    transfers,
)

Pg = psycopg.Connection[DictRow]


def press(client: TestClient, park: str = "p1", key: str | None = None) -> httpx.Response:
    r: httpx.Response = client.post(
        "/v1/payouts/instant", json={}, headers=press_headers(park, key=key or uuid.uuid4().hex)
    )
    return r


def cancel_payout(client: TestClient, payout_id: str, park: str = "p1") -> httpx.Response:
    headers = {**park_headers(park), "X-User-Id": "u1"}
    r: httpx.Response = client.post(f"/v1/payouts/{payout_id}/cancel", headers=headers)
    return r


def outcomes(sql: Pg, action: str) -> list[str]:
    return [
        r["outcome"]
        for r in rows(
            sql, "SELECT outcome FROM audit_log WHERE action = %(a)s ORDER BY id", a=action
        )
    ]


# --- cancel -------------------------------------------------------------------------------


def test_cancel_a_pending_payout(client: TestClient, sql: Pg) -> None:
    """A pending payout is cancelled (200, status cancelled), again answers 200, both audited."""
    register(client)
    payout = press(client).json()

    first = cancel_payout(client, payout["id"])
    again = cancel_payout(client, payout["id"])

    assert (200, "cancelled") == (first.status_code, first.json()["status"])
    assert first.json()["completed_at"] is not None
    assert (200, "cancelled") == (again.status_code, again.json()["status"])
    assert ["ok", "ok"] == outcomes(sql, "payout.cancel")


def test_cancel_after_a_worker_took_it_is_refused(client: TestClient, sql: Pg) -> None:
    """Once a worker has taken the payout, cancel is 409 payout_not_cancellable with its status."""
    register(client)
    payout = press(client).json()
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout["id"],))

    r = cancel_payout(client, payout["id"])

    assert {"status": "processing"} == assert_error(r, 409, "payout_not_cancellable")["details"]
    assert ["payout_not_cancellable"] == outcomes(sql, "payout.cancel")


def test_cancel_of_another_parks_payout_is_not_found(client: TestClient, sql: Pg) -> None:
    """A park cannot cancel (or learn of) another park's payout: 404, audited, unchanged."""
    register(client, "p1")
    register(client, "p2")
    payout = press(client, "p1").json()

    assert_error(cancel_payout(client, payout["id"], park="p2"), 404, "payout_not_found")
    assert "pending" == rows(sql, "SELECT status FROM payouts")[0]["status"]
    assert ["payout_not_found"] == outcomes(sql, "payout.cancel")


def test_a_cancelled_payout_starts_no_cooldown(client: TestClient) -> None:
    """After a cancel the park may press again at once."""
    register(client)
    cancel_payout(client, press(client).json()["id"])
    assert 202 == press(client).status_code


async def test_cancel_racing_a_worker_has_exactly_one_winner(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """Cancel against a worker taking the same payout, 50 times: exactly one wins each time,
    and a cancelled payout never reaches Billing."""
    await conn.execute("INSERT INTO parks (park_id) VALUES ('race-1')")
    set_balance(billing_url, "race-1", "1000000.00")
    for _ in range(50):
        payout_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount) "
            "VALUES (%s, 'race-1', 'periodic', 10)",
            (payout_id,),
        )
        req = cancel.CancelRequest("race-1", payout_id, "u1", "r1")

        async def try_cancel(req: cancel.CancelRequest = req) -> bool:
            async with deps.pool.connection() as c:
                try:
                    await cancel.cancel(c, req)
                except cancel.NotCancellable:
                    return False
                return True

        won, status = await asyncio.gather(try_cancel(), execute_payout(deps, payout_id))
        final = await (
            await conn.execute("SELECT status FROM payouts WHERE id = %s", (payout_id,))
        ).fetchone()
        assert final is not None
        assert ("cancelled" if won else "succeeded") == final["status"], (won, status)
        paid = [t for t in transfers(billing_url) if t["idempotency_key"] == str(payout_id)]
        assert (0 if won else 1) == len(paid)


# --- holds --------------------------------------------------------------------------------


def test_hold_refuses_presses_and_release_restores_them(client: TestClient, sql: Pg) -> None:
    """On hold: the press is 403 park_on_hold (audited) and the button says why; released: 202."""
    register(client)
    held = register(client, hold={"reason": "dispute #42"}).json()
    assert ("dispute #42", "admin-1") == (held["hold"]["reason"], held["hold"]["by"])

    assert_error(press(client), 403, "park_on_hold")
    shown = client.get("/v1/payouts/instant/availability", headers=park_headers()).json()
    assert (False, "park_on_hold") == (shown["available"], shown["reason"])

    released = register(client, hold=None).json()
    assert released["hold"] is None
    assert 202 == press(client).status_code
    assert ["park_on_hold", "ok"] == outcomes(sql, "payout.instant.request")
    changes = [
        r["details"]["changes"].get("hold", "-")
        for r in rows(sql, "SELECT details FROM audit_log WHERE action = 'park.update' ORDER BY id")
    ]
    assert [{"reason": "dispute #42"}, None] == changes


async def test_periodic_scan_leaves_a_held_park_alone(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A due park on hold gets no periodic payout; once released, the next scan pays it."""
    await conn.execute(
        "INSERT INTO parks (park_id, registered_at, hold_reason, hold_since) "
        "VALUES ('held-1', now() - interval '30 days', 'fraud check', now())"
    )
    set_balance(billing_url, "held-1", "10.00")

    assert 0 == (await periodic.scan(deps)).created
    await conn.execute("UPDATE parks SET hold_reason = NULL, hold_since = NULL")
    assert 1 == (await periodic.scan(deps)).created


@pytest.mark.parametrize(
    "hold",
    [{}, {"reason": ""}, {"reason": 5}, {"reason": "x", "by": "me"}, "dispute", {"reason": "a\tb"}],
)
def test_malformed_hold_is_refused_and_audited(client: TestClient, sql: Pg, hold: Any) -> None:
    """A hold other than null or {"reason": "<printable text>"} is 400, changes nothing, audited."""
    register(client)
    r = client.put("/v1/parks/p1", json={"hold": hold}, headers=ADMIN)
    assert_error(r, 400, "invalid_request")
    assert rows(sql, "SELECT hold_reason FROM parks")[0]["hold_reason"] is None
    assert ["invalid_request"] == outcomes(sql, "park.update")


# --- refused actions on record ------------------------------------------------------------


def test_admin_action_with_an_api_token_is_refused_and_audited(client: TestClient, sql: Pg) -> None:
    """PUT /v1/parks with an API token is 403 forbidden, changes nothing, and is on record as
    a user (the token's kind, not the route's) whose X-User-Id is only a claim, never as an
    admin of that name (issue 17 item 4)."""
    headers = {"Authorization": f"Bearer {API_TOKEN}", "X-User-Id": "support-lead-ivanov"}
    r = client.put("/v1/parks/p9", json={"instant_payouts_enabled": True}, headers=headers)
    assert_error(r, 403, "forbidden")
    assert [] == rows(sql, "SELECT * FROM parks")
    entry = rows(sql, "SELECT * FROM audit_log WHERE action = 'park.update'")
    assert [("user", None, "p9", "forbidden", "support-lead-ivanov")] == [
        (
            e["actor_type"],
            e["actor_id"],
            e["park_id"],
            e["outcome"],
            e["details"]["claimed_user_id"],
        )
        for e in entry
    ]


def test_park_action_with_an_admin_token_is_audited_as_that_admin_kind(
    client: TestClient, sql: Pg
) -> None:
    """A press with an admin token is 403 and on record as an admin with the claimed user id
    as a claim: the token decides the actor type, the header names no one."""
    headers = {**press_headers(), "Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = client.post("/v1/payouts/instant", json={}, headers=headers)
    assert_error(r, 403, "forbidden")
    entry = rows(sql, "SELECT * FROM audit_log WHERE action = 'payout.instant.request'")
    assert [("admin", None, "forbidden", headers["X-User-Id"])] == [
        (e["actor_type"], e["actor_id"], e["outcome"], e["details"]["claimed_user_id"])
        for e in entry
    ]


def test_admin_action_with_a_bad_body_is_audited(client: TestClient, sql: Pg) -> None:
    """PUT /v1/parks answered 400 is on record with the refusal's code."""
    r = client.put("/v1/parks/p9", content=b"{not json", headers=ADMIN)
    assert_error(r, 400, "invalid_request")
    assert ["invalid_request"] == outcomes(sql, "park.update")


def test_unauthenticated_calls_are_not_audited(client: TestClient, sql: Pg) -> None:
    """Without a valid token nobody we know acted: 401, and no audit entry."""
    r = client.put("/v1/parks/p9", json={}, headers={"Authorization": "Bearer nope-nope-nope-nope"})
    assert_error(r, 401, "unauthorized")
    assert [] == rows(sql, "SELECT * FROM audit_log")


def test_a_press_with_an_admin_token_is_refused_and_audited(client: TestClient, sql: Pg) -> None:
    """A press with an admin token is 403 forbidden and on record as a refused press."""
    register(client)
    headers = {**press_headers(), **ADMIN}
    r = client.post("/v1/payouts/instant", json={}, headers=headers)
    assert_error(r, 403, "forbidden")
    assert ["forbidden"] == outcomes(sql, "payout.instant.request")
