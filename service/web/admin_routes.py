"""Admin endpoints (admin token): the park registry and the audit log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.audit import store as audit
from service.core.values import is_park_id, is_visible_ascii, parse_money
from service.parks import admin as park_admin
from service.parks import store as parks
from service.parks.fees import Fee, parse_fee_fixed, parse_fee_percent
from service.payouts import instant, manual
from service.payouts.model import Kind, Status
from service.web import cursors, params, views
from service.web.auth import ADMIN
from service.web.errors import ApiError
from service.web.origin import client_details
from service.web.state import admin_pool_of, pool_of, request_id_of, settings_of

PARK_FIELDS = {
    "instant_payouts_enabled",
    "periodic_payouts_enabled",
    "params",
    "hold",
    "instant_fee",
    "instant_payouts_until",
}
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
    fee = _fee(body["instant_fee"]) if "instant_fee" in body else parks.UNCHANGED
    until = (
        _until(body["instant_payouts_until"])
        if "instant_payouts_until" in body
        else parks.UNCHANGED
    )
    change = park_admin.ParkChange(
        park_id=park_id,
        user_id=user_id,
        request_id=request_id_of(request),
        changes=body,
        instant=body.get("instant_payouts_enabled"),
        periodic=body.get("periodic_payouts_enabled"),
        params=body.get("params"),
        hold=hold,
        fee=fee,
        until=until,
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


def _fee(raw: Any) -> Fee | None:
    """`{"percent": "1.00", "fixed": "0.00"}` sets the instant fee, `null` removes it."""
    if raw is None:
        return None
    what = 'instant_fee must be null or {"percent": "0-100", "fixed": "0.00"}, decimal strings'
    if not isinstance(raw, dict) or set(raw) != {"percent", "fixed"}:
        raise ApiError("invalid_request", what)
    percent, fixed = raw["percent"], raw["fixed"]
    if not isinstance(percent, str) or not isinstance(fixed, str):
        raise ApiError("invalid_request", what)
    try:
        return Fee(parse_fee_percent(percent), parse_fee_fixed(fixed))
    except ValueError as exc:
        raise ApiError("invalid_request", f"instant_fee: {exc}") from None


def _until(raw: Any) -> datetime | None:
    """An RFC 3339 timestamp with its zone ends the subscription then; `null` never."""
    if raw is None:
        return None
    try:
        value = params.parse_time(raw)
    except (ValueError, TypeError):
        raise ApiError(
            "invalid_request", "instant_payouts_until must be null or an RFC 3339 timestamp"
        ) from None
    try:
        # Any date the format takes, past ones too (the option has ended then); only a
        # value that UTC cannot hold (year 9999 with a negative offset) is refused.
        return value.astimezone(UTC)
    except OverflowError:
        raise ApiError("invalid_request", "instant_payouts_until is out of range") from None


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
    pager = cursors.Pager(cursors.key_for(settings_of(request)), "audit")
    after = pager.after(request.query_params.get("cursor"), (params.parse_time, params.row_id))
    async with admin_pool_of(request).connection() as conn:
        rows = await audit.page(conn, filters, limit=limit + 1, after=after)
    rows, cursor = pager.page(rows, limit, "at", "id")
    return JSONResponse({"entries": [views.audit_json(r) for r in rows], "next_cursor": cursor})


ROUTES = [
    ADMIN.route("/v1/parks/{park_id}", put_park, methods=["PUT"], audited="park.update"),
    ADMIN.route("/v1/parks/{park_id}", get_park, methods=["GET"]),
    ADMIN.route("/v1/audit", get_audit, methods=["GET"]),
]


# --- manual payouts with four eyes (SPEC section 8) --------------------------------

MANUAL_FIELDS = {"park_id", "amount", "reason"}
KINDS = tuple(str(k) for k in Kind)


def _reason(raw: Any, field: str) -> str:
    if (
        not isinstance(raw, str)
        or not 0 < len(raw.strip()) <= manual.MAX_REASON
        or not park_admin.HOLD_REASON_RE.fullmatch(raw)
    ):
        raise ApiError(
            "invalid_request",
            f"{field} must be 1-{manual.MAX_REASON} characters, not blank, no control characters",
        )
    return raw.strip()


def _refused(refusal: instant.Refused) -> ApiError:
    """A rule's refusal, already audited by the use case."""
    return ApiError(refusal.code, refusal.message, refusal.details, audited=True)


