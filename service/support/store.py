"""What support reads about a park or a payout (the console, SPEC section 9): park
search, a park's merged timeline, a payout's audit trail and events.

SQL for reads across the payouts, events and audit_log families, in sql/support.sql;
takes the caller's connection, never opens one.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from service.audit.store import Logged
from service.core import db
from service.core.invariant import InvariantError
from service.payouts.store import Record

Q = db.queries("support")

# How the timeline names where a row came from (and orders rows of one instant).
SOURCES = {3: "payout", 2: "event", 1: "audit"}


@dataclasses.dataclass(frozen=True, order=True)
class TimelinePosition:
    """A timeline page starts after this (at, source, key); None starts at the newest."""

    at: datetime
    source: int
    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class ParkFound:
    """A park that park search found, with what the results list shows of it."""

    park_id: str
    instant_payouts_enabled: bool
    periodic_payouts_enabled: bool
    hold_reason: str | None
    registered_at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One row of a park's timeline: a payout created, an event, or an audit entry
    (`source`); each fills the columns it has and leaves the others None."""

    at: datetime
    source: int
    key: str
    payout_id: UUID | None
    kind: str | None
    status: str | None
    amount: Decimal | None
    currency: str | None
    type: str | None
    actor_type: str | None
    actor_id: str | None
    action: str | None
    outcome: str | None
    details: dict[str, Any] | None


@dataclasses.dataclass(frozen=True, slots=True)
class PayoutEvent:
    """One event of a payout's, as its console page lists it."""

    seq: int
    type: str
    created_at: datetime


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching ids that start with `prefix` (its `_` taken literally)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def search_parks(conn: db.Conn, prefix: str, *, limit: int) -> list[ParkFound]:
    return await db.fetch_all_as(
        conn, ParkFound, Q["park_search"], pattern=like_prefix(prefix), limit=limit
    )


async def in_flight(conn: db.Conn, park_id: str) -> Record | None:
    return await db.fetch_as(conn, Record, Q["in_flight"], park_id=park_id)


async def timeline(
    conn: db.Conn, park_id: str, *, limit: int, after: TimelinePosition | None
) -> list[TimelineEntry]:
    """Newest first: the park's payouts, events and audit entries after `after`."""
    return await db.fetch_all_as(
        conn,
        TimelineEntry,
        Q["timeline"],
        park_id=park_id,
        limit=limit,
        at=after.at if after else "infinity",
        source=after.source if after else 4,
        key=after.key if after else "",
    )


async def payout_audit(conn: db.Conn, park_id: str, payout_id: UUID, *, limit: int) -> list[Logged]:
    return await db.fetch_all_as(
        conn, Logged, Q["payout_audit"], park_id=park_id, payout_id=payout_id, limit=limit
    )


async def payout_events(conn: db.Conn, park_id: str, payout_id: UUID) -> list[PayoutEvent]:
    return await db.fetch_all_as(
        conn, PayoutEvent, Q["payout_events"], park_id=park_id, payout_id=payout_id
    )


async def approvals_queue(conn: db.Conn, *, limit: int) -> list[Record]:
    """Manual payouts waiting for approval, oldest first."""
    return await db.fetch_all_as(conn, Record, Q["approvals_queue"], limit=limit)


async def signed_out(
    conn: db.Conn, *, action: str, user_id: str, issued_at: datetime, session: str
) -> bool:
    """Whether the console session `session` of `user_id` has been signed out."""
    answer = await db.fetch_value(
        conn,
        bool,
        Q["signed_out"],
        action=action,
        user_id=user_id,
        issued_at=issued_at,
        session=session,
    )
    return bool(answer)


async def lock_sign_ins(conn: db.Conn, *, ip: str) -> None:
    """Serialise sign-ins from `ip` until the transaction ends (the count stays exact)."""
    await conn.execute(Q["lock_sign_ins"], {"ip": ip})


async def failed_sign_ins(conn: db.Conn, *, action: str, ip: str, minutes: int) -> int:
    """Refused sign-ins from `ip` in the last `minutes`, by the database's clock."""
    return (
        await db.fetch_value(conn, int, Q["failed_sign_ins"], action=action, ip=ip, minutes=minutes)
        or 0
    )


async def now(conn: db.Conn) -> datetime:
    clock = await db.fetch_value(conn, datetime, Q["now"])
    if clock is None:
        raise InvariantError("SELECT now() answered no row")
    return clock
