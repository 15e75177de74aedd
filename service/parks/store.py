"""The park registry: SQL for the parks table family."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from decimal import Decimal
from typing import Any

from service.core import db
from service.core.invariant import InvariantError
from service.parks import fees
from service.parks.fees import Fee

Q = db.queries("parks")


class Unchanged:
    """A field left out of an update: keep the park's value."""


UNCHANGED = Unchanged()


@dataclasses.dataclass(frozen=True, slots=True)
class Park:
    """One row of `parks`."""

    park_id: str
    instant_payouts_enabled: bool
    periodic_payouts_enabled: bool
    # Passed through to Billing with each payout (bank details, contract ids...).
    params: dict[str, Any]
    registered_at: datetime
    updated_at: datetime
    last_payout_at: datetime | None
    last_periodic_attempt_at: datetime | None
    hold_reason: str | None
    hold_since: datetime | None
    hold_by: str | None
    instant_fee_percent: Decimal | None
    instant_fee_fixed: Decimal | None
    instant_payouts_until: datetime | None

    @property
    def fee(self) -> Fee | None:
        """The instant fee, when the park has one."""
        return fees.terms(self.instant_fee_percent, self.instant_fee_fixed)


@dataclasses.dataclass(frozen=True, slots=True)
class _Upserted(Park):
    """A park as upsert returns it: with whether the statement inserted it."""

    created: bool


@dataclasses.dataclass(frozen=True)
class Hold:
    """A hold to set (with its reason and who set it), or to release (reason None)."""

    reason: str | None
    by: str | None


async def upsert(
    conn: db.Conn,
    park_id: str,
    *,
    instant: bool | None,
    periodic: bool | None,
    params: dict[str, Any] | None,
    hold: Hold | None = None,
    fee: Fee | Unchanged | None = UNCHANGED,
    until: datetime | Unchanged | None = UNCHANGED,
) -> tuple[Park, bool]:
    """Register or update a park; returns the row and whether it was created.

    `hold` None leaves the hold as it is; a Hold sets it (reason) or releases it (no reason).
    `fee` and `until` (the instant fee, the end of the subscription) change when given;
    None clears them.
    """
    fee_given = not isinstance(fee, Unchanged)
    until_given = not isinstance(until, Unchanged)
    new_fee = fee if isinstance(fee, Fee) else None
    row = await db.fetch_as(
        conn,
        _Upserted,
        Q["upsert"],
        park_id=park_id,
        instant=instant,
        periodic=periodic,
        params=params,
        hold_given=hold is not None,
        hold_reason=hold.reason if hold else None,
        hold_by=hold.by if hold else None,
        fee_given=fee_given,
        fee_percent=new_fee.percent if new_fee else None,
        fee_fixed=new_fee.fixed if new_fee else None,
        until_given=until_given,
        until=until if isinstance(until, datetime) else None,
    )
    if row is None:  # INSERT ... ON CONFLICT DO UPDATE always returns the row
        raise InvariantError("row is not None")
    return row, row.created


async def get(conn: db.Conn, park_id: str) -> Park | None:
    return await db.fetch_as(conn, Park, Q["get"], park_id=park_id)


async def lock(conn: db.Conn, park_id: str) -> Park | None:
    """Lock the park row until the transaction ends, or None if no such park."""
    return await db.fetch_as(conn, Park, Q["lock"], park_id=park_id)


async def mark_paid(conn: db.Conn, park_id: str, at: datetime) -> None:
    await db.execute(conn, Q["mark_paid"], park_id=park_id, at=at)
