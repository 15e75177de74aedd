"""Manual payouts with four eyes (SPEC section 8): support asks, a second admin decides.

- request: a payout of kind `manual`, status `pending_approval`, no job. One
  awaiting approval per park (unique index), its Idempotency-Key unique among
  manual payouts (another unique index).
- approve: under the park's row lock, with every rule of SPEC section 2 (hold,
  nothing in flight, the amount limit), `pending_approval -> pending` and its
  job in one statement. The database refuses the requester as approver
  (CHECK payouts_four_eyes) and an approval past the deadline (payouts_guard),
  whatever route the UPDATE comes by.
- deny: `pending_approval -> denied` with the admin's reason.
- expire: not approved within MANUAL_PAYOUT_APPROVAL_HOURS, by the database's
  clock: `expired` (the maintenance task sweeps; a decision that comes late
  expires the payout first).

Every step, accepted or refused, is audited with the acting admin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg.errors
from psycopg import sql

from service.audit import store as audit
from service.core import db, listing, observability, queue
from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.parks import store as parks
from service.payouts import instant
from service.payouts import store as payouts
from service.payouts.instant import Accepted, Refused

ACTION_REQUEST = "payout.manual.request"
ACTION_APPROVE = "payout.manual.approve"
ACTION_DENY = "payout.manual.deny"
MAX_REASON = 500
# How many overdue requests one sweep expires (the rest wait for the next one).
EXPIRE_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class ManualRequest:
    park_id: str
    amount: Decimal
    reason: str
    user_id: str
    idempotency_key: str
    request_id: str
    client: dict[str, Any] = dataclasses.field(default_factory=dict)
    # "console" when support acted in the console (SPEC section 9); None from the API.
    via: str | None = None

    @property
    def fingerprint(self) -> str:
        """What "the same body" means for a replay: park, normalised amount, reason."""
        body = {"park_id": self.park_id, "amount": str(self.amount), "reason": self.reason}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def audit_details(self) -> dict[str, Any]:
        return {
            "idempotency_key": self.idempotency_key,
            "amount": str(self.amount),
            "reason": self.reason,
            "client": self.client,
            **({"via": self.via} if self.via else {}),
        }


@dataclasses.dataclass(frozen=True)
class Decision:
    """An admin's approval or denial of one manual payout."""

    payout_id: uuid.UUID
    user_id: str
    request_id: str
    reason: str | None = None
    client: dict[str, Any] = dataclasses.field(default_factory=dict)
    via: str | None = None

    @property
    def audit_details(self) -> dict[str, Any]:
        return {"client": self.client, **({"via": self.via} if self.via else {})}


class NotFound(Exception):
    """No manual payout with this id."""


# --- request ---------------------------------------------------------------------


async def request(conn: db.Conn, settings: Settings, req: ManualRequest) -> Accepted:
    """A new manual payout awaiting approval (or the same one, replayed), else Refused."""
    try:
        async with conn.transaction():
            return await _request(conn, settings, req)
    except Refused as refusal:
        await _audit(conn, ACTION_REQUEST, req.user_id, req.park_id, None, req, refusal)
        raise
    except psycopg.errors.UniqueViolation as exc:
        # The park lock orders requests for one park; two requests for two
        # parks under one key race here, and the loser is a replay or a reuse.
        existing = await db.fetch_as(
            conn, payouts.Record, payouts.Q["manual_by_key"], idempotency_key=req.idempotency_key
        )
        if existing is not None and existing.request_fingerprint == req.fingerprint:
            return Accepted(existing, replay=True)
        conflict = _conflict(exc)
        await _audit(conn, ACTION_REQUEST, req.user_id, req.park_id, None, req, conflict)
        raise conflict from exc


def _conflict(exc: psycopg.errors.UniqueViolation) -> Refused:
    name = exc.diag.constraint_name or ""
    if name == "payouts_one_awaiting_approval_per_park":
        return Refused("approval_pending", "a manual payout for this park awaits approval")
    return instant.key_reused()


