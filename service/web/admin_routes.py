"""Admin endpoints (admin token): the park registry and the audit log."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import audit, park_admin, parks
from service.domain import is_park_id, is_visible_ascii
from service.web import cursors, params, views
from service.web.auth import ADMIN
from service.web.errors import ApiError
from service.web.origin import client_details
from service.web.state import admin_pool_of, pool_of, request_id_of, settings_of

PARK_FIELDS = {"instant_payouts_enabled", "periodic_payouts_enabled", "params", "hold"}
MAX_HOLD_REASON = park_admin.MAX_HOLD_REASON


async def put_park(request: Request) -> Response:
    settings = settings_of(request)
    park_id = params.park_path(request)
    user_id = params.user_header(request)
    body = await params.json_object(request, PARK_FIELDS, decimals=False)
    for flag in ("instant_payouts_enabled", "periodic_payouts_enabled"):
        if flag in body and not isinstance(body[flag], bool):
            raise ApiError("invalid_request", f"{flag} must be true or false")
    if "params" in body and not isinstance(body["params"], dict):
        raise ApiError("invalid_request", "params must be a JSON object")
    hold = _hold(body, user_id) if "hold" in body else None
    change = park_admin.ParkChange(
        park_id=park_id,
        user_id=user_id,
        request_id=request_id_of(request),
        changes=body,
        instant=body.get("instant_payouts_enabled"),
        periodic=body.get("periodic_payouts_enabled"),
        params=body.get("params"),
        hold=hold,
        client=client_details(request),
    )
    # A write: the request pool, with its lock timeout, like every other write.
    async with pool_of(request).connection() as conn:
        row, created = await park_admin.apply(conn, change)
    return JSONResponse(views.park_json(row, settings), status_code=201 if created else 200)


async def get_park(request: Request) -> Response:
    park_id = params.park_path(request)
    async with admin_pool_of(request).connection() as conn:
        row = await parks.get(conn, park_id)
    if row is None:
        raise ApiError("park_not_found", f"park {park_id} is not registered")
    return JSONResponse(views.park_json(row, settings_of(request)))


def _hold(body: dict[str, Any], user_id: str) -> parks.Hold:
    """`{"reason": "..."}` puts the park on hold, `null` releases it."""
    raw = body["hold"]
    if raw is None:
        return parks.Hold(reason=None, by=None)
    reason = raw.get("reason") if isinstance(raw, dict) and set(raw) == {"reason"} else None
    try:
        return parks.Hold(reason=park_admin.hold_reason(reason), by=user_id)
    except park_admin.InvalidChange:
        raise ApiError(
            "invalid_request",
            f'hold must be null or {{"reason": "..."}}, 1-{MAX_HOLD_REASON} characters, '
            "not blank, no control characters",
        ) from None


def _is_text(value: str) -> bool:
    return is_visible_ascii(value, 128)


async def get_audit(request: Request) -> Response:
    limit = params.limit_param(request, default=50)
    filters = audit.Filters(
        park_id=params.query_value(request, "park_id", is_park_id, "a park id"),
        actor_id=params.query_value(request, "actor_id", _is_text, "1-128 visible ASCII"),
        action=params.query_value(request, "action", _is_text, "1-128 visible ASCII"),
        since=params.time_param(request, "since"),
        until=params.time_param(request, "until"),
    )
    key = cursors.key_for(settings_of(request))
    after = cursors.verify(
        key, "audit", request.query_params.get("cursor"), (params.parse_time, params.row_id)
    )
    async with admin_pool_of(request).connection() as conn:
        rows = await audit.page(conn, filters, limit=limit + 1, after=after)
    rows, position = params.page(rows, limit, "at", "id")
    cursor = cursors.sign(key, "audit", *position) if position else None
    return JSONResponse({"entries": [views.audit_json(r) for r in rows], "next_cursor": cursor})


ROUTES = [
    ADMIN.route("/v1/parks/{park_id}", put_park, methods=["PUT"], audited="park.update"),
    ADMIN.route("/v1/parks/{park_id}", get_park, methods=["GET"]),
    ADMIN.route("/v1/audit", get_audit, methods=["GET"]),
]
