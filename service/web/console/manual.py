"""Manual payouts (SPEC section 8, issue 19) as the console drives them: the approvals
queue, the request form, approve and deny.

A thin adapter over the manual-payout use cases, so the console's pages and the API's
endpoints run the same rules. Those use cases are being built beside the console; until
they are on this branch, AVAILABLE is False: the pages say manual payouts are not in
this version and offer no form, and every call below raises Unavailable.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any
from uuid import UUID

from service import db, support
from service.settings import Settings

AVAILABLE = False


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

    @property
    def details(self) -> dict[str, Any]:
        return {"client": self.client, "via": "console"}


async def queue(conn: db.Conn, *, limit: int) -> list[dict[str, Any]]:
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
) -> dict[str, Any]:
    """A new manual payout, `pending_approval`; Refused by the rules."""
    raise Unavailable


async def approve(
    conn: db.Conn, settings: Settings, actor: Actor, payout_id: UUID
) -> dict[str, Any]:
    """The payout, now `pending` with its job; Refused by the rules (four eyes, hold...)."""
    raise Unavailable


async def deny(
    conn: db.Conn, settings: Settings, actor: Actor, payout_id: UUID, reason: str
) -> dict[str, Any]:
    """The payout, now `denied`; Refused by the rules."""
    raise Unavailable