async def _request(conn: db.Conn, settings: Settings, req: ManualRequest) -> Accepted:
    existing = await db.fetch_as(
        conn, payouts.Record, payouts.Q["manual_by_key"], idempotency_key=req.idempotency_key
    )
    if existing is not None:
        if existing.request_fingerprint != req.fingerprint:
            raise instant.key_reused()
        await audit.write(
            conn,
            _entry(
                ACTION_REQUEST,
                req.user_id,
                req.park_id,
                existing.id,
                req,
                "ok",
                {"replay": True},
            ),
        )
        return Accepted(existing, replay=True)
    limit, minimum = settings.payout_max_amount, settings.payout_min_amount
    if req.amount > limit:
        raise instant.above_limit(limit)
    if req.amount < minimum:
        raise instant.below_minimum(minimum)
    if await parks.lock(conn, req.park_id) is None:
        raise instant.park_not_found(req.park_id)
    # The park's manual payout awaiting approval, if any.
    waiting = await db.fetch_value(
        conn, uuid.UUID, payouts.Q["awaiting_approval"], park_id=req.park_id
    )
    if waiting is not None:
        raise Refused(
            "approval_pending",
            "a manual payout for this park awaits approval",
            details={"payout_id": str(waiting)},
        )
    row = await db.fetch_as(
        conn,
        payouts.Record,
        payouts.Q["insert_manual"],
        id=uuid.uuid4(),
        park_id=req.park_id,
        idempotency_key=req.idempotency_key,
        request_fingerprint=req.fingerprint,
        requested_by=req.user_id,
        request_id=req.request_id,
        requested_amount=req.amount,
        max_amount=limit,
        min_amount=minimum,
        reason=req.reason,
        approval_window=settings.manual_payout_approval_window,
        details=req.audit_details,
    )
    if row is None:
        raise InvariantError("row is not None")
    return Accepted(row, replay=False)


# --- approve and deny ------------------------------------------------------------


async def approve(conn: db.Conn, settings: Settings, decision: Decision) -> payouts.Record:
    """The approved payout, now pending with its job; else Refused or NotFound."""
    return await _decide(conn, settings, decision, ACTION_APPROVE)


async def deny(conn: db.Conn, settings: Settings, decision: Decision) -> payouts.Record:
    """The denied payout; else Refused or NotFound."""
    return await _decide(conn, settings, decision, ACTION_DENY)


async def _decide(
    conn: db.Conn, settings: Settings, decision: Decision, action: str
) -> payouts.Record:
    park_id: str | None = None
    refusal: Refused | None = None
    try:
        async with conn.transaction():
            found = await payouts.get(conn, decision.payout_id)
            if found is None or found.kind != "manual":
                raise NotFound(str(decision.payout_id))
            park_id = found.park_id
            # Every decision about one park's payouts is serialised on its row.
            await parks.lock(conn, found.park_id)
            row = await db.fetch_as(
                conn,
                payouts.ManualDecision,
                payouts.Q["manual_for_decision"],
                id=decision.payout_id,
            )
            if row is None:  # payouts are never deleted
                raise InvariantError("row is not None")
            if row.status == "pending_approval" and row.approval_time_over:
                # Too late: expire it now (committed), then refuse.
                await db.fetch_one(conn, payouts.Q["expire"], id=decision.payout_id, limit=1)
                observability.PAYOUTS.labels("manual", "expired").inc()
                refusal = _not_pending("expired")
            elif row.status != "pending_approval":
                refusal = _not_pending(row.status)
            elif action == ACTION_APPROVE:
                refusal = _approval_refusal(row, settings, decision)
            if refusal is None:
                done = await _write_decision(conn, decision, action)
                observability.bind(payout_id=str(done.id))
                if action == ACTION_DENY:
                    observability.PAYOUTS.labels("manual", "denied").inc()
                return done
    except psycopg.errors.CheckViolation as exc:
        # The database's word, should a path ever skip the checks above: its four
        # eyes, and (main's migration 0007) no payout enters flight on a held park.
        if exc.diag.constraint_name == "payouts_four_eyes":
            refusal = _self_approval()
        elif exc.diag.constraint_name == "payouts_decided_under_park_lock":
            refusal = instant.on_hold()
        else:
            raise
    except psycopg.errors.UniqueViolation as exc:
        # The in-flight index, should a path ever skip the check above.
        if exc.diag.constraint_name != "payouts_one_in_flight_per_park":
            raise
        refusal = instant.in_flight()
    await _audit(conn, action, decision.user_id, park_id, decision.payout_id, decision, refusal)
    raise refusal


