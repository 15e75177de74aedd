"""SQL for the payouts table family. Takes the caller's connection, never opens one."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from service import db
from service.domain import Status

Q = db.queries("payouts")
Row = dict[str, Any]


async def get(conn: db.Conn, payout_id: UUID, *, park_id: str | None = None) -> Row | None:
    if park_id is None:
        return await db.fetch_one(conn, Q["get"], id=payout_id)
    return await db.fetch_one(conn, Q["get_for_park"], id=payout_id, park_id=park_id)


async def page(
    conn: db.Conn, park_id: str, *, limit: int, after: tuple[datetime, UUID] | None
) -> list[Row]:
    return await db.fetch_all(
        conn,
        Q["list_page"],
        park_id=park_id,
        limit=limit,
        after_created_at=after[0] if after else None,
        after_id=after[1] if after else None,
    )


async def park_state(conn: db.Conn, park_id: str, idempotency_key: str | None) -> Row | None:
    """What the instant rules need about a park (see the park_state query); None if unknown."""
    return await db.fetch_one(
        conn, Q["park_state"], park_id=park_id, idempotency_key=idempotency_key
    )


async def take(conn: db.Conn, payout_id: UUID) -> Row | None:
    """pending/processing -> processing; None when the payout is final or missing."""
    return await db.fetch_one(conn, Q["take"], id=payout_id)


async def change(conn: db.Conn, name: str, payout_id: UUID, **params: Any) -> Row | None:
    """A conditional state change (record_order, clear_order); None if it no longer applies."""
    query = {"record_order": Q["record_order"], "clear_order": Q["clear_order"], "get": Q["get"]}
    return await db.fetch_one(conn, query[name], id=payout_id, **params)


async def finish(
    conn: db.Conn,
    payout_id: UUID,
    *,
    status: Status,
    outcome: str,
    details: dict[str, Any],
    billing_payout_id: str | None = None,
    failure_code: str | None = None,
    failure_message: str | None = None,
    available: Decimal | None = None,
    currency: str | None = None,
) -> Row | None:
    """processing -> final, with the park's clock and the audit entry; None if already final."""
    return await db.fetch_one(
        conn,
        Q["finish"],
        id=payout_id,
        status=str(status),
        outcome=outcome,
        details=details,
        billing_payout_id=billing_payout_id,
        failure_code=failure_code,
        failure_message=failure_message,
        available=available,
        currency=currency,
    )


async def set_job(conn: db.Conn, payout_id: UUID, job_id: int) -> None:
    await db.execute(conn, Q["set_job"], id=payout_id, job_id=job_id)


async def note_transient(conn: db.Conn, payout_id: UUID, message: str) -> None:
    await db.execute(conn, Q["note_transient"], id=payout_id, failure_message=message[:500])


async def instant_parks(conn: db.Conn) -> Row:
    row = await db.fetch_one(conn, Q["instant_parks"])
    assert row is not None
    return row


async def oldest_in_flight_seconds(conn: db.Conn) -> float:
    row = await db.fetch_one(conn, Q["oldest_in_flight_seconds"])
    return float(row["seconds"]) if row else 0.0


async def orphans(conn: db.Conn, *, min_age_seconds: float, limit: int) -> list[Row]:
    return await db.fetch_all(conn, Q["orphans"], min_age_seconds=min_age_seconds, limit=limit)
