"""Request plumbing: request ids, authentication, headers, bodies, cursors, JSON."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.domain import format_money, is_park_id, is_visible_ascii
from service.settings import Settings
from service.web.errors import ApiError

MAX_BODY_BYTES = 16 * 1024


class RequestIdMiddleware:
    """Every response carries X-Request-Id: the caller's if usable, else a new one.

    Pure ASGI and outermost, so even a 500 from the error middleware has it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if is_visible_ascii(given, 128) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id(request: Request) -> str:
    return str(request.state.request_id)


def authenticate(request: Request, settings: Settings, scope: Literal["api", "admin"]) -> None:
    """Bearer token check; constant time, and every configured token is compared."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError("unauthorized", "missing or malformed Authorization: Bearer token")
    presented = token.strip().encode()
    is_api = _matches(presented, settings.api_tokens)
    is_admin = _matches(presented, settings.admin_tokens)
    if not (is_api or is_admin):
        raise ApiError("unauthorized", "unknown token")
    if (scope == "admin" and not is_admin) or (scope == "api" and not is_api):
        raise ApiError("forbidden", f"this token is not valid for {scope} endpoints")


def _matches(presented: bytes, tokens: tuple[str, ...]) -> bool:
    found = False
    for token in tokens:
        # No early exit: the time taken does not tell which token matched.
        found |= hmac.compare_digest(presented, token.encode())
    return found


def header(request: Request, name: str, check: Callable[[str], bool], what: str) -> str:
    value = request.headers.get(name)
    if value is None:
        raise ApiError("invalid_request", f"missing header {name}")
    if not check(value):
        raise ApiError("invalid_request", f"malformed header {name}: {what}")
    return value


def optional_header(request: Request, name: str, check: Callable[[str], bool]) -> str | None:
    """The header if present and well-formed, else None (for the audit of a refusal)."""
    value = request.headers.get(name)
    return value if value is not None and check(value) else None


def is_user_id(value: str) -> bool:
    return is_visible_ascii(value, 128)


def is_idempotency_key(value: str) -> bool:
    return is_visible_ascii(value, 128)


def park_header(request: Request) -> str:
    return header(request, "X-Park-Id", is_park_id, "1-64 letters, digits, _ or -")


def user_header(request: Request) -> str:
    return header(request, "X-User-Id", is_user_id, "1-128 visible ASCII characters")


def idempotency_key_header(request: Request) -> str:
    return header(request, "Idempotency-Key", is_idempotency_key, "1-128 visible ASCII characters")


def park_path(request: Request) -> str:
    park_id = str(request.path_params["park_id"])
    if not is_park_id(park_id):
        raise ApiError("invalid_request", "park id must be 1-64 letters, digits, _ or -")
    return park_id


async def json_object(
    request: Request, allowed: set[str], *, decimals: bool = True
) -> dict[str, Any]:
    """The body as a JSON object with known fields only; empty body means {}.

    With `decimals`, JSON numbers become Decimal, never float (money paths);
    pass-through documents (park params) keep plain JSON numbers.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise ApiError("invalid_request", f"body over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError("invalid_request", f"body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(
            raw, parse_float=Decimal if decimals else _finite_float, parse_constant=_no_constant
        )
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError("invalid_request", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError("invalid_request", "unknown fields", {"fields": unknown[:10]})
    return body


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON text, but not a storable number
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def limit_param(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError("invalid_request", "limit must be an integer from 1 to 100")
    return int(raw)


def encode_cursor(*parts: Any) -> str:
    raw = json.dumps([_plain(p) for p in parts], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(
    raw: str | None, kinds: tuple[Callable[[Any], Any], ...]
) -> tuple[Any, ...] | None:
    """Decode a cursor we issued; anything else is a 400."""
    if raw is None:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not isinstance(data, list) or len(data) != len(kinds):
            raise ValueError("wrong shape")
        return tuple(kind(value) for kind, value in zip(kinds, data, strict=True))
    except (ValueError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError):
        raise ApiError("invalid_request", "cursor was not issued by this API") from None


def parse_time(raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise ValueError("not a timestamp")
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return value


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def money(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None


def payout_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "park_id": row["park_id"],
        "kind": row["kind"],
        "status": row["status"],
        "requested_amount": money(row["requested_amount"]),
        "amount": money(row["amount"]),
        "currency": row["currency"],
        "billing_payout_id": row["billing_payout_id"],
        "failure_code": row["failure_code"],
        # While retries go on, the column holds the last transient problem
        # for support; the client sees a failure message only on a failure.
        "failure_message": row["failure_message"] if row["status"] == "failed" else None,
        "requested_by": row["requested_by"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
        "completed_at": timestamp(row["completed_at"]),
    }
