"""The database itself refuses what SPEC section 2 forbids, whatever the Python code does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import errors

from service.core import db

PARK = "park-1"


@pytest.fixture
async def park(conn: db.Conn) -> str:
    # Instant payouts on: the database refuses an instant payout of a park that has them off.
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled) VALUES (%s, true)", (PARK,)
    )
    return PARK


async def insert_payout(conn: db.Conn, park_id: str = PARK, **columns: Any) -> uuid.UUID:
    """One payout row; by default a pending periodic payout with a 1000.00 limit."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "park_id": park_id,
        "kind": "periodic",
        "max_amount": "1000.00",
        **columns,
    }
    if values["kind"] == "instant":
        values.setdefault("idempotency_key", f"key-{uuid.uuid4()}")
        values.setdefault("requested_by", "user-1")
    names = ", ".join(values)
    placeholders = ", ".join(f"%({n})s" for n in values)
    await conn.execute(
        f"INSERT INTO payouts ({names}) VALUES ({placeholders})",
        values,
    )
    return values["id"]  # type: ignore[no-any-return]


async def status_of(conn: db.Conn, payout_id: uuid.UUID) -> str:
    cur = await conn.execute("SELECT status FROM payouts WHERE id = %s", (payout_id,))
    row = await cur.fetchone()
    assert row is not None
    return str(row["status"])


async def to_processing(conn: db.Conn, payout_id: uuid.UUID) -> None:
    await conn.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    assert "processing" == await status_of(conn, payout_id)


async def to_failed(conn: db.Conn, payout_id: uuid.UUID) -> None:
    await to_processing(conn, payout_id)
    await conn.execute(
        "UPDATE payouts SET status = 'failed', failure_code = 'insufficient_funds', "
        "completed_at = now() WHERE id = %s",
        (payout_id,),
    )
    assert "failed" == await status_of(conn, payout_id)


async def record_order(conn: db.Conn, payout_id: uuid.UUID) -> None:
    """What the worker records before calling Billing: amount, body, ordered_at."""
    await conn.execute(
        "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', "
        "billing_params = '{}', ordered_at = now() WHERE id = %s",
        (payout_id,),
    )


async def to_succeeded(conn: db.Conn, payout_id: uuid.UUID) -> None:
    await to_processing(conn, payout_id)
    await record_order(conn, payout_id)
    await conn.execute(
        "UPDATE payouts SET status = 'succeeded', billing_payout_id = 'b-1', "
        "completed_at = now() WHERE id = %s",
        (payout_id,),
    )
    assert "succeeded" == await status_of(conn, payout_id)


async def count(conn: db.Conn, query: str, *params: object) -> int:
    cur = await conn.execute(query, params or None)
    row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


# --- payouts ----------------------------------------------------------------------


async def test_second_in_flight_payout_for_a_park_is_refused(conn: db.Conn, park: str) -> None:
    """A park with a pending payout cannot get a second pending or processing one."""
    first = await insert_payout(conn, kind="instant")
    with pytest.raises(errors.UniqueViolation):
        await insert_payout(conn)
    await to_processing(conn, first)
    with pytest.raises(errors.UniqueViolation):
        await insert_payout(conn, kind="instant")
    assert 1 == await count(conn, "SELECT count(*) AS n FROM payouts WHERE park_id = %s", park)


async def test_failed_payout_frees_the_in_flight_slot(conn: db.Conn, park: str) -> None:
    """Once the in-flight payout has failed, a new pending payout for the park is accepted."""
    first = await insert_payout(conn)
    await to_failed(conn, first)
    second = await insert_payout(conn)
    assert "pending" == await status_of(conn, second)


async def test_idempotency_key_is_unique_per_park(conn: db.Conn, park: str) -> None:
    """The same (park, Idempotency-Key) cannot be recorded twice, even after the first is final."""
    first = await insert_payout(conn, kind="instant", idempotency_key="press-1")
    await to_failed(conn, first)
    with pytest.raises(errors.UniqueViolation):
        await insert_payout(conn, kind="instant", idempotency_key="press-1")


