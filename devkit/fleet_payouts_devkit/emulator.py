"""In-memory Billing emulator: a real HTTP server implementing SPEC section 4.

It exists so that ``dev`` and the tests can exercise the service against something
that behaves like Billing over the wire, including its nastiest failure modes, and
so that tests can check exactly-once delivery from Billing's side (``/admin/payouts``).

Contract endpoints (``/v1/...``) follow SPEC section 4. Choices the SPEC leaves open:

* Idempotency (SPEC section 4). Requests with one key are decided once: the
  first request with a key to be decided fixes the answer, a payout or a
  refusal (``404 park_not_found``, ``409 insufficient_funds``,
  ``422 currency_mismatch``), and every later request with that key and the
  same body gets that same answer, so a refused order never moves money later
  (a copy of it delayed in the network included). Another body under a
  decided key gets ``422 idempotency_key_reused``. Bodies are compared on
  park_id, amount (as Decimal, so "100" equals "100.00"), currency and params.
  A malformed request (``400``) decides nothing.
* Faults (``PUT /admin/faults``) apply to contract endpoints only, in this order:
  ``latency_ms`` is slept before anything else; then one random number ``r``
  per request picks ``error_rate`` (503 ``unavailable``, nothing done), then
  ``throttle_rate`` (429 ``rate_limited`` with ``Retry-After: <retry_after_s>``,
  1 by default, nothing done), then
  ``timeout_rate`` (sleep ``timeout_hang_ms`` and THEN handle the request
  normally: a client that gave up may still see its payout applied later, the
  realistic "outcome unknown"). The bands are laid end to end on [0, 1), so the
  rates add up; if their sum exceeds 1 the later bands are cut short.
  ``apply_then_fail_rate`` (``POST /v1/payouts`` only) is drawn separately and
  only when a payout is freshly executed: the money moves, the key is bound,
  and the answer is 500 ``internal_error``. A retry with the same key and body
  then replays the stored payout with 200, which is what lets a caller recover.
* Auth. With a token configured, every contract request needs
  ``Authorization: Bearer <token>`` (401 ``unauthorized``); admin endpoints never
  need one.
* Stats. Contract requests are counted on arrival, before auth and faults,
  whatever their outcome; ``max_rps_1s`` is the largest number of arrivals in
  any one-second sliding window. ``GET /admin/requests`` lists the latest
  ``REQUEST_LOG_SIZE`` of them (arrival time on the emulator's monotonic clock,
  method, path, status), for tests of *when* calls arrived.
* Reconciliation. ``GET /v1/payouts?since&until&limit&cursor`` lists the
  payouts made in [since, until), oldest first, with their idempotency keys.
  Payouts are kept in the order they were made, which is creation-time order
  (the emulator does not model a wall clock stepping back). Drift to find:
  ``POST /admin/payouts`` records a payout made outside the service (balances
  are left alone: the money left by another road), ``DELETE /admin/payouts/{K}``
  makes Billing forget one.

All state lives in one :class:`EmulatorState` on ``app.state.emulator``. The
server runs one event loop and every check-then-mutate sequence runs without an
``await`` in between, so concurrent requests cannot interleave inside one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import bisect
import hmac
import json
import os
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.billing.contract import KEY_RE, MAX_LIST_LIMIT, MAX_SELECT_PARK_IDS, BillingCode, Path
from service.core.invariant import InvariantError
from service.core.values import parse_timestamp

__all__ = ["EmulatorState", "Faults", "RateStats", "create_app", "main", "run"]

REQUEST_LOG_SIZE = 100_000
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_CURRENCY = "RUB"
CENT = Decimal("0.01")

# ASCII digits only: ``\d`` would also accept e.g. Arabic-Indic digits, which Decimal parses.
_AMOUNT_RE = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]{1,2})?")
_MAX_ID_LEN = 255
_MAX_CURRENCY_LEN = 16

Handler = Callable[[Request], Awaitable[Response]]


class InvalidRequest(Exception):
    """Bad input from the client; always answered with 400 ``invalid_request``."""


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _money(value: Decimal) -> str:
    """Money leaves the emulator as a string with exactly two decimals, never a number."""
    return f"{value.quantize(CENT):f}"


_RFC3339_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime(_RFC3339_FORMAT)


def _parse_timestamp(value: str | None, name: str) -> str | None:
    """An RFC 3339 timestamp with a zone, in the fixed form created_at has (so it sorts)."""
    if value is None:
        return None
    try:
        at = parse_timestamp(value)
    except ValueError as exc:
        raise InvalidRequest(f"{name} must be an RFC 3339 timestamp: {exc}") from None
    return at.astimezone(UTC).strftime(_RFC3339_FORMAT)


def _encode_cursor(payout: Payout) -> str:
    raw = json.dumps([payout.created_at, payout.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        created_at, payout_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequest("cursor is not one this server issued") from None
    if not isinstance(created_at, str) or not isinstance(payout_id, str):
        raise InvalidRequest("cursor is not one this server issued")
    return created_at, payout_id


def _parse_limit(value: str | None) -> int:
    if value is None:
        return MAX_LIST_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIST_LIMIT:
        raise InvalidRequest(f"limit must be a whole number in [1, {MAX_LIST_LIMIT}]")
    return int(value)


def _parse_amount(
    value: object, name: str, *, allow_zero: bool, allow_negative: bool = False
) -> Decimal:
    """Parse a money string strictly: JSON numbers and exponents are refused, as in SPEC §2.

    Only a balance may be negative (an overdrawn park, set through the admin API).
    """
    if not isinstance(value, str) or not _AMOUNT_RE.fullmatch(value):
        raise InvalidRequest(f"{name} must be a decimal string with at most 2 fractional digits")
    amount = Decimal(value)
    if allow_negative:
        return amount
    if amount < 0 or (amount == 0 and not allow_zero):
        raise InvalidRequest(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return amount


def _parse_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_ID_LEN:
        raise InvalidRequest(f"{name} must be a string of 1-{_MAX_ID_LEN} characters")
    return value


def _parse_currency(value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= _MAX_CURRENCY_LEN:
        raise InvalidRequest(f"currency must be a string of 1-{_MAX_CURRENCY_LEN} characters")
    return value


async def _json_object(request: Request) -> dict[str, Any]:
    """Read a JSON object body; anything else is the client's fault, never a 500."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InvalidRequest("body too large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise InvalidRequest("body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def _reject_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(unknown)}")


