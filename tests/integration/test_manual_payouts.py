"""Manual payouts with four eyes (SPEC section 8): request, approve, deny, expire, list;
the database's own refusals; against a real PostgreSQL and the emulator over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import db
from service.payouts import manual
from service.payouts.execution import Deps, execute_payout
from service.payouts.instant import Refused
from service.payouts.model import Status
from tests.conftest import make_settings
from tests.helpers.api import (
    admin_headers,
    app_client,
    assert_error,
    park_headers,
    register,
    set_balance,
    transfers,
)

PARK = "manual-park"
BODY = {"park_id": PARK, "amount": "250.00", "reason": "goodwill #17"}


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with app_client(db_url) as c:
        yield c


def ask(
    api: TestClient, body: dict[str, Any] | None = None, *, user: str = "admin-1", key: str = "m1"
) -> Any:
    headers = {**admin_headers(user), "Idempotency-Key": key}
    return api.post("/v1/admin/payouts", json=BODY if body is None else body, headers=headers)


def decide(api: TestClient, payout_id: str, verb: str, user: str, body: Any = None) -> Any:
    return api.post(f"/v1/admin/payouts/{payout_id}/{verb}", json=body, headers=admin_headers(user))


def audit_trail(sql: psycopg.Connection[DictRow], payout_id: str) -> list[tuple[str, str, str]]:
    return [
        (r["action"], r["actor_id"], r["outcome"])
        for r in sql.execute(
            "SELECT action, actor_id, outcome FROM audit_log WHERE payout_id = %s ORDER BY id",
            (payout_id,),
        ).fetchall()
    ]


def jobs_of(sql: psycopg.Connection[DictRow], payout_id: str) -> int:
    row = sql.execute(
        "SELECT count(*) AS n FROM procrastinate_jobs WHERE args ->> 'payout_id' = %s",
        (payout_id,),
    ).fetchone()
    assert row is not None
    return int(row["n"])


def test_a_request_awaits_approval_and_replays(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """POST /v1/admin/payouts answers 201 pending_approval (kind manual, no job); the same key
    and body answer 200 with the same payout; another body 422 idempotency_key_reused."""
    register(api, PARK)
    r = ask(api)
    assert 201 == r.status_code, r.text
    body = r.json()
    assert ("manual", "pending_approval", "250.00", "admin-1") == (
        body["kind"],
        body["status"],
        body["requested_amount"],
        body["requested_by"],
    )
    assert {
        "reason": "goodwill #17",
        "approved_by": None,
        "approved_at": None,
        "denied_by": None,
        "denied_reason": None,
    } == body["approval"]
    assert 0 == jobs_of(sql, body["id"])
    again = ask(api)
    assert (200, body["id"]) == (again.status_code, again.json()["id"])
    assert_error(ask(api, {**BODY, "amount": "251.00"}), 422, "idempotency_key_reused")
    # The key is the admin's, not the park's: another park under it is a reuse too.
    register(api, "other-park")
    assert_error(ask(api, {**BODY, "park_id": "other-park"}), 422, "idempotency_key_reused")


def test_one_request_awaits_approval_per_park(api: TestClient) -> None:
    """A second request for a park with one awaiting approval is 409 approval_pending."""
    register(api, PARK)
    first = ask(api).json()
    body = assert_error(ask(api, key="m2"), 409, "approval_pending")
    assert first["id"] == body["details"]["payout_id"]


def test_the_database_allows_one_awaiting_approval_per_park(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A second pending_approval row for a park, written around the API, is refused by the index."""
    register(api, PARK)
    ask(api)
    with pytest.raises(psycopg.errors.UniqueViolation, match="one_awaiting_approval"):
        sql.execute(
            "INSERT INTO payouts (id, park_id, kind, status, max_amount, requested_amount,"
            " idempotency_key, requested_by, approval_reason, approval_expires_at)"
            " VALUES (%s, %s, 'manual', 'pending_approval', 1000, 5, 'm9', 'admin-9', 'x',"
            " now() + interval '1 day')",
            (uuid.uuid4(), PARK),
        )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({**BODY, "park_id": "nobody"}, 404, "park_not_found"),
        ({**BODY, "amount": "100000.01"}, 422, "amount_above_limit"),
        ({**BODY, "amount": "0.50"}, 422, "amount_below_minimum"),
        ({**BODY, "amount": 250}, 400, "invalid_request"),
        ({**BODY, "reason": ""}, 400, "invalid_request"),
        ({"park_id": PARK, "amount": "5.00"}, 400, "invalid_request"),
        ({**BODY, "park_id": "bad id"}, 400, "invalid_request"),
        ({**BODY, "extra": 1}, 400, "invalid_request"),
    ],
)
def test_a_bad_request_is_refused_and_audited(
    api: TestClient, sql: psycopg.Connection[DictRow], body: dict[str, Any], status: int, code: str
) -> None:
    """Unknown park, amount out of limits and malformed bodies are refused with their code
    and written to the audit log under the acting admin."""
    register(api, PARK)
    assert_error(ask(api, body), status, code)
    entries = sql.execute(
        "SELECT actor_type, actor_id, outcome FROM audit_log WHERE action = 'payout.manual.request'"
    ).fetchall()
    assert [("admin", "admin-1", code)] == [
        (e["actor_type"], e["actor_id"], e["outcome"]) for e in entries
    ]
    assert [] == sql.execute("SELECT id FROM payouts").fetchall()


