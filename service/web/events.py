"""GET /v1/events: the payout events feed, in commit order (SPEC section 3).

With X-Park-Id, that park's events; without it, every park's (Opteum's
consumer). `next_cursor` is always given: passed back as `after`, it returns
what has committed since, or an empty page.

A cursor holds one feed position. Cursors of the v5 feed, (xid, seq), are
still read: they resume just before the first event they had not reached, or,
when they cannot be resolved (from before a restore into a fresh cluster),
answer 410 cursor_expired with the oldest cursor to resume from.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.core import db
from service.core.invariant import InvariantError
from service.events import outbox as events
from service.web import params
from service.web.auth import PARK
from service.web.errors import ApiError
from service.web.state import pool_of


async def list_events(request: Request) -> Response:
    # Present but malformed is a 400, not "every park's events".
    park_id = params.park_header(request) if "x-park-id" in request.headers else None
    limit = params.limit_param(request, default=events.PAGE_MAX)
    raw = request.query_params.get("after")
    async with pool_of(request).connection() as conn:
        position = await _position(conn, raw)
        try:
            page = await events.page(conn, after=position, limit=limit, park_id=park_id)
        except events.UnknownPosition:
            raise ApiError("invalid_request", "cursor was not issued by this API") from None
        except events.ExpiredPosition as gone:
            raise _expired(gone.oldest) from None
    return JSONResponse(
        {
            "events": [events.event_json(row) for row in page.events],
            "next_cursor": params.encode_cursor(page.next),
        }
    )


async def _position(conn: db.Conn, raw: str | None) -> int:
    if raw is None:
        return events.START
    try:
        new = params.decode_cursor(raw, (events.position_part,))
    except ApiError:
        # Not a position: a v5 cursor, or a 400 if it is not that either.
        new = None
    if new is not None:
        return int(new[0])
    legacy = params.decode_cursor(raw, (events.xid_part, events.seq_part))
    if legacy is None:
        raise InvariantError("legacy is not None")
    xid, seq = legacy
    resolved = await events.legacy_position(conn, xid, seq)
    if resolved is None:
        raise _expired(events.START)
    return resolved


def _expired(oldest: int) -> ApiError:
    return ApiError(
        "cursor_expired",
        "events after this cursor are no longer kept; resume from details.oldest_cursor",
        {"oldest_cursor": params.encode_cursor(oldest)},
    )


ROUTES = [PARK.route("/v1/events", list_events, methods=["GET"])]
