"""Request parameters: headers, path and query values, JSON bodies, cursors.

Every reader refuses what the database could not store or compare (NUL
bytes, lone surrogates, numbers out of range) with a 400 here, at the edge,
rather than as a 500 from deep inside a query.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from service.core.values import is_park_id, is_visible_ascii, parse_timestamp
from service.parks import admin as park_admin
from service.web.errors import ApiError
from service.web.views import timestamp

MAX_BODY_BYTES = 16 * 1024
# Deepest nesting of arrays and objects a body may have, checked on the raw text
# before parsing: every writer after the parser (the audit entry, the jsonb column,
# Billing's request) recurses, and ~490 levels blew Python's stack as a 500.
# Park params are a flat mapping in practice; 32 levels is far past any real use.
MAX_BODY_DEPTH = 32
# A hold reason: text without control characters, not blank. The rule is the use
# case's (service/parks/admin.py), the API and the console alike; OpenAPI states it.
HOLD_REASON_PATTERN = park_admin.HOLD_REASON_PATTERN
HOLD_REASON_RE = park_admin.HOLD_REASON_RE
# ASCII digits only: str.isdigit() also says yes to "²", which int() refuses.
_LIMIT_RE = re.compile(r"[0-9]{1,3}")
_LENGTH_RE = re.compile(r"[0-9]{1,18}")
# PostgreSQL text and jsonb cannot hold NUL; a lone surrogate is not UTF-8.
_UNSTORABLE_RE = re.compile("[\x00\ud800-\udfff]")


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


def query_value(request: Request, name: str, check: Callable[[str], bool], what: str) -> str | None:
    """An optional query parameter, None when absent or empty; malformed is a 400."""
    value = request.query_params.get(name)
    if not value:
        return None
    if not check(value):
        raise ApiError("invalid_request", f"malformed query parameter {name}: {what}")
    return value


def limit_param(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit", str(default))
    if not _LIMIT_RE.fullmatch(raw) or not 1 <= int(raw) <= 100:
        raise ApiError("invalid_request", "limit must be an integer from 1 to 100")
    return int(raw)


def time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise ApiError("invalid_request", f"{name} must be an RFC 3339 timestamp") from None


async def json_object(
    request: Request, allowed: set[str], *, decimals: bool = True
) -> dict[str, Any]:
    """The body as a JSON object with known fields only; empty body means {}.

    With `decimals`, JSON numbers become Decimal, never float (money paths);
    pass-through documents (park params) keep plain JSON numbers.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (
        not _LENGTH_RE.fullmatch(declared) or int(declared) > MAX_BODY_BYTES
    ):
        raise ApiError("invalid_request", f"body over {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ApiError("invalid_request", f"body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The edge cut a body that did not arrive in time (or the client left):
        # a refusal on record, not an unexpected error.
        raise ApiError("invalid_request", "the request body did not arrive") from None
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    if _depth(raw) > MAX_BODY_DEPTH:
        raise ApiError("invalid_request", f"body nested deeper than {MAX_BODY_DEPTH} levels")
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
    if not _storable(body):
        raise ApiError("invalid_request", "body holds a NUL character or a lone surrogate")
    return body


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text, brackets inside strings not counted.

    One pass over the (size-bounded) body; malformed text gets some number and is
    refused by the parser afterwards.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _storable(value: Any) -> bool:
    """No string anywhere in the document (keys included) that PostgreSQL would refuse."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE_RE.search(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON text, but not a storable number
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def encode_cursor(*parts: Any) -> str:
    raw = json.dumps([_plain(p) for p in parts], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


R = TypeVar("R")


def page(rows: list[R], limit: int, *keys: str) -> tuple[list[R], tuple[Any, ...] | None]:
    """The first `limit` of `limit + 1` rows fetched, and the position after them (the
    values of `keys` in the last row, for the next cursor) if more exist. Rows are
    typed rows (the values are attributes) or mappings (payouts.page's, still)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    if isinstance(last, Mapping):
        return rows, tuple(last[key] for key in keys)
    return rows, tuple(getattr(last, key) for key in keys)


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


def row_id(raw: Any) -> int:
    """An audit entry id inside a cursor: a bigint, nothing else."""
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 < raw < 2**63:
        raise ValueError("not an entry id")
    return raw


# A cursor's and a query's timestamps read as Billing's and ours are written.
parse_time = parse_timestamp


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