def _not_pending(status: str) -> Refused:
    return Refused(
        "payout_not_pending_approval",
        f"this payout is {status}: it was decided already",
        details={"status": status},
    )


def _self_approval() -> Refused:
    return Refused("self_approval_forbidden", "only another admin may approve this request")


def _approval_refusal(
    row: payouts.ManualDecision, settings: Settings, decision: Decision
) -> Refused | None:
    """The rules of SPEC section 2 for a payout about to start, in the press's order."""
    if decision.user_id.lower() == str(row.requested_by).lower():
        return _self_approval()
    if row.hold_reason is not None:
        return instant.on_hold()
    if row.in_flight:
        return instant.in_flight()
    if row.requested_amount is not None and row.requested_amount > settings.payout_max_amount:
        return instant.above_limit(settings.payout_max_amount)
    return None


async def _write_decision(conn: db.Conn, decision: Decision, action: str) -> payouts.Record:
    details = decision.audit_details
    if action == ACTION_APPROVE:
        row = await db.fetch_as(
            conn,
            payouts.Record,
            payouts.Q["approve"],
            id=decision.payout_id,
            user_id=decision.user_id,
            request_id=decision.request_id,
            details=details,
            **queue.payout_job("manual"),
        )
    else:
        row = await db.fetch_as(
            conn,
            payouts.Record,
            payouts.Q["deny"],
            id=decision.payout_id,
            user_id=decision.user_id,
            reason=decision.reason,
            request_id=decision.request_id,
            details={**details, "reason": decision.reason},
        )
    if row is None:  # locked and checked pending_approval above
        raise InvariantError("row is not None")
    return row


# --- expiry and the queue --------------------------------------------------------


async def expire_due(conn: db.Conn) -> int:
    """Expire the requests whose approval time ran out; how many."""
    async with conn.transaction():
        rows = await db.fetch_all_as(
            conn, payouts.Record, payouts.Q["expire"], id=None, limit=EXPIRE_BATCH
        )
    for _ in rows:
        observability.PAYOUTS.labels("manual", "expired").inc()
    return len(rows)


async def waiting(conn: db.Conn) -> tuple[int, float]:
    """How many requests await approval, and the oldest one's age in seconds."""
    row = await db.fetch_as(conn, payouts.Waiting, payouts.Q["pending_approval_count"])
    if row is None:
        raise InvariantError("row is not None")
    return row.waiting, row.oldest_seconds


@dataclasses.dataclass(frozen=True)
class Filters:
    park_id: str | None = None
    status: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def page(
    conn: db.Conn, filters: Filters, *, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[payouts.Record]:
    """Every park's payouts, newest first, filtered (the approvals queue, support's search).

    Only the filters given, so the planner can pick the park's index or the global one
    (core/listing.py).
    """
    query, params = listing.newest_first(
        table="payouts",
        columns=sql.SQL("*"),
        at="created_at",
        filters=filters,
        after=after,
        limit=limit,
    )
    async with conn.cursor(row_factory=db.row_as(payouts.Record)) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


# --- audit -----------------------------------------------------------------------


def _entry(
    action: str,
    user_id: str,
    park_id: str | None,
    payout_id: uuid.UUID | None,
    what: ManualRequest | Decision,
    outcome: str,
    extra: dict[str, Any] | None = None,
) -> audit.Entry:
    details = (
        what.audit_details
        if isinstance(what, ManualRequest)
        else {**what.audit_details, **({"reason": what.reason} if what.reason else {})}
    )
    return audit.Entry(
        actor_type="admin",
        actor_id=user_id,
        park_id=park_id,
        action=action,
        outcome=outcome,
        request_id=what.request_id,
        payout_id=payout_id,
        details={**details, **(extra or {})},
    )


async def _audit(
    conn: db.Conn,
    action: str,
    user_id: str,
    park_id: str | None,
    payout_id: uuid.UUID | None,
    what: ManualRequest | Decision,
    refusal: Refused,
) -> None:
    extra = {
        k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in refusal.details.items()
    }
    async with conn.transaction():
        await audit.write(
            conn,
            _entry(action, user_id, park_id, payout_id, what, refusal.code, extra),
        )