@dataclass
class Balance:
    park_id: str
    available: Decimal
    currency: str

    def to_json(self) -> dict[str, str]:
        return {
            "park_id": self.park_id,
            "available": _money(self.available),
            "currency": self.currency,
        }


@dataclass(frozen=True)
class PayoutRequest:
    """The part of a payout body that decides whether a key replay is the same request."""

    park_id: str
    amount: Decimal
    currency: str
    params: dict[str, Any]
    # Our revenue out of `amount` (SPEC 8); the park receives amount - fee.
    fee: Decimal | None = None


@dataclass
class Payout:
    id: str
    idempotency_key: str
    request: PayoutRequest
    created_at: str
    # Set when the bank sent the payout back (POST /admin/payouts/{K}/return).
    return_code: str | None = None
    returned_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "park_id": self.request.park_id,
            "amount": _money(self.request.amount),
            "currency": self.request.currency,
            "status": "done" if self.return_code is None else "returned",
            "created_at": self.created_at,
        }
        if self.request.fee is not None:
            body["fee"] = _money(self.request.fee)
        if self.return_code is not None:
            body["return_code"] = self.return_code
            body["returned_at"] = self.returned_at
        return body

    def to_listed_json(self) -> dict[str, Any]:
        """As GET /v1/payouts lists it: with the key it was made under."""
        return {**self.to_json(), "idempotency_key": self.idempotency_key}

    def to_admin_json(self) -> dict[str, Any]:
        """Admin view: adds what exactly-once checks need (the key, and the params passed)."""
        return {**self.to_listed_json(), "params": self.request.params}


