"""SPEC section 2, "Decided under the park's lock" (issue 15, break 2): every path that
creates a payout checks the park's switches and hold under the park's row lock, in the
transaction that inserts it, so a hold or a switch-off that committed first always wins.

A second session (psycopg, as a DBA's psql would) changes the park and keeps its row lock
while the path runs into it; the test commits that change once the path is seen waiting for
the lock, then looks at what the path created.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import psycopg
import pytest

from service.core import db
from service.payouts import instant, periodic
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.conftest import make_settings
from tests.helpers.api import lock_waiters, set_balance

PARK = "lock-park"
T = TypeVar("T")

# What an admin's change commits (PUT /v1/parks/{id} writes the same columns).
HOLD = "hold_reason = 'dispute #42', hold_since = now(), hold_by = 'admin-1'"
PERIODIC_OFF = "periodic_payouts_enabled = false"
INSTANT_OFF = "instant_payouts_enabled = false"


async def insert_payout(conn: db.Conn, kind: str) -> uuid.UUID:
    """A pending payout of PARK inserted directly, as a path that checks nothing would."""
    payout_id = uuid.uuid4()
    instant_only = ("k-1", "user-1") if kind == "instant" else (None, None)
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, idempotency_key, requested_by) "
        "VALUES (%s, %s, %s, 1000, %s, %s)",
        (payout_id, PARK, kind, *instant_only),
    )
    return payout_id


async def register(conn: db.Conn) -> None:
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled, registered_at) "
        "VALUES (%s, true, now() - interval '30 days')",
        (PARK,),
    )


async def run_into_the_lock(
    conn: db.Conn, admin: psycopg.Connection[Any], change: str, path: Awaitable[T]
) -> T:
    """Change the park in `admin` (holding its row), start `path`, commit the change once
    `path` waits for the lock, and return what `path` returned."""
    admin.execute(f"UPDATE parks SET {change} WHERE park_id = %s", (PARK,))
    task = asyncio.ensure_future(path)
    async with asyncio.timeout(20):
        while await lock_waiters(conn) == 0:
            assert not task.done(), "the path finished without waiting for the park's lock"
            await asyncio.sleep(0.02)
    admin.commit()
    async with asyncio.timeout(20):
        return await task


@pytest.mark.parametrize("change", [HOLD, PERIODIC_OFF], ids=["hold", "periodic switched off"])
async def test_a_change_committed_while_the_follow_up_waits_stops_it(
    deps: Deps,
    conn: db.Conn,
    billing_url: str,
    admin: psycopg.Connection[Any],
    change: str,
) -> None:
    """A periodic payout refused for stale figures is followed by no new payout when a hold
    (or periodic switch-off) commits while the follow-up is being created."""
    await register(conn)
    set_balance(billing_url, PARK, "40.00")
    refused = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
        "VALUES (%s, %s, 'periodic', 1000, 90.00, 'RUB')",
        (refused, PARK),
    )

    status = await run_into_the_lock(conn, admin, change, execute_payout(deps, refused))

    assert Status.FAILED == status
    rows = await db.fetch_all(
        conn, "SELECT id, status, failure_code FROM payouts WHERE park_id = %(p)s", p=PARK
    )
    assert [(refused, "failed", "insufficient_funds")] == [
        (r["id"], r["status"], r["failure_code"]) for r in rows
    ]


@pytest.mark.parametrize("change", [HOLD, PERIODIC_OFF], ids=["hold", "periodic switched off"])
async def test_a_change_committed_after_the_scan_read_its_candidates_wins(
    deps: Deps, conn: db.Conn, admin: psycopg.Connection[Any], change: str
) -> None:
    """The scan's batch, read as due before a hold (or switch-off) committed, creates nothing
    for that park: the batch is decided again under the park locks."""
    await register(conn)
    candidates = await db.fetch_all(
        conn, periodic.Q["due_candidates"], period=deps.settings.payout_period, limit=10
    )
    assert [PARK] == [r["park_id"] for r in candidates]
    admin.execute(f"UPDATE parks SET {change} WHERE park_id = %s", (PARK,))
    admin.commit()

    assert 0 == await periodic.create_batch(conn, deps, [PARK], {})
    assert [] == await db.fetch_all(conn, "SELECT id FROM payouts")


async def test_a_press_committed_after_the_scan_read_its_candidates_leaves_the_park_alone(
    deps: Deps, conn: db.Conn, db_url: str
) -> None:
    """A park whose instant payout committed between the scan's candidate read and its batch
    gets no periodic payout, job, audit entry or attempt clock from the batch: the insert's
    in-flight index decides, and the batch counts only what it created."""
    await register(conn)
    candidates = await db.fetch_all(
        conn, periodic.Q["due_candidates"], period=deps.settings.payout_period, limit=10
    )
    assert [PARK] == [r["park_id"] for r in candidates]
    req = instant.InstantRequest(PARK, "user-1", "press-1", "req-1", None)
    async with await db.connect(db_url, name="press") as other:
        pressed = await instant.request_instant(other, make_settings(db_url), req)

    assert 0 == await periodic.create_batch(conn, deps, [PARK], {})
    payouts = await db.fetch_all(conn, "SELECT id, kind FROM payouts")
    assert [(pressed.payout.id, "instant")] == [(r["id"], r["kind"]) for r in payouts]
    jobs = await db.fetch_all(conn, "SELECT id FROM procrastinate_jobs")
    assert [pressed.payout.job_id] == [r["id"] for r in jobs]
    created = await db.fetch_all(
        conn, "SELECT id FROM audit_log WHERE action = 'payout.periodic.create'"
    )
    assert [] == created
    park = await db.fetch_one(
        conn, "SELECT last_periodic_attempt_at FROM parks WHERE park_id = %(p)s", p=PARK
    )
    assert park is not None
    assert None is park["last_periodic_attempt_at"]


@pytest.mark.parametrize(
    ("change", "code"),
    [(HOLD, "park_on_hold"), (INSTANT_OFF, "instant_payouts_disabled")],
    ids=["hold", "instant switched off"],
)
async def test_a_change_committed_while_a_press_waits_refuses_it(
    db_url: str, conn: db.Conn, admin: psycopg.Connection[Any], change: str, code: str
) -> None:
    """A press that waits for the park's lock behind a hold (or switch-off) is refused with
    that change's code once it commits, and creates no payout."""
    await register(conn)
    req = instant.InstantRequest(PARK, "user-1", "press-1", "req-1", None)
    settings = make_settings(db_url)

    async def press() -> str:
        async with await db.connect(db_url, name="press") as c:
            try:
                await instant.request_instant(c, settings, req)
            except instant.Refused as refusal:
                return refusal.code
        return "accepted"

    assert code == await run_into_the_lock(conn, admin, change, press())
    assert [] == await db.fetch_all(conn, "SELECT id FROM payouts")


