"""The instant payout request: one SQL function call from the button to the queue.

The function (migration 0014, sql/payouts.sql press_instant) locks the park row,
checks the rules, and inserts the payout with its job and audit entry, in one
round trip in autocommit. A refusal writes nothing there and is then audited in a
statement of its own, so accepted and refused presses alike stay on record.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg.errors

from service.audit import store as audit
from service.billing.client import BillingClient
from service.core import db, queue
from service.core.codes import Code
from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.parks.fees import Fee
from service.payouts import store as payouts
from service.payouts.model import Availability, Quote, instant_availability, payout_amount
from service.payouts.model import quote as domain_quote

ACTION = "payout.instant.request"


class Refused(Exception):
    """The request breaks a rule; `code` is the API error code."""

    def __init__(
        self,
        code: Code | str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        # ValueError for a code that is not Code's (the press function's outcome included).
        self.code = Code(code)
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after


# The refusals that several use cases answer (press, manual request and approval, the
# quote), each worded once.


def park_not_found(park_id: str) -> Refused:
    return Refused(Code.PARK_NOT_FOUND, f"park {park_id} is not registered")


def key_reused() -> Refused:
    return Refused(
        Code.IDEMPOTENCY_KEY_REUSED, "this Idempotency-Key was used with a different request body"
    )


def above_limit(limit: Decimal) -> Refused:
    return Refused(
        Code.AMOUNT_ABOVE_LIMIT,
        f"one payout moves at most {limit}",
        details={"max_amount": str(limit)},
    )


def below_minimum(minimum: Decimal) -> Refused:
    return Refused(
        Code.AMOUNT_BELOW_MINIMUM,
        f"one payout moves at least {minimum}",
        details={"min_amount": str(minimum)},
    )


def on_hold() -> Refused:
    return Refused(Code.PARK_ON_HOLD, "payouts for this park are on hold")


def in_flight() -> Refused:
    return Refused(Code.PAYOUT_IN_PROGRESS, "another payout for this park is in flight")


@dataclasses.dataclass(frozen=True)
class InstantRequest:
    park_id: str
    user_id: str
    idempotency_key: str
    request_id: str
    amount: Decimal | None
    # Who and from where ({"ip", "user_agent"}, built by the web edge).
    client: dict[str, Any] | None = None

    @property
    def audit_details(self) -> dict[str, Any]:
        """What every audit entry of this request records about it."""
        details: dict[str, Any] = {
            "idempotency_key": self.idempotency_key,
            "requested_amount": str(self.amount) if self.amount is not None else None,
        }
        if self.client is not None:
            details["client"] = self.client
        return details

    @property
    def fingerprint(self) -> str:
        """What "the same body" means for a replay: the normalised amount."""
        return _fingerprint(str(self.amount) if self.amount is not None else None)


# Most presses ask for everything (no amount) or a round sum: the hash of the same
# normalised body is computed once per process, not once per press.
@functools.lru_cache(maxsize=1024)
def _fingerprint(amount: str | None) -> str:
    body = {"amount": amount}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Accepted:
    """A payout request accepted: the new payout, or the one its replay names."""

    payout: payouts.Record
    replay: bool


async def request_instant(conn: db.Conn, settings: Settings, req: InstantRequest) -> Accepted:
    """Accept the request (new or replayed) or raise Refused; audits either way.

    One round trip for an accepted or replayed press (one SQL function call in
    autocommit: lock, rules, insert); a refusal's audit entry is a second one.
    """
    try:
        row = await db.fetch_one(
            conn,
            payouts.Q["press_instant"],
            id=uuid.uuid4(),
            park_id=req.park_id,
            idempotency_key=req.idempotency_key,
            request_fingerprint=req.fingerprint,
            requested_by=req.user_id,
            request_id=req.request_id,
            requested_amount=req.amount,
            max_amount=settings.payout_max_amount,
            min_amount=settings.payout_min_amount,
            cooldown=settings.instant_cooldown,
            details=req.audit_details,
            **queue.payout_job("instant"),
        )
        if row is None:
            raise InvariantError("the press function returns one row")
        outcome = row.pop("outcome")
        now: datetime = row.pop("db_now")
        next_available_at: datetime | None = row.pop("next_available_at")
        subscription_ended: bool = row.pop("subscription_ended")
        if outcome in ("ok", "replay"):
            return Accepted(db.build(payouts.Record, row), replay=outcome == "replay")
        raise _refusal_of(outcome, settings, req, now, next_available_at, subscription_ended)
    except Refused as refusal:
        await _audit_refusal(conn, req, refusal)
        raise
    except psycopg.errors.UniqueViolation as exc:
        # The park row lock makes this unreachable; the unique indexes are the
        # backstop if someone writes payouts without taking it. A payout made
        # with our key in the meantime is a replay, anything else a conflict.
        existing = await payouts.park_state(conn, req.park_id, req.idempotency_key)
        if (
            existing is not None
            and existing.existing_id is not None
            and existing.existing_fingerprint == req.fingerprint
        ):
            replay = await payouts.get(conn, existing.existing_id)
            if replay is None:
                raise InvariantError("replay is not None") from None
            return Accepted(replay, replay=True)
        conflict = in_flight()
        await _audit_refusal(conn, req, conflict)
        raise conflict from exc


def _refusal_of(
    outcome: str,
    settings: Settings,
    req: InstantRequest,
    now: datetime,
    next_available_at: datetime | None,
    subscription_ended: bool,
) -> Refused:
    """The refusal the press function named, with its message and details."""
    code = Code(outcome)
    if code is Code.PARK_NOT_FOUND:
        return park_not_found(req.park_id)
    if code is Code.IDEMPOTENCY_KEY_REUSED:
        return key_reused()
    if code is Code.AMOUNT_ABOVE_LIMIT:
        return above_limit(settings.payout_max_amount)
    if code is Code.AMOUNT_BELOW_MINIMUM:
        return below_minimum(settings.payout_min_amount)
    return _refusal(
        Availability(False, code, next_available_at), now, subscription_ended=subscription_ended
    )


def _decide(park: payouts.ParkState, settings: Settings) -> Availability:
    """The rules that draw the button and refuse a press, applied to a park's state."""
    return instant_availability(
        enabled=park.instant_payouts_enabled,
        on_hold=park.hold_reason is not None,
        in_flight=park.in_flight,
        subscription_ended=park.subscription_ended,
        last_counted_instant_at=park.last_counted_instant_at,
        cooldown=settings.instant_cooldown,
        now=park.db_now,
    )