@pytest.mark.parametrize("approver", ["admin-1", "ADMIN-1", "Admin-1"])
def test_nobody_approves_their_own_request(
    api: TestClient, sql: psycopg.Connection[DictRow], approver: str
) -> None:
    """The requester (whatever the case of their id) gets 403 self_approval_forbidden."""
    register(api, PARK)
    payout_id = ask(api).json()["id"]
    assert_error(decide(api, payout_id, "approve", approver), 403, "self_approval_forbidden")
    row = sql.execute("SELECT status FROM payouts WHERE id = %s", (payout_id,)).fetchone()
    assert row is not None and "pending_approval" == row["status"]
    assert ("payout.manual.approve", approver, "self_approval_forbidden") == audit_trail(
        sql, payout_id
    )[-1]


def test_the_database_refuses_self_approval_whatever_the_route(
    api: TestClient, app_db_url: str
) -> None:
    """An UPDATE as the app role that names the requester as approver is refused by the schema."""
    register(api, PARK)
    payout_id = ask(api).json()["id"]
    with (
        psycopg.connect(app_db_url, autocommit=True) as app,
        pytest.raises(psycopg.errors.CheckViolation, match="four_eyes"),
    ):
        app.execute(
            "UPDATE payouts SET status = 'pending', approved_by = 'admin-1', approved_at = now()"
            " WHERE id = %s",
            (payout_id,),
        )


def test_a_second_admin_approves_and_the_job_is_enqueued_with_it(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """Another admin's approval answers 200 pending, its job in the same transaction, audited."""
    register(api, PARK)
    payout_id = ask(api).json()["id"]
    r = decide(api, payout_id, "approve", "admin-2")
    assert 200 == r.status_code, r.text
    body = r.json()
    assert ("pending", "admin-2") == (body["status"], body["approval"]["approved_by"])
    assert body["approval"]["approved_at"] is not None
    assert 1 == jobs_of(sql, payout_id)
    assert [
        ("payout.manual.request", "admin-1", "ok"),
        ("payout.manual.approve", "admin-2", "ok"),
    ] == audit_trail(sql, payout_id)
    again = decide(api, payout_id, "approve", "admin-3")
    assert "pending" == assert_error(again, 409, "payout_not_pending_approval")["details"]["status"]


def test_approval_follows_the_park_rules(api: TestClient, sql: psycopg.Connection[DictRow]) -> None:
    """Approval is refused 403 park_on_hold while on hold and 409 payout_in_progress while
    another payout of the park is in flight; nothing is enqueued."""
    register(api, PARK, hold={"reason": "dispute"})
    payout_id = ask(api).json()["id"]
    assert_error(decide(api, payout_id, "approve", "admin-2"), 403, "park_on_hold")
    register(api, PARK, hold=None)
    sql.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (uuid.uuid4(), PARK),
    )
    assert_error(decide(api, payout_id, "approve", "admin-2"), 409, "payout_in_progress")
    assert 0 == jobs_of(sql, payout_id)


def test_approval_checks_the_amount_limit_in_force(db_url: str) -> None:
    """A request above PAYOUT_MAX_AMOUNT as it stands at approval is 422 amount_above_limit."""
    with app_client(db_url) as api:
        register(api, PARK)
        payout_id = ask(api).json()["id"]
    with app_client(db_url, payout_max_amount=Decimal("100.00")) as api:
        assert_error(decide(api, payout_id, "approve", "admin-2"), 422, "amount_above_limit")


