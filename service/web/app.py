"""`fleet-payouts serve`: the HTTP API of SPEC section 3.

Dependencies (settings, pool) are built in the lifespan and reach handlers
through the request state; nothing here is a module global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from service import audit, db, instant, maintenance, parks, payouts
from service.domain import is_park_id, next_periodic_payout_at, parse_money
from service.settings import Settings
from service.web import events as events_web
from service.web import http
from service.web.errors import EXCEPTION_HANDLERS, ApiError
from service.worker.app import app as queue_app

logger = logging.getLogger(__name__)


class State(TypedDict):
    settings: Settings
    pool: db.Pool


def settings_of(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def pool_of(request: Request) -> db.Pool:
    pool: db.Pool = request.state.pool
    return pool


# --- park-scoped -------------------------------------------------------------


async def post_instant(request: Request) -> Response:
    settings = settings_of(request)
    http.authenticate(request, settings, "api")
    req_id = http.request_id(request)
    try:
        park_id = http.park_header(request)
        user_id = http.user_header(request)
        key = http.idempotency_key_header(request)
        body = await http.json_object(request, {"amount"})
        amount = _amount(body.get("amount"))
    except ApiError as error:
        # A malformed press is still a user action on record, with whatever
        # of its headers could be trusted.
        await _audit_malformed_press(request, req_id, error)
        raise
    req = instant.InstantRequest(
        park_id=park_id, user_id=user_id, idempotency_key=key, request_id=req_id, amount=amount
    )
    async with pool_of(request).connection() as conn:
        try:
            accepted = await instant.request_instant(conn, settings, req)
        except instant.Refused as refusal:
            headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
            details = {
                k: (http.timestamp(v) if isinstance(v, datetime) else v)
                for k, v in refusal.details.items()
            }
            raise ApiError(refusal.code, refusal.message, details, headers) from None
    status = 200 if accepted.replay and accepted.payout["status"] != "pending" else 202
    return JSONResponse(http.payout_json(accepted.payout), status_code=status)


async def _audit_malformed_press(request: Request, req_id: str, error: ApiError) -> None:
    park_id = http.optional_header(request, "X-Park-Id", is_park_id)
    async with pool_of(request).connection() as conn, conn.transaction():
        await audit.write(
            conn,
            audit.Entry(
                actor_type="user",
                actor_id=http.optional_header(request, "X-User-Id", http.is_user_id),
                park_id=park_id,
                action=instant.ACTION,
                outcome=error.code,
                request_id=req_id,
                details={
                    "idempotency_key": http.optional_header(
                        request, "Idempotency-Key", http.is_idempotency_key
                    ),
                    "message": error.message,
                },
            ),
        )


def _amount(raw: Any) -> Decimal | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ApiError("invalid_request", 'amount must be a decimal string such as "100.00"')
    try:
        return parse_money(raw)
    except ValueError as exc:
        raise ApiError("invalid_request", str(exc)) from None


async def get_payout(request: Request) -> Response:
    http.authenticate(request, settings_of(request), "api")
    park_id = http.park_header(request)
    try:
        payout_id = uuid.UUID(str(request.path_params["payout_id"]))
    except ValueError:
        raise ApiError("payout_not_found", "no such payout") from None
    async with pool_of(request).connection() as conn:
        row = await payouts.get(conn, payout_id, park_id=park_id)
    if row is None:
        raise ApiError("payout_not_found", "no such payout")
    return JSONResponse(http.payout_json(row))


async def list_payouts(request: Request) -> Response:
    http.authenticate(request, settings_of(request), "api")
    park_id = http.park_header(request)
    limit = http.limit_param(request)
    after = http.decode_cursor(request.query_params.get("cursor"), (http.parse_time, uuid.UUID))
    async with pool_of(request).connection() as conn:
        rows = await payouts.page(conn, park_id, limit=limit + 1, after=after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = http.encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return JSONResponse({"payouts": [http.payout_json(r) for r in rows], "next_cursor": cursor})


async def get_availability(request: Request) -> Response:
    settings = settings_of(request)
    http.authenticate(request, settings, "api")
    park_id = http.park_header(request)
    async with pool_of(request).connection() as conn:
        decision = await instant.availability(conn, settings, park_id)
    if decision is None:
        raise ApiError("park_not_found", f"park {park_id} is not registered")
    hours = settings.instant_cooldown.total_seconds() / 3600
    return JSONResponse(
        {
            "available": decision.available,
            "reason": decision.reason,
            "next_available_at": http.timestamp(decision.next_available_at),
            "max_amount": http.money(settings.payout_max_amount),
            "cooldown_hours": int(hours) if hours.is_integer() else hours,
        }
    )


# --- admin ---------------------------------------------------------------------


async def put_park(request: Request) -> Response:
    settings = settings_of(request)
    http.authenticate(request, settings, "admin")
    park_id = http.park_path(request)
    user_id = http.user_header(request)
    body = await http.json_object(
        request, {"instant_payouts_enabled", "periodic_payouts_enabled", "params"}, decimals=False
    )
    for flag in ("instant_payouts_enabled", "periodic_payouts_enabled"):
        if flag in body and not isinstance(body[flag], bool):
            raise ApiError("invalid_request", f"{flag} must be true or false")
    if "params" in body and not isinstance(body["params"], dict):
        raise ApiError("invalid_request", "params must be a JSON object")
    async with pool_of(request).connection() as conn, conn.transaction():
        row, created = await parks.upsert(
            conn,
            park_id,
            instant=body.get("instant_payouts_enabled"),
            periodic=body.get("periodic_payouts_enabled"),
            params=body.get("params"),
        )
        await audit.write(
            conn,
            audit.Entry(
                actor_type="admin",
                actor_id=user_id,
                park_id=park_id,
                action="park.register" if created else "park.update",
                outcome="ok",
                request_id=http.request_id(request),
                details={"changes": body},
            ),
        )
    return JSONResponse(park_json(row, settings), status_code=201 if created else 200)


async def get_park(request: Request) -> Response:
    settings = settings_of(request)
    http.authenticate(request, settings, "admin")
    park_id = http.park_path(request)
    async with pool_of(request).connection() as conn:
        row = await parks.get(conn, park_id)
    if row is None:
        raise ApiError("park_not_found", f"park {park_id} is not registered")
    return JSONResponse(park_json(row, settings))


def park_json(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    return {
        "park_id": row["park_id"],
        "instant_payouts_enabled": row["instant_payouts_enabled"],
        "periodic_payouts_enabled": row["periodic_payouts_enabled"],
        "params": row["params"],
        "registered_at": http.timestamp(row["registered_at"]),
        "last_payout_at": http.timestamp(row["last_payout_at"]),
        "next_periodic_payout_at": http.timestamp(
            next_periodic_payout_at(
                enabled=row["periodic_payouts_enabled"],
                registered_at=row["registered_at"],
                last_succeeded_at=row["last_payout_at"],
                last_periodic_attempt_at=row["last_periodic_attempt_at"],
                period=settings.payout_period,
            )
        ),
    }


async def get_audit(request: Request) -> Response:
    http.authenticate(request, settings_of(request), "admin")
    q = request.query_params
    limit = http.limit_param(request, default=50)
    try:
        filters = audit.Filters(
            park_id=q.get("park_id") or None,
            actor_id=q.get("actor_id") or None,
            action=q.get("action") or None,
            since=http.parse_time(q["since"]) if q.get("since") else None,
            until=http.parse_time(q["until"]) if q.get("until") else None,
        )
    except ValueError:
        raise ApiError("invalid_request", "since/until must be RFC 3339 timestamps") from None
    after = http.decode_cursor(q.get("cursor"), (http.parse_time, int))
    async with pool_of(request).connection() as conn:
        rows = await audit.page(conn, filters, limit=limit + 1, after=after)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = http.encode_cursor(rows[-1]["at"], rows[-1]["id"]) if more else None
    return JSONResponse({"entries": [audit_json(r) for r in rows], "next_cursor": cursor})


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": http.timestamp(row["at"]),
        "actor_type": row["actor_type"],
        "actor_id": row["actor_id"],
        "park_id": row["park_id"],
        "action": row["action"],
        "outcome": row["outcome"],
        "request_id": row["request_id"],
        "payout_id": str(row["payout_id"]) if row["payout_id"] else None,
        "details": row["details"],
    }


# --- operations ------------------------------------------------------------------


async def ping(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    try:
        async with asyncio.timeout(2):
            async with pool_of(request).connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
    except Exception as exc:
        logger.warning("not ready: %s", exc)
        raise ApiError("unavailable", "the database does not answer") from None
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/v1/payouts/instant", post_instant, methods=["POST"]),
    Route("/v1/payouts/instant/availability", get_availability, methods=["GET"]),
    Route("/v1/payouts/{payout_id}", get_payout, methods=["GET"]),
    Route("/v1/payouts", list_payouts, methods=["GET"]),
    Route("/v1/parks/{park_id}", put_park, methods=["PUT"]),
    Route("/v1/parks/{park_id}", get_park, methods=["GET"]),
    Route("/v1/audit", get_audit, methods=["GET"]),
    Route("/ping", ping, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    *events_web.ROUTES,
]


def create_app(settings: Settings) -> ASGIApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        pool = db.make_pool(settings.database_url, name="api", min_size=2, max_size=20)
        # Open without waiting: /ping must answer even while the database is
        # down, and /ready says whether it is up.
        await pool.open(wait=False)
        gauges = maintenance.gauge_refresher(pool)
        async with queue_app.open_async(pool=pool):
            try:
                yield {"settings": settings, "pool": pool}
            finally:
                await gauges.stop()
        await pool.close()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    return http.RequestIdMiddleware(app)