async def test_same_idempotency_key_in_another_park_is_allowed(conn: db.Conn, park: str) -> None:
    """Idempotency keys are scoped to the park: another park may use the same key."""
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled) VALUES ('park-2', true)"
    )
    await insert_payout(conn, kind="instant", idempotency_key="press-1")
    other = await insert_payout(conn, "park-2", kind="instant", idempotency_key="press-1")
    assert "pending" == await status_of(conn, other)


@pytest.mark.parametrize(
    "columns",
    [
        # above the payout limit in force
        {"max_amount": "100.00", "available": "5000.00", "amount": "100.01"},
        # above the balance Billing reported
        {"max_amount": "1000.00", "available": "50.00", "amount": "50.01"},
        # above what the user asked for
        {
            "kind": "instant",
            "max_amount": "1000.00",
            "available": "500.00",
            "requested_amount": "10.00",
            "amount": "10.01",
        },
        # nothing to pay is not a payout amount
        {"max_amount": "1000.00", "available": "500.00", "amount": "0.00"},
    ],
    ids=["above-max", "above-available", "above-requested", "zero"],
)
async def test_amount_outside_limits_is_refused(
    conn: db.Conn, park: str, columns: dict[str, str]
) -> None:
    """An amount above the limit, the reported balance or the request is a check violation."""
    with pytest.raises(errors.CheckViolation):
        await insert_payout(conn, **columns)


async def test_amount_without_a_reported_balance_is_refused(conn: db.Conn, park: str) -> None:
    """An amount can only be recorded together with the balance it was checked against."""
    with pytest.raises(errors.CheckViolation):
        await insert_payout(conn, amount="100.00")


async def test_succeeded_without_billing_payout_id_is_refused(conn: db.Conn, park: str) -> None:
    """A payout cannot become succeeded without the id of Billing's payout."""
    payout = await insert_payout(conn)
    await to_processing(conn, payout)
    await record_order(conn, payout)
    with pytest.raises(errors.CheckViolation):
        await conn.execute(
            "UPDATE payouts SET status = 'succeeded', completed_at = now() WHERE id = %s",
            (payout,),
        )
    assert "processing" == await status_of(conn, payout)


@pytest.mark.parametrize(
    "columns", [{"status": "done"}, {"kind": "weekly"}], ids=["status", "kind"]
)
async def test_unknown_status_or_kind_is_refused(
    conn: db.Conn, park: str, columns: dict[str, str]
) -> None:
    """Only the statuses and kinds of the spec can be stored."""
    with pytest.raises(errors.CheckViolation):
        await insert_payout(conn, **columns)


async def test_pending_cannot_jump_to_succeeded(conn: db.Conn, park: str) -> None:
    """pending -> succeeded skips processing and is refused, even with every column filled."""
    payout = await insert_payout(conn)
    with pytest.raises(errors.IntegrityConstraintViolation, match="not a valid transition"):
        await conn.execute(
            "UPDATE payouts SET status = 'succeeded', available = 500, amount = 100, "
            "currency = 'RUB', billing_payout_id = 'b-1', completed_at = now() WHERE id = %s",
            (payout,),
        )
    assert "pending" == await status_of(conn, payout)


async def test_payout_is_born_pending(conn: db.Conn, park: str) -> None:
    """A payout cannot be inserted already succeeded: every payout starts its life pending."""
    with pytest.raises(psycopg.IntegrityError):
        await insert_payout(
            conn,
            status="succeeded",
            available="500.00",
            amount="100.00",
            currency="RUB",
            billing_payout_id="b-1",
            completed_at=datetime.now(UTC),
        )
    assert 0 == await count(conn, "SELECT count(*) AS n FROM payouts")