@dataclass
class Faults:
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    timeout_rate: float = 0.0
    apply_then_fail_rate: float = 0.0
    latency_ms: float = 0
    timeout_hang_ms: float = 10000
    # The Retry-After sent with the throttle_rate 429s, in seconds.
    retry_after_s: float = 1

    RATES = ("error_rate", "throttle_rate", "timeout_rate", "apply_then_fail_rate")
    DURATIONS = ("latency_ms", "timeout_hang_ms")
    SECONDS = ("retry_after_s",)
    MAX_DURATION_MS = 600_000
    MAX_SECONDS = 3600

    def update(self, data: dict[str, Any]) -> None:
        """Apply a partial update atomically: validate everything before changing anything."""
        _reject_unknown(data, {*self.RATES, *self.DURATIONS, *self.SECONDS})
        changes: dict[str, float] = {}
        for name, value in data.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"{name} must be a number")
            if name in self.RATES and not 0.0 <= value <= 1.0:
                raise InvalidRequest(f"{name} must be in [0, 1]")
            if name in self.DURATIONS and not 0 <= value <= self.MAX_DURATION_MS:
                raise InvalidRequest(f"{name} must be in [0, {self.MAX_DURATION_MS}]")
            if name in self.SECONDS and not 0 <= value <= self.MAX_SECONDS:
                raise InvalidRequest(f"{name} must be in [0, {self.MAX_SECONDS}]")
            changes[name] = value
        for name, value in changes.items():
            setattr(self, name, value)

    def retry_after_header(self) -> str:
        # HTTP's Retry-After is whole seconds; a fraction is kept for fast tests.
        value = float(self.retry_after_s)
        return str(int(value)) if value.is_integer() else f"{value:g}"

    def to_json(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in (*self.RATES, *self.DURATIONS, *self.SECONDS)}


@dataclass
class RateStats:
    """Counts requests and the peak number of them in any one-second sliding window.

    ``window`` holds the arrival times of the last second only, so each arrival costs
    O(1) amortized. The busiest window always ends at some arrival, so checking the
    window's size at each arrival finds the maximum.
    """

    requests: int = 0
    max_rps_1s: int = 0
    window: deque[float] = field(default_factory=deque)

    def record(self, now: float) -> None:
        self.requests += 1
        self.window.append(now)
        while now - self.window[0] >= 1.0:
            self.window.popleft()
        self.max_rps_1s = max(self.max_rps_1s, len(self.window))

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "max_rps_1s": self.max_rps_1s}


@dataclass(frozen=True)
class LoggedRequest:
    at: float  # arrival, on the emulator's monotonic clock
    method: str
    path: str
    status: int

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "method": self.method, "path": self.path, "status": self.status}


