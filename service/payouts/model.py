"""Payout rules and the payout state machine: plain values, no I/O.

Money, timestamp and id formats are service/core/values.py.

Everything here is testable without a database; the database enforces the
same invariants again (see migrations/0001_schema.sql), because three hosts
run this code at once.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal

from service.core.codes import Code
from service.core.values import CENT
from service.parks.fees import Fee


class Status(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    DENIED = "denied"
    EXPIRED = "expired"
    RETURNED = "returned"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


# Final for the payout's job: nothing is left to order. A succeeded payout can
# still be returned by the bank later (TRANSITIONS), but no run of its job acts.
FINAL_STATUSES = frozenset(
    {
        Status.SUCCEEDED,
        Status.FAILED,
        Status.SKIPPED,
        Status.CANCELLED,
        Status.DENIED,
        Status.EXPIRED,
        Status.RETURNED,
    }
)


class Kind(enum.StrEnum):
    INSTANT = "instant"
    PERIODIC = "periodic"
    MANUAL = "manual"


# The named sets of statuses that the SQL (queries, checks, indexes, triggers) lists
# literally. tests/integration/test_one_state_machine.py reads every status list in
# sql/*.sql and in the live schema and fails on one that is not among these (or a
# status's TRANSITIONS): a new status is added here and in one migration, and the test
# names every place that still disagrees.
IN_FLIGHT = frozenset({Status.PENDING, Status.PROCESSING})
# What a payout is created in (manual payouts wait for approval first).
BORN = frozenset({Status.PENDING, Status.PENDING_APPROVAL})
# Money moved under the payout's key (a returned payout moved it, and back).
PAID = frozenset({Status.SUCCEEDED, Status.RETURNED})
# Statuses only a manual payout takes: it waits for, or lost, its second admin.
AWAITING_OR_REFUSED_APPROVAL = frozenset({Status.PENDING_APPROVAL, Status.DENIED, Status.EXPIRED})
# Final statuses reached without the payout's job (an admin, the clock, the bank).
DECIDED_WITHOUT_JOB = frozenset({Status.DENIED, Status.EXPIRED, Status.RETURNED})

# The only status changes a payout may make. The trigger `payouts_guard`
# (migrations/0012_every_payout.sql) refuses the rest; a test tries every
# pair against the database, so the two cannot drift apart.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING_APPROVAL: frozenset({Status.PENDING, Status.DENIED, Status.EXPIRED}),
    Status.PENDING: frozenset({Status.PROCESSING, Status.CANCELLED}),
    Status.PROCESSING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.SKIPPED}),
    Status.SUCCEEDED: frozenset({Status.RETURNED}),
    Status.FAILED: frozenset(),
    Status.SKIPPED: frozenset(),
    Status.CANCELLED: frozenset(),
    Status.DENIED: frozenset(),
    Status.EXPIRED: frozenset(),
    Status.RETURNED: frozenset(),
}


def can_change(old: Status, new: Status) -> bool:
    """Whether a payout in `old` may be written with status `new`.

    Keeping the status (recording the job id, the last transient problem) is
    allowed until the payout is final; a final payout is frozen (but for the
    bank's return of a succeeded one).
    """
    if old == new:
        return not old.is_final
    return new in TRANSITIONS[old]


class Phase(enum.Enum):
    """A payout's recovery point: what its next run does (service/payouts/execution.py).

    Each is one committed row state, so a run that crashed anywhere resumes
    from the last one its predecessor committed.
    """

    NEW = "new"  # pending: nobody has taken it yet
    DECIDING = "deciding"  # processing, no order recorded: read the balance, decide
    ORDERED = "ordered"  # the order is recorded and may have reached Billing
    FINISHED = "finished"  # final: nothing left to do


def phase_of(status: Status, ordered: bool) -> Phase:
    # pending_approval reads as NEW: it has no job, and a stray one finds
    # nothing to take (the take query wants pending or processing).
    if status.is_final:
        return Phase.FINISHED
    if ordered:
        return Phase.ORDERED
    return Phase.DECIDING if status is Status.PROCESSING else Phase.NEW


# Billing's refusals that say our figures were stale rather than wrong: a
# periodic payout refused with one is followed at once by a fresh payout.
STALE_FIGURES = frozenset({"insufficient_funds", "currency_mismatch"})


# Statuses that do not start a cooldown: the park got nothing (or the bank
# sent it back). sql/payouts.sql park_state lists the same ones; a unit test
# holds the two together.
COOLDOWN_EXEMPT = frozenset({Status.FAILED, Status.SKIPPED, Status.CANCELLED, Status.RETURNED})

# Every event type: "payout." and the status the payout was created in or reached.
EVENT_TYPES = ("payout.created", *(f"payout.{s}" for s in Status if s in FINAL_STATUSES))

NAMED_STATUS_SETS: dict[str, frozenset[Status]] = {
    "every status": frozenset(Status),
    "IN_FLIGHT": IN_FLIGHT,
    "every status but BORN": frozenset(Status) - BORN,
    "FINAL_STATUSES": FINAL_STATUSES,
    "COOLDOWN_EXEMPT": COOLDOWN_EXEMPT,
    "PAID": PAID,
    "PAID | IN_FLIGHT": PAID | IN_FLIGHT,
    "AWAITING_OR_REFUSED_APPROVAL": AWAITING_OR_REFUSED_APPROVAL,
    "DECIDED_WITHOUT_JOB": DECIDED_WITHOUT_JOB,
    **{f"TRANSITIONS[{old}]": new for old, new in TRANSITIONS.items() if len(new) > 1},
}


def payout_amount(available: Decimal, max_amount: Decimal, requested: Decimal | None) -> Decimal:
    """What one payout moves: all that is available, capped by the limit and the request.

    Rounded down to the cent, so we never order a fraction of a cent more than
    Billing reported; never negative (an overdrawn park has nothing to pay).
    """
    amount = min(available, max_amount)
    if requested is not None:
        amount = min(amount, requested)
    return max(amount, Decimal(0)).quantize(CENT, rounding=ROUND_DOWN)


def order_amount(
    available: Decimal, max_amount: Decimal, requested: Decimal | None, min_amount: Decimal
) -> Decimal | None:
    """The amount to order, or None when it would be under PAYOUT_MIN_AMOUNT (nothing to pay)."""
    amount = payout_amount(available, max_amount, requested)
    return amount if amount >= min_amount and amount > 0 else None


@dataclasses.dataclass(frozen=True)
class Quote:
    """What an instant payout of `amount` costs the park and what reaches it."""

    amount: Decimal
    fee_amount: Decimal | None
    net_amount: Decimal | None


def quote(amount: Decimal, fee: Fee | None) -> Quote:
    """Split `amount` into fee and net: fee + net = amount exactly; no fee terms, no split."""
    if fee is None:
        return Quote(amount, None, None)
    fee_amount = fee.of(amount)
    return Quote(amount, fee_amount, amount - fee_amount)


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether the "Pay out now" button is live, and if not, why and until when."""

    available: bool
    reason: Code | None
    next_available_at: datetime | None


def instant_availability(
    *,
    enabled: bool,
    on_hold: bool,
    in_flight: bool,
    subscription_ended: bool = False,
    last_counted_instant_at: datetime | None,
    cooldown: timedelta,
    now: datetime,
) -> Availability:
    """Decide the button's state in the same order the request path checks the rules."""
    if not enabled or subscription_ended:
        return Availability(False, Code.INSTANT_PAYOUTS_DISABLED, None)
    if on_hold:
        return Availability(False, Code.PARK_ON_HOLD, None)
    if in_flight:
        return Availability(False, Code.PAYOUT_IN_PROGRESS, None)
    if last_counted_instant_at is not None:
        next_at = last_counted_instant_at + cooldown
        if next_at > now:
            return Availability(False, Code.COOLDOWN_ACTIVE, next_at)
    return Availability(True, None, None)


def next_periodic_payout_at(
    *,
    enabled: bool,
    registered_at: datetime,
    last_succeeded_at: datetime | None,
    last_periodic_attempt_at: datetime | None,
    period: timedelta,
    on_hold: bool = False,
) -> datetime | None:
    """The moment the park becomes due, by the rule of SPEC section 2 (None: never, as it
    stands). The scan's rule is the database's park_periodic_due (migrations/0018);
    tests/integration/test_due_rule.py holds the two to the same answers."""
    if not enabled or on_hold:
        return None
    anchor = max(t for t in (registered_at, last_succeeded_at, last_periodic_attempt_at) if t)
    return anchor + period