def test_deny_ends_the_request_with_the_reason(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """Deny answers 200 denied with who and why; an event payout.denied is written; later
    decisions are 409 payout_not_pending_approval."""
    register(api, PARK)
    payout_id = ask(api).json()["id"]
    assert_error(decide(api, payout_id, "deny", "admin-2", {}), 400, "invalid_request")
    r = decide(api, payout_id, "deny", "admin-2", {"reason": "duplicate of #16"})
    assert 200 == r.status_code, r.text
    body = r.json()
    assert ("denied", "admin-2", "duplicate of #16") == (
        body["status"],
        body["approval"]["denied_by"],
        body["approval"]["denied_reason"],
    )
    assert body["completed_at"] is not None
    assert_error(decide(api, payout_id, "approve", "admin-3"), 409, "payout_not_pending_approval")
    types = [
        r["type"]
        for r in sql.execute(
            "SELECT type FROM events WHERE payout_id = %s ORDER BY seq", (payout_id,)
        ).fetchall()
    ]
    assert ["payout.created", "payout.denied"] == types
    # A new request for the park may follow.
    assert 201 == ask(api, key="m2").status_code


def test_a_request_not_approved_in_time_expires(
    db_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """Past MANUAL_PAYOUT_APPROVAL_HOURS (the database's clock) an approval is refused and the
    payout is expired, with its event and a system audit entry."""
    with app_client(db_url, manual_payout_approval_window=timedelta(0)) as api:
        register(api, PARK)
        payout_id = ask(api).json()["id"]
        body = assert_error(
            decide(api, payout_id, "approve", "admin-2"), 409, "payout_not_pending_approval"
        )
        assert {"status": "expired"} == body["details"]
        shown = api.get(f"/v1/admin/payouts?park_id={PARK}", headers=admin_headers()).json()
    assert ["expired"] == [p["status"] for p in shown["payouts"]]
    assert ("payout.manual.expire", "approval-expiry", "ok") == audit_trail(sql, payout_id)[1]
    event = sql.execute(
        "SELECT type FROM events WHERE payout_id = %s ORDER BY seq DESC LIMIT 1", (payout_id,)
    ).fetchone()
    assert event is not None and "payout.expired" == event["type"]


async def test_the_sweep_expires_overdue_requests_only(conn: db.Conn, db_url: str) -> None:
    """expire_due expires requests whose deadline passed and leaves the others awaiting."""
    await conn.execute("INSERT INTO parks (park_id) VALUES ('a'), ('b')")
    for park, deadline in (("a", "now() - interval '1 second'"), ("b", "now() + interval '1 day'")):
        await conn.execute(
            "INSERT INTO payouts (id, park_id, kind, status, max_amount, requested_amount,"
            " idempotency_key, requested_by, approval_reason, approval_expires_at)"
            f" VALUES (gen_random_uuid(), '{park}', 'manual', 'pending_approval', 1000, 5,"
            f" 'key-{park}', 'admin-1', 'x', {deadline})"
        )
    assert 1 == await manual.expire_due(conn)
    rows = await db.fetch_all(conn, "SELECT park_id, status FROM payouts ORDER BY park_id")
    assert [("a", "expired"), ("b", "pending_approval")] == [
        (r["park_id"], r["status"]) for r in rows
    ]


def test_the_database_refuses_an_early_expiry_and_a_late_approval(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """The trigger expires only past the deadline and approves only before it (database clock)."""
    register(api, PARK)
    payout_id = ask(api).json()["id"]
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="may still be approved"):
        sql.execute(
            "UPDATE payouts SET status = 'expired', completed_at = now() WHERE id = %s",
            (payout_id,),
        )


async def test_an_approved_manual_payout_orders_exactly_its_amount(
    api: TestClient, deps: Deps, billing_url: str
) -> None:
    """The job orders the approved amount, not min(available, ...), and no fee."""
    register(api, PARK, instant_fee={"percent": "1.00", "fixed": "0.00"})
    set_balance(billing_url, PARK, "1000.00")
    payout_id = ask(api).json()["id"]
    decide(api, payout_id, "approve", "admin-2")
    assert Status.SUCCEEDED == await execute_payout(deps, uuid.UUID(payout_id))
    assert [(payout_id, "250.00", None)] == [
        (t["idempotency_key"], t["amount"], t.get("fee")) for t in transfers(billing_url)
    ]


async def test_a_manual_payout_above_the_balance_is_refused_by_billing(
    api: TestClient, deps: Deps, billing_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """With less on the balance, Billing refuses the exact amount: failed insufficient_funds,
    no follow-up, nothing paid."""
    register(api, PARK)
    set_balance(billing_url, PARK, "100.00")
    payout_id = ask(api).json()["id"]
    decide(api, payout_id, "approve", "admin-2")
    assert Status.FAILED == await execute_payout(deps, uuid.UUID(payout_id))
    row = sql.execute(
        "SELECT failure_code, amount FROM payouts WHERE id = %s", (payout_id,)
    ).fetchone()
    assert row is not None
    assert ("insufficient_funds", Decimal("250.00")) == (row["failure_code"], row["amount"])
    assert [] == transfers(billing_url)
    assert 1 == len(sql.execute("SELECT id FROM payouts").fetchall())


def test_pending_approval_starts_no_cooldown_and_is_not_in_flight(api: TestClient) -> None:
    """A request awaiting approval blocks no press: not in flight, no cooldown."""
    register(api, PARK)
    ask(api)
    shown = api.get("/v1/payouts/instant/availability", headers=park_headers(PARK)).json()
    assert (True, None) == (shown["available"], shown["reason"])


async def test_fifty_concurrent_approvals_have_one_winner(
    api: TestClient, app_db_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """Fifty admins approving one request at once: exactly one approval, one job, one entry."""
    register(api, PARK)
    payout_id = uuid.UUID(ask(api).json()["id"])
    settings = make_settings(app_db_url)
    connections = [await db.connect(app_db_url, name="race") for _ in range(50)]
    start = asyncio.Event()

    async def approve(i: int, conn: db.Conn) -> str:
        await start.wait()
        try:
            await manual.approve(
                conn,
                settings,
                manual.Decision(payout_id=payout_id, user_id=f"admin-{i + 2}", request_id=f"r{i}"),
            )
        except Refused as refusal:
            return refusal.code
        return "ok"

    try:
        tasks = [asyncio.create_task(approve(i, c)) for i, c in enumerate(connections)]
        start.set()
        outcomes = await asyncio.gather(*tasks)
    finally:
        for c in connections:
            await c.close()
    assert (1, 49) == (outcomes.count("ok"), outcomes.count("payout_not_pending_approval"))
    assert 1 == jobs_of(sql, str(payout_id))
    approvals = [e for e in audit_trail(sql, str(payout_id)) if e[0] == "payout.manual.approve"]
    assert 1 == sum(1 for e in approvals if e[2] == "ok")


def test_the_admin_list_filters_and_pages(api: TestClient) -> None:
    """GET /v1/admin/payouts lists every park's payouts newest first, filtered by park, status
    and kind, paged by cursor; a bad filter is a 400."""
    for park in ("pa", "pb", "pc"):
        register(api, park)
        ask(api, {**BODY, "park_id": park}, key=f"key-{park}")
    headers = admin_headers()
    everything = api.get("/v1/admin/payouts?kind=manual&status=pending_approval", headers=headers)
    assert 200 == everything.status_code, everything.text
    assert ["pc", "pb", "pa"] == [p["park_id"] for p in everything.json()["payouts"]]
    one = api.get("/v1/admin/payouts?park_id=pb", headers=headers).json()
    assert ["pb"] == [p["park_id"] for p in one["payouts"]]
    first = api.get("/v1/admin/payouts?limit=2", headers=headers).json()
    assert 2 == len(first["payouts"]) and first["next_cursor"]
    rest = api.get(f"/v1/admin/payouts?limit=2&cursor={first['next_cursor']}", headers=headers)
    assert ["pa"] == [p["park_id"] for p in rest.json()["payouts"]]
    assert [] == api.get("/v1/admin/payouts?kind=instant", headers=headers).json()["payouts"]
    for bad in ("status=done", "kind=gift", "since=yesterday", "limit=0", "cursor=x"):
        assert_error(api.get(f"/v1/admin/payouts?{bad}", headers=headers), 400, "invalid_request")


def test_manual_endpoints_need_an_admin_token(api: TestClient) -> None:
    """An API token on the manual endpoints is 403 forbidden; none is 401."""
    register(api, PARK)
    r = api.post("/v1/admin/payouts", json=BODY, headers={**park_headers(PARK), "X-User-Id": "u"})
    assert_error(r, 403, "forbidden")
    assert_error(api.get("/v1/admin/payouts"), 401, "unauthorized")
    unknown = decide(api, str(uuid.uuid4()), "approve", "admin-2")
    assert_error(unknown, 404, "payout_not_found")
    assert_error(
        decide(api, "not-a-uuid", "deny", "admin-2", {"reason": "x"}), 404, "payout_not_found"
    )