class EmulatorState:
    """Everything Billing knows; ``reset`` returns it to a blank slate between tests."""

    def __init__(self, token: str | None = None, rng: random.Random | None = None) -> None:
        self.token = token
        self.rng = rng or random.Random()
        self.balances: dict[str, Balance] = {}
        self.payouts_by_key: dict[str, Payout] = {}
        # Keys whose first decided request was refused: the body and the answer.
        self.refusals_by_key: dict[str, tuple[PayoutRequest, int, str, str]] = {}
        self.executed: list[Payout] = []
        self.faults = Faults()
        self.stats = RateStats()
        self.request_log: deque[LoggedRequest] = deque(maxlen=REQUEST_LOG_SIZE)
        # GET /v1/returns: every return in the order it was recorded; the
        # cursor is the position after the last one read.
        self.returns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.returns.clear()
        self.balances.clear()
        self.payouts_by_key.clear()
        self.refusals_by_key.clear()
        self.executed.clear()
        self.faults = Faults()
        self.stats = RateStats()
        self.request_log.clear()

    def list_made(
        self, since: str | None, until: str | None, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[Payout], str | None]:
        """Payouts made in [since, until) after the cursor, in (created_at, id) order.

        ``executed`` is in creation order; payouts made in the same microsecond
        are ordered by id, so a page boundary between them is exact.
        """
        start = since or ""
        if after is not None and after[0] > start:
            start = after[0]
        i = bisect.bisect_left(self.executed, start, key=lambda p: p.created_at)
        page: list[Payout] = []
        while i < len(self.executed) and len(page) <= limit:
            created_at = self.executed[i].created_at
            if until is not None and created_at >= until:
                break
            same = []
            while i < len(self.executed) and self.executed[i].created_at == created_at:
                same.append(self.executed[i])
                i += 1
            page.extend(
                p
                for p in sorted(same, key=lambda p: p.id)
                if after is None or (p.created_at, p.id) > after
            )
        if len(page) > limit:
            return page[:limit], _encode_cursor(page[limit - 1])
        return page, None

    def record_outside_payout(self, key: str, req: PayoutRequest) -> Payout | None:
        """A payout made outside the service under `key`; None if the key is taken."""
        if key in self.payouts_by_key:
            return None
        payout = Payout(
            id=str(uuid.uuid4()), idempotency_key=key, request=req, created_at=_now_rfc3339()
        )
        self.payouts_by_key[key] = payout
        self.executed.append(payout)
        return payout

    def return_payout(self, key: str, code: str) -> Payout | None:
        """The bank sent the payout made under `key` back: the amount is the park's
        again, and the returns feed says so. None if no such payout (or returned already)."""
        payout = self.payouts_by_key.get(key)
        if payout is None or payout.return_code is not None:
            return None
        payout.return_code = code
        payout.returned_at = _now_rfc3339()
        balance = self.balances.get(payout.request.park_id)
        if balance is not None:
            balance.available += payout.request.amount
        self.returns.append(
            {"idempotency_key": key, "code": code, "returned_at": payout.returned_at}
        )
        return payout

    def record_outside_return(self, key: str, code: str) -> None:
        """A return under a key this Billing made no payout for (drift to report)."""
        self.returns.append({"idempotency_key": key, "code": code, "returned_at": _now_rfc3339()})

    def forget_payout(self, key: str) -> Payout | None:
        """Billing loses the payout made under `key` (drift for reconciliation to find)."""
        payout = self.payouts_by_key.pop(key, None)
        if payout is not None:
            self.executed.remove(payout)
        return payout

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Starlette decodes headers as latin-1, so this recovers the raw bytes; bytes
        # (unlike str) can be compared in constant time whatever characters they hold.
        return hmac.compare_digest(supplied.encode("latin-1"), self.token.encode("utf-8"))

    def _refusal(self, req: PayoutRequest) -> tuple[int, str, str] | None:
        """Why Billing refuses this order for good, or None if it can be paid."""
        balance = self.balances.get(req.park_id)
        if balance is None:
            return 404, BillingCode.PARK_NOT_FOUND, f"unknown park {req.park_id!r}"
        if req.currency != balance.currency:
            return (
                422,
                BillingCode.CURRENCY_MISMATCH,
                f"park {req.park_id!r} is in {balance.currency}",
            )
        if req.amount > balance.available:
            return 409, BillingCode.INSUFFICIENT_FUNDS, f"available {_money(balance.available)}"
        return None

    def execute_payout(self, key: str, req: PayoutRequest) -> tuple[Response, Payout | None]:
        """Check and apply one payout order; returns the answer and the payout if money moved.

        Runs without awaiting, which is what makes it atomic on the event loop.
        """
        existing = self.payouts_by_key.get(key)
        refused = self.refusals_by_key.get(key)
        decided = existing.request if existing is not None else refused[0] if refused else None
        if decided is not None and decided != req:
            return _error(
                422, BillingCode.IDEMPOTENCY_KEY_REUSED, "key already used with a different body"
            ), None
        if existing is not None:
            return JSONResponse(existing.to_json()), None
        if refused is not None:
            return _error(*refused[1:]), None
        refusal = self._refusal(req)
        if refusal is not None:
            self.refusals_by_key[key] = (req, *refusal)
            return _error(*refusal), None
        balance = self.balances[req.park_id]
        balance.available -= req.amount
        payout = Payout(
            id=str(uuid.uuid4()), idempotency_key=key, request=req, created_at=_now_rfc3339()
        )
        self.payouts_by_key[key] = payout
        self.executed.append(payout)
        return JSONResponse(payout.to_json()), payout


