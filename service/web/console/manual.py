"""Manual payouts (SPEC section 8) as the console drives them: the approvals queue, the
request form, approve and deny.

A thin adapter over the use cases of service/payouts/manual.py, the ones the API's
/v1/admin/payouts endpoints run, so both edges apply the same rules (four eyes, hold,
in flight, limits) and refuse with the same codes; it only turns the signed-in user
into the use cases' requests, marked "via": "console" for the audit log.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any
from uuid import UUID

from service.core import db
from service.core.settings import Settings
from service.payouts import manual as use_cases
from service.payouts import store as payouts
from service.payouts.instant import Refused as RuleRefused
from service.support import store as support

# The pages show the queue and the forms (kept as a switch for a build without them).
AVAILABLE = True
VIA = "console"


class Unavailable(Exception):
    """Manual payouts are not in this version of the service."""


class Refused(Exception):
    """The rules refuse the action; `code` is the API's error code for it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Actor:
    """The signed-in support user, as their audit entries name them."""

    user_id: str
    request_id: str
    client: dict[str, Any]


async def queue(conn: db.Conn, *, limit: int) -> list[payouts.Record]:
    """Manual payouts waiting for approval, oldest first."""
    return await support.approvals_queue(conn, limit=limit)


async def request(
    conn: db.Conn,
    settings: Settings,
    actor: Actor,
    *,
    park_id: str,
    amount: Decimal,
    reason: str,
    idempotency_key: str,
) -> payouts.Record:
    """A new manual payout, `pending_approval` (the same one for the same form); Refused."""
    req = use_cases.ManualRequest(
        park_id=park_id,
        amount=amount,
        reason=reason,
        user_id=actor.user_id,
        idempotency_key=idempotency_key,
        request_id=actor.request_id,
        client=actor.client,
        via=VIA,
    )
    try:
        accepted = await use_cases.request(conn, settings, req)
    except RuleRefused as refusal:
        raise Refused(refusal.code, refusal.message) from None
    return accepted.payout


async def approve(
    conn: db.Conn, settings: Settings, actor: Actor, payout_id: UUID
) -> payouts.Record:
    """The payout, now `pending` with its job; Refused by the rules (four eyes, hold...)."""
    return await _decide(use_cases.approve, conn, settings, actor, payout_id, None)


async def deny(
    conn: db.Conn, settings: Settings, actor: Actor, payout_id: UUID, reason: str
) -> payouts.Record:
    """The payout, now `denied`; Refused by the rules."""
    return await _decide(use_cases.deny, conn, settings, actor, payout_id, reason)


async def _decide(
    use_case: Any,
    conn: db.Conn,
    settings: Settings,
    actor: Actor,
    payout_id: UUID,
    reason: str | None,
) -> payouts.Record:
    decision = use_cases.Decision(
        payout_id=payout_id,
        user_id=actor.user_id,
        request_id=actor.request_id,
        reason=reason,
        client=actor.client,
        via=VIA,
    )
    try:
        row: payouts.Record = await use_case(conn, settings, decision)
    except use_cases.NotFound:
        raise Refused("payout_not_found", "no such manual payout") from None
    except RuleRefused as refusal:
        raise Refused(refusal.code, refusal.message) from None
    return row
