"""GET /v1/events: the payout events feed, in commit order (SPEC section 3).

With X-Park-Id, that park's events; without it, every park's (Opteum's
consumer). `next_cursor` is always given: passed back as `after`, it returns
what has committed since, or an empty page.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import events
from service.web import params
from service.web.auth import PARK
from service.web.errors import ApiError
from service.web.state import pool_of


async def list_events(request: Request) -> Response:
    # Present but malformed is a 400, not "every park's events".
    park_id = params.park_header(request) if "x-park-id" in request.headers else None
    limit = params.limit_param(request, default=events.PAGE_MAX)
    after = params.decode_cursor(
        request.query_params.get("after"), (events.xid_part, events.seq_part)
    )
    position = events.Position(*after) if after else events.START
    async with pool_of(request).connection() as conn:
        try:
            page = await events.page(conn, after=position, limit=limit, park_id=park_id)
        except events.UnknownPosition:
            raise ApiError("invalid_request", "cursor was not issued by this API") from None
    return JSONResponse(
        {
            "events": [events.event_json(row) for row in page.events],
            "next_cursor": params.encode_cursor(page.next.xid, page.next.seq),
        }
    )


ROUTES = [PARK.route("/v1/events", list_events, methods=["GET"])]