@pytest.mark.parametrize("final", ["succeeded", "failed"])
@pytest.mark.parametrize(
    "change",
    [
        "status = 'processing', completed_at = NULL",
        "failure_message = 'edited'",
        "attempts = attempts + 1",
        "status = status",
    ],
)
async def test_final_payout_is_frozen(conn: db.Conn, park: str, final: str, change: str) -> None:
    """Any UPDATE of a succeeded or failed payout is refused, even a no-op one."""
    payout = await insert_payout(conn)
    await (to_succeeded if final == "succeeded" else to_failed)(conn, payout)
    with pytest.raises(errors.IntegrityConstraintViolation, match="is final"):
        await conn.execute(
            f"UPDATE payouts SET {change} WHERE id = %s",
            (payout,),
        )
    assert final == await status_of(conn, payout)


@pytest.mark.parametrize("final", [False, True], ids=["pending", "final"])
async def test_payout_cannot_be_deleted(conn: db.Conn, park: str, final: bool) -> None:
    """DELETE of a payout is refused, whatever its status."""
    payout = await insert_payout(conn)
    if final:
        await to_succeeded(conn, payout)
    with pytest.raises(errors.IntegrityConstraintViolation, match="DELETE is refused"):
        await conn.execute("DELETE FROM payouts WHERE id = %s", (payout,))
    assert 1 == await count(conn, "SELECT count(*) AS n FROM payouts WHERE id = %s", payout)


# --- parks ------------------------------------------------------------------------


@pytest.mark.parametrize("park_id", ["park one", "", "p" * 65, "park/1", "park\n"])
async def test_malformed_park_id_is_refused(conn: db.Conn, park_id: str) -> None:
    """A park id outside 1-64 letters, digits, '_' and '-' cannot be stored."""
    with pytest.raises(errors.CheckViolation):
        await conn.execute("INSERT INTO parks (park_id) VALUES (%s)", (park_id,))


# --- audit log --------------------------------------------------------------------


def current_partition() -> str:
    return datetime.now(UTC).strftime("audit_log_%Y_%m")


@pytest.fixture
async def audit_entry(conn: db.Conn) -> int:
    cur = await conn.execute(
        "INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome) "
        "VALUES ('user', 'user-1', 'park-1', 'payout.instant.request', 'ok') RETURNING id"
    )
    row = await cur.fetchone()
    assert row is not None
    # The row landed in this month's partition, which the tests below also address directly.
    n = await count(conn, f"SELECT count(*) AS n FROM {current_partition()}")
    assert 1 == n
    return int(row["id"])


@pytest.mark.parametrize("table", ["audit_log", "partition"])
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {table} SET outcome = 'tampered'",
        "UPDATE {table} SET details = '{{\"x\": 1}}'::jsonb WHERE id = %s",
        "DELETE FROM {table}",
        "DELETE FROM {table} WHERE id = %s",
        "TRUNCATE {table}",
    ],
)
async def test_audit_log_is_append_only(
    conn: db.Conn, audit_entry: int, table: str, statement: str
) -> None:
    """UPDATE, DELETE and TRUNCATE on audit_log are refused, via the parent or a partition."""
    target = current_partition() if table == "partition" else "audit_log"
    sql = statement.format(table=target)
    params = (audit_entry,) if "%s" in sql else None
    with pytest.raises(psycopg.Error) as info:
        await conn.execute(sql, params)
    assert isinstance(info.value, errors.InsufficientPrivilege), repr(info.value)
    assert "append-only" in str(info.value)
    n = await count(
        conn, "SELECT count(*) AS n FROM audit_log WHERE id = %s AND outcome = 'ok'", audit_entry
    )
    assert 1 == n


async def test_every_audit_partition_refuses_truncate(conn: db.Conn) -> None:
    """Each monthly partition, future ones included, carries the TRUNCATE guard."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'audit_log'::regclass ORDER BY c.relname"
    )
    partitions = [r["relname"] for r in await cur.fetchall()]
    assert len(partitions) >= 4
    for name in partitions:
        with pytest.raises(errors.InsufficientPrivilege):
            await conn.execute(f"TRUNCATE {name}")
