"""Park-scoped endpoints (API token): the press, payouts, availability."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.billing.client import Malformed, Rejected, Transient
from service.core import observability
from service.core.values import parse_money
from service.payouts import cancel, instant
from service.payouts import store as payouts
from service.web import cursors, params, views
from service.web.auth import PARK
from service.web.errors import ApiError, unavailable
from service.web.origin import client_details
from service.web.state import billing_of, pool_of, request_id_of, settings_of


async def post_instant(request: Request) -> Response:
    settings = settings_of(request)
    req_id = request_id_of(request)
    observability.bind(kind="instant")
    # A malformed press is still a user action on record: the route group
    # audits it, with whatever of its headers could be trusted.
    park_id = params.park_header(request)
    user_id = params.user_header(request)
    key = params.idempotency_key_header(request)
    body = await params.json_object(request, {"amount"})
    amount = _amount(body.get("amount"))
    req = instant.InstantRequest(
        park_id=park_id,
        user_id=user_id,
        idempotency_key=key,
        request_id=req_id,
        amount=amount,
        client=client_details(request),
    )
    async with pool_of(request).connection() as conn:
        try:
            accepted = await instant.request_instant(conn, settings, req)
        except instant.Refused as refusal:
            headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
            details = {
                k: (views.timestamp(v) if isinstance(v, datetime) else v)
                for k, v in refusal.details.items()
            }
            # Refusals by the rules are audited by the use case, in its transaction.
            raise ApiError(refusal.code, refusal.message, details, headers, audited=True) from None
    observability.bind(payout_id=str(accepted.payout.id))
    status = 200 if accepted.replay and accepted.payout.status != "pending" else 202
    return JSONResponse(views.payout_json(accepted.payout), status_code=status)


def _amount(raw: Any) -> Decimal | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError("invalid_request", 'amount must be a decimal string such as "100.00"')
    try:
        return parse_money(raw)
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None


def _payout_id(request: Request) -> uuid.UUID:
    """The path's payout id; one that is not a UUID names no payout (404)."""
    try:
        payout_id = uuid.UUID(str(request.path_params["payout_id"]))
    except ValueError:
        raise ApiError("payout_not_found", "no such payout") from None
    observability.bind(payout_id=str(payout_id))
    return payout_id


async def get_payout(request: Request) -> Response:
    park_id = params.park_header(request)
    payout_id = _payout_id(request)
    async with pool_of(request).connection() as conn:
        row = await payouts.get(conn, payout_id, park_id=park_id)
    if row is None:
        raise ApiError("payout_not_found", "no such payout")
    return JSONResponse(views.payout_json(row))


async def list_payouts(request: Request) -> Response:
    park_id = params.park_header(request)
    limit = params.limit_param(request)
    # The park is part of what is signed: a cursor is valid for the list it came from.
    pager = cursors.Pager(cursors.key_for(settings_of(request)), f"payouts/{park_id}")
    after = pager.after(request.query_params.get("cursor"), (params.parse_time, uuid.UUID))
    async with pool_of(request).connection() as conn:
        rows = await payouts.page(conn, park_id, limit=limit + 1, after=after)
    rows, cursor = pager.page(rows, limit, "created_at", "id")
    return JSONResponse({"payouts": [views.payout_json(r) for r in rows], "next_cursor": cursor})


async def get_availability(request: Request) -> Response:
    settings = settings_of(request)
    park_id = params.park_header(request)
    async with pool_of(request).connection() as conn:
        state = await instant.availability(conn, settings, park_id)
    if state is None:
        raise ApiError("park_not_found", f"park {park_id} is not registered")
    decision = state.decision
    return JSONResponse(
        views.availability_json(
            decision.available,
            decision.reason,
            decision.next_available_at,
            settings,
            fee=state.fee,
            subscription_ended=state.subscription_ended and not decision.available,
            instant_payouts_until=state.instant_payouts_until,
        )
    )


async def get_quote(request: Request) -> Response:
    """What a press would order now: amount, fee and net, for Billing's current balance."""
    settings = settings_of(request)
    park_id = params.park_header(request)
    raw = request.query_params.get("amount")
    amount = _amount(raw) if raw is not None else None
    try:
        async with pool_of(request).connection() as conn:
            fee = await instant.fee_terms(conn, park_id)
        split, currency = await instant.quote(billing_of(request), settings, park_id, amount, fee)
    except instant.Refused as refusal:
        raise ApiError(refusal.code, refusal.message, refusal.details) from None
    except Rejected as exc:
        if exc.code == "park_not_found":
            raise ApiError("park_not_found", "Billing does not know this park") from None
        raise unavailable(f"Billing refused the balance read: {exc.code}") from None
    except (Transient, Malformed) as exc:
        raise unavailable(f"Billing's balance is unavailable now: {exc}") from None
    return JSONResponse(
        {
            "amount": views.money(split.amount),
            "fee_amount": views.money(split.fee_amount),
            "net_amount": views.money(split.net_amount),
            "currency": currency,
        }
    )


async def post_cancel(request: Request) -> Response:
    park_id = params.park_header(request)
    user_id = params.user_header(request)
    payout_id = _payout_id(request)
    req = cancel.CancelRequest(
        park_id=park_id,
        payout_id=payout_id,
        user_id=user_id,
        request_id=request_id_of(request),
        client=client_details(request),
    )
    async with pool_of(request).connection() as conn:
        try:
            row = await cancel.cancel(conn, req)
        except cancel.NotFound:
            raise ApiError("payout_not_found", "no such payout", audited=True) from None
        except cancel.NotCancellable as exc:
            raise ApiError(
                "payout_not_cancellable",
                "a worker has already taken this payout",
                {"status": exc.status},
                audited=True,
            ) from None
    return JSONResponse(views.payout_json(row))


ROUTES = [
    PARK.route("/v1/payouts/instant", post_instant, methods=["POST"], audited=instant.ACTION),
    PARK.route("/v1/payouts/instant/availability", get_availability, methods=["GET"]),
    PARK.route("/v1/payouts/instant/quote", get_quote, methods=["GET"]),
    PARK.route("/v1/payouts/{payout_id}", get_payout, methods=["GET"]),
    PARK.route(
        "/v1/payouts/{payout_id}/cancel", post_cancel, methods=["POST"], audited=cancel.ACTION
    ),
    PARK.route("/v1/payouts", list_payouts, methods=["GET"]),
]
