"""The one JSON error shape, and the translation of everything else into it.

{"code": "cooldown_active", "message": "human readable", "details": {...}}
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core.codes import Code
from service.core.invariant import InvariantError

logger = logging.getLogger(__name__)

# The HTTP status of each code (service/core/codes.py); handlers name the code only.
STATUS: dict[str, int] = {
    Code.INVALID_REQUEST: 400,
    Code.UNAUTHORIZED: 401,
    Code.FORBIDDEN: 403,
    Code.INSTANT_PAYOUTS_DISABLED: 403,
    Code.PARK_ON_HOLD: 403,
    Code.SELF_APPROVAL_FORBIDDEN: 403,
    Code.NOT_FOUND: 404,
    Code.PARK_NOT_FOUND: 404,
    Code.PAYOUT_NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    # Answered by the HTTP edge itself (service/web/edge.py), before any route.
    Code.REQUEST_TIMEOUT: 408,
    Code.URI_TOO_LONG: 414,
    Code.HEADERS_TOO_LARGE: 431,
    Code.PAYOUT_IN_PROGRESS: 409,
    Code.PAYOUT_NOT_CANCELLABLE: 409,
    Code.PAYOUT_NOT_PENDING_APPROVAL: 409,
    Code.APPROVAL_PENDING: 409,
    Code.AMOUNT_ABOVE_LIMIT: 422,
    Code.AMOUNT_BELOW_MINIMUM: 422,
    Code.IDEMPOTENCY_KEY_REUSED: 422,
    Code.CURSOR_EXPIRED: 410,
    Code.COOLDOWN_ACTIVE: 429,
    Code.INTERNAL_ERROR: 500,
    Code.UNAVAILABLE: 503,
}

# Answered by the HTTP edge before any route (service/web/edge.py): described once in
# the OpenAPI's info, like not_found and method_not_allowed, not per operation.
EDGE_CODES = frozenset({Code.REQUEST_TIMEOUT, Code.URI_TOO_LONG, Code.HEADERS_TOO_LARGE})

# What a 503 tells the caller to wait before retrying: pool and statement
# timeouts are seconds long, and a database failover takes a few of them.
RETRY_AFTER_SECONDS = 2


class ApiError(Exception):
    """An error answered to the client with a stable code."""

    def __init__(
        self,
        code: Code | str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        *,
        audited: bool = False,
    ) -> None:
        super().__init__(message)
        # ValueError for a code that is not Code's: no answer carries an unlisted code.
        self.code = Code(code)
        self.status = STATUS[self.code]
        self.message = message
        self.details = details or {}
        self.headers = headers or {}
        # The use case already wrote this refusal to the audit log.
        self.audited = audited


def unavailable(message: str) -> ApiError:
    """503 with Retry-After: the request changed nothing, the caller may retry it as it is."""
    return ApiError("unavailable", message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        {"code": error.code, "message": error.message, "details": error.details},
        status_code=error.status,
        headers=error.headers,
    )


async def on_api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):
        raise InvariantError("isinstance(exc, ApiError)")
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise InvariantError("isinstance(exc, HTTPException)")
    if exc.status_code == 405:
        allow = ", ".join(_allowed_methods(request))
        return error_response(
            ApiError("method_not_allowed", "method not allowed here", headers={"Allow": allow})
        )
    if exc.status_code == 404:
        return error_response(ApiError("not_found", "no such endpoint"))
    return error_response(ApiError("invalid_request", str(exc.detail)))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (one path may have a route per method)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.path_regex.match(path):
            methods |= route.methods or set()
    return sorted(methods)


async def on_database_trouble(request: Request, exc: Exception) -> Response:
    # Unreachable, restarting, no pooled connection in time (PoolTimeout is an
    # OperationalError), a statement or lock timeout, the connection lost
    # mid-request, a deadlock: every OperationalError is the database's state,
    # not a bug. Whatever transaction the request had open was rolled back.
    # One warning line per request (no traceback, and no Sentry event: Sentry
    # turns only ERROR records into events); the 5xx ratio alert counts them.
    logger.warning("database unavailable: %s: %s", type(exc).__name__, _first_line(exc))
    return error_response(unavailable("the database is unavailable; retry shortly"))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # Logged with the traceback (and sent to Sentry by its integration); the
    # request id comes from the log context that the middleware set, which
    # is the one the response carries, whether the client sent it or not.
    logger.exception("unhandled error")
    return error_response(ApiError("internal_error", "internal error; quote the X-Request-Id"))


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    HTTPException: on_http_error,
    psycopg.OperationalError: on_database_trouble,
    Exception: on_unexpected,
}