def _manual_payout_id(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(str(request.path_params["payout_id"]))
    except ValueError:
        raise ApiError("payout_not_found", "no such payout") from None


async def post_manual(request: Request) -> Response:
    user_id = params.user_header(request)
    key = params.idempotency_key_header(request)
    body = await params.json_object(request, MANUAL_FIELDS)
    park_id = body.get("park_id")
    if not isinstance(park_id, str) or not is_park_id(park_id):
        raise ApiError("invalid_request", "park_id must be 1-64 letters, digits, _ or -")
    raw_amount = body.get("amount")
    if not isinstance(raw_amount, str):
        raise ApiError("invalid_request", 'amount must be a decimal string such as "250.00"')
    try:
        amount = parse_money(raw_amount)
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None
    req = manual.ManualRequest(
        park_id=park_id,
        amount=amount,
        reason=_reason(body.get("reason"), "reason"),
        user_id=user_id,
        idempotency_key=key,
        request_id=request_id_of(request),
        client=client_details(request),
    )
    async with pool_of(request).connection() as conn:
        try:
            accepted = await manual.request(conn, settings_of(request), req)
        except instant.Refused as refusal:
            raise _refused(refusal) from None
    return JSONResponse(
        views.payout_json(accepted.payout), status_code=200 if accepted.replay else 201
    )


async def _decide(request: Request, approve: bool) -> Response:
    user_id = params.user_header(request)
    payout_id = _manual_payout_id(request)
    reason = None
    if approve:
        await params.json_object(request, set())
    else:
        body = await params.json_object(request, {"reason"})
        reason = _reason(body.get("reason"), "reason")
    decision = manual.Decision(
        payout_id=payout_id,
        user_id=user_id,
        request_id=request_id_of(request),
        reason=reason,
        client=client_details(request),
    )
    use_case = manual.approve if approve else manual.deny
    async with pool_of(request).connection() as conn:
        try:
            row = await use_case(conn, settings_of(request), decision)
        except manual.NotFound:
            raise ApiError("payout_not_found", "no such manual payout") from None
        except instant.Refused as refusal:
            raise _refused(refusal) from None
    return JSONResponse(views.payout_json(row))


async def post_approve(request: Request) -> Response:
    return await _decide(request, approve=True)


async def post_deny(request: Request) -> Response:
    return await _decide(request, approve=False)


def _is_status(value: str) -> bool:
    return value in {str(s) for s in Status}


def _is_kind(value: str) -> bool:
    return value in KINDS


async def list_admin_payouts(request: Request) -> Response:
    limit = params.limit_param(request)
    filters = manual.Filters(
        park_id=params.query_value(request, "park_id", is_park_id, "a park id"),
        status=params.query_value(request, "status", _is_status, "a payout status"),
        kind=params.query_value(request, "kind", _is_kind, "instant, periodic or manual"),
        since=params.time_param(request, "since"),
        until=params.time_param(request, "until"),
    )
    pager = cursors.Pager(cursors.key_for(settings_of(request)), "admin_payouts")
    after = pager.after(request.query_params.get("cursor"), (params.parse_time, uuid.UUID))
    async with admin_pool_of(request).connection() as conn:
        rows = await manual.page(conn, filters, limit=limit + 1, after=after)
    rows, cursor = pager.page(rows, limit, "created_at", "id")
    return JSONResponse({"payouts": [views.payout_json(r) for r in rows], "next_cursor": cursor})


ROUTES += [
    ADMIN.route("/v1/admin/payouts", post_manual, methods=["POST"], audited=manual.ACTION_REQUEST),
    ADMIN.route("/v1/admin/payouts", list_admin_payouts, methods=["GET"]),
    ADMIN.route(
        "/v1/admin/payouts/{payout_id}/approve",
        post_approve,
        methods=["POST"],
        audited=manual.ACTION_APPROVE,
    ),
    ADMIN.route(
        "/v1/admin/payouts/{payout_id}/deny",
        post_deny,
        methods=["POST"],
        audited=manual.ACTION_DENY,
    ),
]