@pytest.mark.parametrize(
    ("kind", "change"),
    [("periodic", HOLD), ("instant", HOLD), ("periodic", PERIODIC_OFF), ("instant", INSTANT_OFF)],
    ids=["periodic on hold", "instant on hold", "periodic switched off", "instant switched off"],
)
async def test_the_database_refuses_a_payout_created_off_the_park_lock(
    db_url: str, conn: db.Conn, admin: psycopg.Connection[Any], kind: str, change: str
) -> None:
    """A path that inserts a payout without locking and checking the park (a bug, a script)
    waits for the park's lock and is refused once the hold or switch-off commits."""
    await register(conn)

    async def careless_insert() -> str:
        try:
            await insert_payout(conn, kind)
        except psycopg.errors.CheckViolation as exc:
            return str(exc.diag.constraint_name)
        return "inserted"

    async with await db.connect(db_url, name="watch") as watcher:
        outcome = await run_into_the_lock(watcher, admin, change, careless_insert())

    assert "payouts_decided_under_park_lock" == outcome
    assert [] == await db.fetch_all(conn, "SELECT id FROM payouts")


async def test_a_park_in_good_standing_takes_payouts_of_every_kind(conn: db.Conn) -> None:
    """The database's check lets through payouts of a park that allows them."""
    await register(conn)
    for kind in ("periodic", "instant"):
        payout_id = await insert_payout(conn, kind)
        await conn.execute(
            "UPDATE payouts SET status = 'cancelled', completed_at = now() WHERE id = %s",
            (payout_id,),
        )
    assert 2 == len(await db.fetch_all(conn, "SELECT id FROM payouts"))
