"""Refused user and admin actions go to the audit log like accepted ones (SPEC section 1.5).

Written in a transaction of their own: the refused request changed nothing
else, so there is nothing for the entry to commit with.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import psycopg
import psycopg_pool
from starlette.requests import Request

from service.audit import store as audit
from service.core.values import is_park_id
from service.web import params
from service.web.errors import ApiError
from service.web.origin import client_details
from service.web.state import pool_of, request_id_of

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who a refused request is recorded as: the kind of the token that authenticated, and
    whether its X-User-Id may be believed (only on a route of that token's own group)."""

    actor_type: Literal["user", "admin"]
    trusted: bool


async def write(request: Request, action: str, actor: Actor, refusal: ApiError) -> None:
    """One entry for a refused action, with whatever of the request could be trusted.

    With the database out of reach the refusal is still answered as it is (a
    retry would only be refused again) and the log line keeps it on record.
    """
    try:
        await _write(request, action, actor, refusal)
    except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
        logger.warning(
            "refused %s (%s) not audited: database unavailable: %s", action, refusal.code, exc
        )


async def _write(request: Request, action: str, actor: Actor, refusal: ApiError) -> None:
    park = request.path_params.get("park_id") or request.headers.get("x-park-id")
    user_id = params.optional_header(request, "X-User-Id", params.is_user_id)
    details: dict[str, Any] = {
        "message": refusal.message,
        "idempotency_key": params.optional_header(
            request, "Idempotency-Key", params.is_idempotency_key
        ),
        "client": client_details(request),
    }
    if not actor.trusted and user_id is not None:
        # A claim, not an identity: the token does not vouch for users of this route.
        details["claimed_user_id"] = user_id
    async with pool_of(request).connection() as conn, conn.transaction():
        await audit.write(
            conn,
            audit.Entry(
                actor_type=actor.actor_type,
                actor_id=user_id if actor.trusted else None,
                park_id=park if isinstance(park, str) and is_park_id(park) else None,
                action=action,
                outcome=refusal.code,
                request_id=request_id_of(request),
                details=details,
            ),
        )