def _refusal(decision: Availability, now: datetime, *, subscription_ended: bool) -> Refused:
    if decision.reason is Code.INSTANT_PAYOUTS_DISABLED and subscription_ended:
        return Refused(
            Code.INSTANT_PAYOUTS_DISABLED,
            "this park's subscription to instant payouts has ended",
            details={"reason": "subscription_ended"},
        )
    if decision.reason is Code.INSTANT_PAYOUTS_DISABLED:
        return Refused(decision.reason, "instant payouts are switched off for this park")
    if decision.reason is Code.PARK_ON_HOLD:
        return on_hold()
    if decision.reason is Code.PAYOUT_IN_PROGRESS:
        return in_flight()
    if not (decision.reason is Code.COOLDOWN_ACTIVE and decision.next_available_at is not None):
        raise InvariantError(
            "decision.reason is Code.COOLDOWN_ACTIVE and decision.next_available_at is not None"
        )
    wait = decision.next_available_at - now
    return Refused(
        Code.COOLDOWN_ACTIVE,
        "an instant payout was made recently; try again later",
        details={"next_available_at": decision.next_available_at},
        retry_after=max(1, _ceil_seconds(wait)),
    )


def _ceil_seconds(delta: timedelta) -> int:
    whole = int(delta.total_seconds())
    return whole + (1 if delta.total_seconds() > whole else 0)


def _entry(
    req: InstantRequest, outcome: str, payout_id: uuid.UUID | None, details: dict[str, Any]
) -> audit.Entry:
    return audit.Entry(
        actor_type="user",
        actor_id=req.user_id,
        park_id=req.park_id,
        action=ACTION,
        outcome=outcome,
        request_id=req.request_id,
        payout_id=payout_id,
        details={**req.audit_details, **details},
    )


async def _audit_refusal(conn: db.Conn, req: InstantRequest, refusal: Refused) -> None:
    details = {
        k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in refusal.details.items()
    }
    # One statement: in autocommit it is its own transaction, one round trip.
    await audit.write(conn, _entry(req, refusal.code, None, details))


@dataclasses.dataclass(frozen=True)
class ParkAvailability:
    """The button's state, and the terms shown beside it."""

    decision: Availability
    fee: Fee | None
    subscription_ended: bool
    instant_payouts_until: datetime | None


async def availability(conn: db.Conn, settings: Settings, park_id: str) -> ParkAvailability | None:
    """The button's state for a park, or None if the park is not registered."""
    park = await payouts.park_state(conn, park_id, None)
    if park is None:
        return None
    return ParkAvailability(
        decision=_decide(park, settings),
        fee=park.fee,
        subscription_ended=park.subscription_ended,
        instant_payouts_until=park.instant_payouts_until,
    )


async def fee_terms(conn: db.Conn, park_id: str) -> Fee | None:
    """The park's instant fee terms now; Refused("park_not_found") for an unknown park."""
    park = await payouts.park_state(conn, park_id, None)
    if park is None:
        raise park_not_found(park_id)
    return park.fee


async def quote(
    billing: BillingClient,
    settings: Settings,
    park_id: str,
    amount: Decimal | None,
    fee: Fee | None,
) -> tuple[Quote, str]:
    """What a press for `amount` (None: everything) would order now, and its currency.

    Reads Billing's balance (through the shared budget; no database connection
    is held meanwhile) and creates nothing.
    """
    balance = await billing.balance(park_id)
    ordered = payout_amount(balance.available, settings.payout_max_amount, amount)
    return domain_quote(ordered, fee), balance.currency