def _state(request: Request) -> EmulatorState:
    state = request.app.state.emulator
    if not isinstance(state, EmulatorState):
        raise InvariantError("isinstance(state, EmulatorState)")
    return state


def _handles_bad_input(handler: Handler) -> Handler:
    """Turn :class:`InvalidRequest` into a 400 so bad input never becomes a 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            return _error(400, BillingCode.INVALID_REQUEST, str(exc))

    return wrapped


def _contract(handler: Handler) -> Handler:
    """Wrap a ``/v1`` endpoint: count it, inject latency, check auth, then maybe fail it."""
    inner = _handles_bad_input(handler)

    async def wrapped(request: Request) -> Response:
        state = _state(request)
        arrived = time.monotonic()
        state.stats.record(arrived)
        response = await answer(request, state)
        state.request_log.append(
            LoggedRequest(arrived, request.method, request.url.path, response.status_code)
        )
        return response

    async def answer(request: Request, state: EmulatorState) -> Response:
        try:
            # Read (and cache) the body on arrival, as a real server would have it before
            # stalling: otherwise a client gone during a timeout hang would lose its order.
            await request.body()
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; never delivered
        faults = state.faults
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if not state.authorized(request):
            return _error(401, BillingCode.UNAUTHORIZED, "missing or wrong bearer token")
        roll = state.rng.random()
        if roll < faults.error_rate:
            return _error(503, "unavailable", "injected fault: error_rate")
        roll -= faults.error_rate
        if roll < faults.throttle_rate:
            return _error(
                429,
                BillingCode.RATE_LIMITED,
                "injected fault: throttle_rate",
                headers={"Retry-After": faults.retry_after_header()},
            )
        roll -= faults.throttle_rate
        if roll < faults.timeout_rate:
            # Hang, then do the work anyway: the caller has likely given up by now.
            await asyncio.sleep(faults.timeout_hang_ms / 1000)
        return await inner(request)

    return wrapped


# --- contract endpoints ------------------------------------------------------------------


@_contract
async def get_balance(request: Request) -> Response:
    park_id = _parse_id(request.query_params.get("park_id"), "park_id")
    balance = _state(request).balances.get(park_id)
    if balance is None:
        return _error(404, BillingCode.PARK_NOT_FOUND, f"unknown park {park_id!r}")
    return JSONResponse(balance.to_json())


@_contract
async def select_balances(request: Request) -> Response:
    data = await _json_object(request)
    _reject_unknown(data, {"park_ids"})
    park_ids = data.get("park_ids")
    if not isinstance(park_ids, list):
        raise InvalidRequest("park_ids must be a list")
    if len(park_ids) > MAX_SELECT_PARK_IDS:
        raise InvalidRequest(f"at most {MAX_SELECT_PARK_IDS} park_ids per call")
    wanted = [_parse_id(p, "park_ids[]") for p in park_ids]
    balances = _state(request).balances
    found = [balances[p].to_json() for p in dict.fromkeys(wanted) if p in balances]
    return JSONResponse({"balances": found})


@_contract
async def create_payout(request: Request) -> Response:
    key = request.headers.get("idempotency-key")
    if key is None or not KEY_RE.fullmatch(key):
        raise InvalidRequest("Idempotency-Key header (1-255 visible ASCII characters) is required")
    data = await _json_object(request)
    _reject_unknown(data, {"park_id", "amount", "currency", "params", "fee"})
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise InvalidRequest("params must be an object")
    amount = _parse_amount(data.get("amount"), "amount", allow_zero=False)
    fee = None
    if data.get("fee") is not None:
        fee = _parse_amount(data["fee"], "fee", allow_zero=True)
        if fee > amount:
            raise InvalidRequest("fee must not exceed amount")
    req = PayoutRequest(
        park_id=_parse_id(data.get("park_id"), "park_id"),
        amount=amount,
        currency=_parse_currency(data.get("currency")),
        params=params,
        fee=fee,
    )
    state = _state(request)
    response, executed = state.execute_payout(key, req)
    if executed is not None and state.rng.random() < state.faults.apply_then_fail_rate:
        return _error(500, "internal_error", "injected fault: apply_then_fail_rate")
    return response


@_contract
async def get_payout(request: Request) -> Response:
    key = request.path_params["key"]
    payout = _state(request).payouts_by_key.get(key)
    if payout is None:
        return _error(404, BillingCode.PAYOUT_NOT_FOUND, "no payout was made with this key")
    return JSONResponse(payout.to_json())


@_contract
async def list_made_payouts(request: Request) -> Response:
    query = request.query_params
    since = _parse_timestamp(query.get("since"), "since")
    until = _parse_timestamp(query.get("until"), "until")
    after = _decode_cursor(query.get("cursor"))
    limit = _parse_limit(query.get("limit"))
    page, next_cursor = _state(request).list_made(since, until, after, limit)
    return JSONResponse({"payouts": [p.to_listed_json() for p in page], "next_cursor": next_cursor})


@_contract
async def list_returns(request: Request) -> Response:
    query = request.query_params
    raw_after = query.get("after")
    if raw_after is None or raw_after == "":
        after = 0
    elif raw_after.isascii() and raw_after.isdigit() and len(raw_after) <= 18:
        after = int(raw_after)
    else:
        raise InvalidRequest("after must be a cursor this endpoint issued")
    limit = _parse_limit(query.get("limit"))
    returns = _state(request).returns
    page = returns[after : after + limit]
    return JSONResponse({"returns": page, "next_cursor": str(after + len(page))})


# --- admin endpoints (no auth, no faults, not counted) -----------------------------------


@_handles_bad_input
async def post_return(request: Request) -> Response:
    data = await _json_object(request)
    _reject_unknown(data, {"code"})
    code = data.get("code")
    if not isinstance(code, str) or not KEY_RE.fullmatch(code) or len(code) > 100:
        raise InvalidRequest("code must be 1-100 visible ASCII characters")
    key = request.path_params["key"]
    state = _state(request)
    payout = state.return_payout(key, code)
    if payout is None:
        if key in state.payouts_by_key:
            return _error(409, "already_returned", "this payout was returned already")
        return _error(404, BillingCode.PAYOUT_NOT_FOUND, "no payout was made with this key")
    return JSONResponse(payout.to_admin_json())


@_handles_bad_input
async def post_outside_return(request: Request) -> Response:
    """A return under a key Billing made no payout for through us (drift to report)."""
    data = await _json_object(request)
    _reject_unknown(data, {"code", "idempotency_key"})
    code, key = data.get("code"), data.get("idempotency_key")
    if not isinstance(code, str) or not KEY_RE.fullmatch(code) or len(code) > 100:
        raise InvalidRequest("code must be 1-100 visible ASCII characters")
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise InvalidRequest("idempotency_key must be 1-255 visible ASCII characters")
    _state(request).record_outside_return(key, code)
    return JSONResponse({"idempotency_key": key, "code": code}, status_code=201)


@_handles_bad_input
async def put_balance(request: Request) -> Response:
    park_id = _parse_id(request.path_params["park_id"], "park_id")
    data = await _json_object(request)
    _reject_unknown(data, {"available", "currency"})
    available = _parse_amount(
        data.get("available"), "available", allow_zero=True, allow_negative=True
    )
    state = _state(request)
    current = state.balances.get(park_id)
    if "currency" in data:
        currency = _parse_currency(data["currency"])
    else:
        currency = current.currency if current is not None else DEFAULT_CURRENCY
    balance = Balance(park_id=park_id, available=available, currency=currency)
    state.balances[park_id] = balance
    return JSONResponse(balance.to_json())


async def get_admin_balance(request: Request) -> Response:
    balance = _state(request).balances.get(request.path_params["park_id"])
    if balance is None:
        return _error(404, BillingCode.PARK_NOT_FOUND, "unknown park")
    return JSONResponse(balance.to_json())


async def list_payouts(request: Request) -> Response:
    return JSONResponse({"payouts": [p.to_admin_json() for p in _state(request).executed]})


@_handles_bad_input
async def post_outside_payout(request: Request) -> Response:
    data = await _json_object(request)
    _reject_unknown(data, {"park_id", "amount", "currency", "idempotency_key"})
    key = data.get("idempotency_key")
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise InvalidRequest("idempotency_key must be 1-255 visible ASCII characters")
    req = PayoutRequest(
        park_id=_parse_id(data.get("park_id"), "park_id"),
        amount=_parse_amount(data.get("amount"), "amount", allow_zero=False),
        currency=_parse_currency(data.get("currency", DEFAULT_CURRENCY)),
        params={},
    )
    payout = _state(request).record_outside_payout(key, req)
    if payout is None:
        return _error(
            409, BillingCode.IDEMPOTENCY_KEY_REUSED, "a payout was already made with this key"
        )
    return JSONResponse(payout.to_admin_json(), status_code=201)


async def delete_payout(request: Request) -> Response:
    payout = _state(request).forget_payout(request.path_params["key"])
    if payout is None:
        return _error(404, BillingCode.PAYOUT_NOT_FOUND, "no payout was made with this key")
    return JSONResponse(payout.to_admin_json())


async def get_requests(request: Request) -> Response:
    log = _state(request).request_log
    return JSONResponse({"requests": [r.to_json() for r in log]})


@_handles_bad_input
async def put_faults(request: Request) -> Response:
    data = await _json_object(request)
    faults = _state(request).faults
    faults.update(data)
    return JSONResponse(faults.to_json())


async def get_faults(request: Request) -> Response:
    return JSONResponse(_state(request).faults.to_json())


async def get_stats(request: Request) -> Response:
    return JSONResponse(_state(request).stats.to_json())


async def reset(request: Request) -> Response:
    _state(request).reset()
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the same JSON error shape as everything else."""
    if not isinstance(exc, HTTPException):
        raise InvariantError("isinstance(exc, HTTPException)")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"code": code, "message": str(exc.detail)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def create_app(token: str | None = None, *, seed: int | None = None) -> Starlette:
    """Build a fresh emulator; ``token`` enables bearer auth, ``seed`` makes faults repeatable."""
    routes = [
        Route(Path.BALANCE, get_balance, methods=["GET"]),
        Route(Path.BALANCES_SELECT, select_balances, methods=["POST"]),
        Route(Path.PAYOUTS, create_payout, methods=["POST"]),
        Route(Path.PAYOUTS, list_made_payouts, methods=["GET"]),
        Route(Path.PAYOUT, get_payout, methods=["GET"]),
        Route("/admin/balances/{park_id}", put_balance, methods=["PUT"]),
        Route("/admin/balances/{park_id}", get_admin_balance, methods=["GET"]),
        Route("/admin/payouts", list_payouts, methods=["GET"]),
        Route("/admin/payouts", post_outside_payout, methods=["POST"]),
        Route("/admin/payouts/{key}", delete_payout, methods=["DELETE"]),
        Route("/admin/payouts/{key}/return", post_return, methods=["POST"]),
        Route("/admin/returns", post_outside_return, methods=["POST"]),
        Route(Path.RETURNS, list_returns, methods=["GET"]),
        Route("/admin/faults", put_faults, methods=["PUT"]),
        Route("/admin/faults", get_faults, methods=["GET"]),
        Route("/admin/stats", get_stats, methods=["GET"]),
        Route("/admin/requests", get_requests, methods=["GET"]),
        Route("/admin/reset", reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.emulator = EmulatorState(token=token or None, rng=random.Random(seed))
    return app


def run(host: str = "127.0.0.1", port: int = 8081, token: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn handles both and shuts down gracefully).

    ``token`` defaults to ``$BILLING_TOKEN`` so that ``fleet-payouts billing-emulator``
    and ``python -m`` behave the same.
    """
    if token is None:
        token = os.environ.get("BILLING_TOKEN") or None
    uvicorn.run(
        create_app(token),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # A request parked in an injected timeout hang must not hold up shutdown for long.
        timeout_graceful_shutdown=2,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Billing emulator (SPEC section 4).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    run(host=args.host, port=args.port)


if __name__ == "__main__":
    main()
