"""Cancelling a payout before any worker has taken it (SPEC sections 2 and 3).

Only a `pending` payout, with no order recorded, can be cancelled: the
database refuses any other move to `cancelled` (payouts_guard), and the
cancel and a worker's take race on the payout's row lock, so exactly one of
them wins. The job of a cancelled payout finds nothing to do and never
reaches Billing.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from uuid import UUID

from service.audit import store as audit
from service.audit.store import ActorType
from service.core import db, observability
from service.payouts import store as payouts

ACTION = "payout.cancel"


class NotCancellable(Exception):
    """A worker has taken the payout (or it has ended): too late to cancel."""

    def __init__(self, status: str) -> None:
        super().__init__(f"payout is {status}")
        self.status = status


class NotFound(Exception):
    """No such payout for this park."""


@dataclasses.dataclass(frozen=True)
class CancelRequest:
    park_id: str
    payout_id: UUID
    user_id: str
    request_id: str
    client: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Opteum's users cancel through the API; support, signed in to the console
    # with an admin token, as admins, "via": "console".
    actor_type: ActorType = "user"
    via: str | None = None

    @property
    def audit_details(self) -> dict[str, Any]:
        return {"client": self.client, **({"via": self.via} if self.via else {})}


async def cancel(conn: db.Conn, req: CancelRequest) -> payouts.Record:
    """The cancelled payout (cancelling twice answers the same), else NotCancellable/NotFound.

    Refusals are audited too: a cancel is a user action, whatever its outcome.
    """
    async with conn.transaction():
        done = await db.fetch_as(
            conn,
            payouts.Record,
            payouts.Q["cancel"],
            id=req.payout_id,
            park_id=req.park_id,
            user_id=req.user_id,
            request_id=req.request_id,
            actor_type=req.actor_type,
            details=req.audit_details,
        )
    if done is not None:
        observability.PAYOUTS.labels(done.kind, done.status).inc()
        return done
    current = await payouts.get(conn, req.payout_id, park_id=req.park_id)
    if current is None:
        outcome = "payout_not_found"
    elif current.status == "cancelled":
        outcome = "ok"  # cancelled twice: the same answer, on record again
    else:
        outcome = "payout_not_cancellable"
    async with conn.transaction():
        await audit.write(
            conn,
            audit.Entry(
                actor_type=req.actor_type,
                actor_id=req.user_id,
                park_id=req.park_id,
                action=ACTION,
                outcome=outcome,
                request_id=req.request_id,
                payout_id=req.payout_id if current is not None else None,
                details={
                    **req.audit_details,
                    **({"status": current.status} if current else {}),
                },
            ),
        )
    if current is None:
        raise NotFound(str(req.payout_id))
    if current.status != "cancelled":
        raise NotCancellable(current.status)
    return current
