"""SQL for the payouts table family. Takes the caller's connection, never opens one."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg

from service.core import db, queue
from service.core.invariant import InvariantError
from service.parks import fees
from service.parks.fees import Fee
from service.payouts.model import Phase, Status, phase_of

Q = db.queries("payouts")
Row = dict[str, Any]

# Migration 0020: one Billing payout settles at most one payout of ours.
ONE_PER_BILLING_PAYOUT = "payouts_one_per_billing_payout"


class BillingPayoutTaken(Exception):
    """The Billing payout id already settles another payout of ours: not this one's answer."""

    def __init__(self, billing_payout_id: str, holder: UUID | None) -> None:
        super().__init__(f"Billing payout {billing_payout_id} already settles payout {holder}")
        self.billing_payout_id = billing_payout_id
        self.holder = holder


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One whole row of `payouts`: what every reader of a payout gets (the API, the press,
    the worker's run, the console, support)."""

    id: UUID
    park_id: str
    kind: str
    status: str
    idempotency_key: str | None
    request_fingerprint: str | None
    requested_by: str | None
    request_id: str | None
    requested_amount: Decimal | None
    max_amount: Decimal
    min_amount: Decimal | None
    available: Decimal | None
    amount: Decimal | None
    currency: str | None
    billing_params: dict[str, Any] | None
    ordered_at: datetime | None
    billing_payout_id: str | None
    failure_code: str | None
    failure_message: str | None
    attempts: int
    job_id: int | None
    follows: UUID | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    fee_percent: Decimal | None
    fee_fixed: Decimal | None
    fee_amount: Decimal | None
    net_amount: Decimal | None
    return_code: str | None
    returned_at: datetime | None
    # A manual payout's four-eyes record (SPEC section 8); None for the other kinds.
    approval_reason: str | None
    approval_expires_at: datetime | None
    approved_by: str | None
    approved_at: datetime | None
    denied_by: str | None
    denied_reason: str | None

    @property
    def fee(self) -> Fee | None:
        """The park's fee terms when the payout was created (instant only)."""
        return fees.terms(self.fee_percent, self.fee_fixed)

    @property
    def phase(self) -> Phase:
        return phase_of(Status(self.status), self.ordered_at is not None)

    def wire_row(self) -> dict[str, Any]:
        """The columns as wire.payout_json reads them (the shape of the events' snapshot)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True, slots=True)
class ManualDecision(Record):
    """A manual payout locked for its decision, with what deciding it needs."""

    # The park's hold, whether its approval window is over by the statement's clock,
    # and whether another payout of the park is in flight.
    hold_reason: str | None
    approval_time_over: bool
    in_flight: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ParkState:
    """What the instant rules need about one park (the park_state query)."""

    instant_payouts_enabled: bool
    hold_reason: str | None
    instant_fee_percent: Decimal | None
    instant_fee_fixed: Decimal | None
    instant_payouts_until: datetime | None
    subscription_ended: bool
    # The payout made with the request's Idempotency-Key, if any, and its body's hash.
    existing_id: UUID | None
    existing_fingerprint: str | None
    in_flight: bool
    last_counted_instant_at: datetime | None
    db_now: datetime

    @property
    def fee(self) -> Fee | None:
        """The park's instant fee terms, or None when its instant payouts are free."""
        return fees.terms(self.instant_fee_percent, self.instant_fee_fixed)


@dataclasses.dataclass(frozen=True, slots=True)
class Waiting:
    """The approvals queue: its length and its oldest request's age in seconds."""

    waiting: int
    oldest_seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Taken(Record):
    """A payout a run has just taken, with what that run needs besides the row."""

    park_params: dict[str, Any]
    # The database's clock when the payout was taken, and whether the retry
    # window (before any order) was over by it.
    db_now: datetime
    retry_window_over: bool


async def get(conn: db.Conn, payout_id: UUID, *, park_id: str | None = None) -> Record | None:
    """The payout, if it exists (and belongs to `park_id`, when given)."""
    if park_id is None:
        return await db.fetch_as(conn, Record, Q["get"], id=payout_id)
    return await db.fetch_as(conn, Record, Q["get_for_park"], id=payout_id, park_id=park_id)


async def page(
    conn: db.Conn, park_id: str, *, limit: int, after: tuple[datetime, UUID] | None
) -> list[Record]:
    """One park's payouts, newest first, keyset-paged on (created_at, id)."""
    return await db.fetch_all_as(
        conn,
        Record,
        Q["list_page"],
        park_id=park_id,
        limit=limit,
        after_created_at=after[0] if after else None,
        after_id=after[1] if after else None,
    )


async def park_state(conn: db.Conn, park_id: str, idempotency_key: str | None) -> ParkState | None:
    """What the instant rules need about a park (see the park_state query); None if unknown."""
    return await db.fetch_as(
        conn, ParkState, Q["park_state"], park_id=park_id, idempotency_key=idempotency_key
    )


async def take(
    conn: db.Conn, payout_id: UUID, *, retry_window: timedelta, min_amount: Decimal
) -> Taken | None:
    """pending/processing -> processing; None when the payout is final or missing.

    A periodic payout with a balance snapshot comes back ORDERED when it has
    something to pay (see the take query): `min_amount` is PAYOUT_MIN_AMOUNT.
    """
    return await db.fetch_as(
        conn, Taken, Q["take"], id=payout_id, retry_window=retry_window, min_amount=min_amount
    )


async def reload(conn: db.Conn, payout_id: UUID) -> Record:
    row = await db.fetch_as(conn, Record, Q["get"], id=payout_id)
    if row is None:  # payouts are never deleted (the trigger refuses it)
        raise InvariantError("row is not None")
    return row


async def record_order(
    conn: db.Conn,
    payout_id: UUID,
    *,
    available: Decimal,
    amount: Decimal,
    currency: str,
    billing_params: dict[str, Any],
    fee_amount: Decimal | None = None,
    net_amount: Decimal | None = None,
) -> Record | None:
    """Recovery point ORDERED; None if another run recorded an order first."""
    return await db.fetch_as(
        conn,
        Record,
        Q["record_order"],
        id=payout_id,
        available=available,
        amount=amount,
        currency=currency,
        billing_params=billing_params,
        fee_amount=fee_amount,
        net_amount=net_amount,
    )


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
) -> Record | None:
    """processing -> final, with the park's clock and the audit entry; None if already final.

    BillingPayoutTaken if `billing_payout_id` already settles another payout: the one
    statement wrote nothing (a caller's open transaction is aborted by it).
    """
    try:
        return await db.fetch_as(
            conn,
            Record,
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
    except psycopg.errors.UniqueViolation as exc:
        if exc.diag.constraint_name != ONE_PER_BILLING_PAYOUT or billing_payout_id is None:
            raise
        holder = await db.fetch_value(
            conn, UUID, Q["settled_by"], billing_payout_id=billing_payout_id
        )
        raise BillingPayoutTaken(billing_payout_id, holder) from exc


async def follow_up(
    conn: db.Conn,
    refused: Record,
    new_id: UUID,
    *,
    reason: str,
    max_amount: Decimal,
    min_amount: Decimal,
) -> Record | None:
    """A fresh periodic payout following `refused`; None if the park is off schedule."""
    return await db.fetch_as(
        conn,
        Record,
        Q["follow_up"],
        id=new_id,
        follows=refused.id,
        reason=reason,
        max_amount=max_amount,
        min_amount=min_amount,
        **queue.payout_job("periodic"),
    )


async def redrive(conn: db.Conn, payout_id: UUID, kind: str) -> int | None:
    """Give the in-flight payout a new job; its id, or None if the payout is final."""
    row = await db.fetch_one(conn, Q["redrive"], id=payout_id, **queue.payout_job(kind))
    return int(row["job_id"]) if row else None


async def note_transient(conn: db.Conn, payout_id: UUID, message: str) -> None:
    await db.execute(conn, Q["note_transient"], id=payout_id, failure_message=message[:500])


async def instant_parks(conn: db.Conn) -> Row:
    row = await db.fetch_one(conn, Q["instant_parks"])
    if row is None:
        raise InvariantError("row is not None")
    return row


async def in_flight_ages(conn: db.Conn) -> tuple[float, float]:
    """Seconds since the oldest in-flight payout was created, and since the oldest open order."""
    row = await db.fetch_one(conn, Q["oldest_in_flight_seconds"])
    return (float(row["seconds"]), float(row["order_seconds"])) if row else (0.0, 0.0)


async def orphans(conn: db.Conn, *, min_age_seconds: float, limit: int) -> list[Row]:
    return await db.fetch_all(conn, Q["orphans"], min_age_seconds=min_age_seconds, limit=limit)
