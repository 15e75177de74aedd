"""The Billing HTTP client: SPEC section 4, throttled, measured, errors translated.

Every foreign failure leaves this module as one of three exceptions, so the
payout job decides on meaning, not on status codes:

- ``Rejected``: Billing said no for good (insufficient funds, unknown park...).
  Only the answers in ``DECISIVE`` (SPEC section 4, "Only these answers decide
  an order") are ``Rejected``: Billing's own error body with one of its codes.
- ``Transient``: try again later; for an order the outcome is *unknown*.
- ``Undecided`` (a ``Transient``): something answered, but not with Billing's
  decision (a proxy's 408 or HTML page, a redirect, a bare 404, our token
  refused, a 2xx that is no payout): for an order, still unknown.
- ``Paused`` (a ``Transient``): calls are paused (Billing's Retry-After, or the
  breaker open); nothing was done at Billing. Wait ``retry_after`` seconds:
  waiting out a pause is not a failure.
- ``Malformed``: Billing answered with a balance we cannot use (one park's
  bad data); that park's payout decides, nobody else waits.
- (a ``None`` from ``find_payout``): Billing has no payout under that key.

Every call first passes a ``Gate``: the global budget, the shared pause and the
breaker (``service.billing.gate.SharedGate`` in the workers; ``Budget``, this
process alone, where nothing else calls Billing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol

import aiohttp
from aiolimiter import AsyncLimiter

from service.billing.contract import (
    DECISIVE,
    MAX_LIST_LIMIT,
    MAX_SELECT_PARK_IDS,
    Path,
    payout_path,
)
from service.core import observability
from service.core.values import format_money, format_timestamp, parse_timestamp

logger = logging.getLogger(__name__)

_CURRENCY_RE = re.compile(r"[A-Z]{3}")
# A 429 without a usable Retry-After pauses for this long; a larger one than
# the cap is taken as the cap, so that one bad header cannot stop payouts for days.
DEFAULT_RETRY_AFTER_SECONDS = 1.0
MAX_RETRY_AFTER_SECONDS = 600.0


class BillingError(Exception):
    """Base of the errors the Billing client raises."""


class Rejected(BillingError):
    """Billing refused the request for good; `code` says why."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class Transient(BillingError):
    """Billing could not answer now (5xx, timeout, network); retry later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Undecided(Transient):
    """An answer that is not Billing's decision (see DECISIVE): nothing is known, ask again."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def credentials_refused(self) -> bool:
        """Our BILLING_TOKEN was refused (401/403): an operator must fix it, time won't."""
        return self.status in (401, 403)


class Paused(Transient):
    """Calls to Billing are paused (Retry-After or breaker); nothing was done there.

    Raised before calling Billing while a pause is in force on any host, and
    for the 429 that starts one. Wait ``retry_after`` seconds and try again;
    a pause does not count against a payout's retry window.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after: float = retry_after


class Malformed(BillingError):
    """Billing's answer about one park cannot be used (a bad amount or currency)."""


@dataclasses.dataclass(frozen=True)
class Balance:
    park_id: str
    available: Decimal
    currency: str


@dataclasses.dataclass(frozen=True)
class BillingPayout:
    id: str
    park_id: str
    amount: Decimal
    currency: str
    status: str
    # Given by the list endpoint (reconciliation); the others leave them out.
    idempotency_key: str | None = None
    created_at: datetime | None = None
    # The fee Billing credited to our revenue (SPEC 8), None without one.
    fee: Decimal | None = None
    # Set once the bank sent the payout back (status "returned").
    return_code: str | None = None


@dataclasses.dataclass(frozen=True)
class PayoutPage:
    """One page of GET /v1/payouts; pass next_cursor back for the next one."""

    payouts: list[BillingPayout]
    next_cursor: str | None


@dataclasses.dataclass(frozen=True)
class BillingReturn:
    """A payout the bank sent back, as GET /v1/returns reports it (SPEC section 8)."""

    idempotency_key: str
    code: str
    # None: Billing's time was unreadable; the time we read it stands in.
    returned_at: datetime | None


@dataclasses.dataclass(frozen=True)
class ReturnsPage:
    """One page of the returns feed; pass next_cursor back as `after`."""

    returns: list[BillingReturn]
    next_cursor: str | None


@dataclasses.dataclass(frozen=True)
class Permit:
    """Leave to make one call; a probe's outcome decides the breaker."""

    probe: bool = False


# What became of a call, as the gate needs to know it: Billing answered
# (whatever it said), failed to (5xx, timeout, no connection), or throttled us.
Outcome = Literal["answered", "failed", "throttled"]


class Gate(Protocol):
    """What every call passes before and after it leaves (see module docstring)."""

    async def acquire(self, *, urgent: bool = False) -> Permit:
        """Wait for the budget (an urgent call first); raise Paused while calls are paused."""
        ...

    async def report(
        self, permit: Permit, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        """Tell the gate how the call went (failures feed the breaker, 429s pause)."""
        ...

    async def refresh(self) -> None:
        """Read the shared pause and breaker again (for the gauge of an idle host)."""
        ...


class Budget:
    """BILLING_RPS for this process alone, paced by aiolimiter: for tests, the
    in-process benchmark and any process that is the only one calling Billing.

    Calls are spaced evenly, one token at a time, so there is never a burst;
    a 429 pauses this process for its Retry-After. The workers, which share
    the budget between hosts, use ``service.billing.gate.SharedGate``.
    """

    def __init__(self, total_rps: float) -> None:
        self.total_rps = total_rps
        self._limiter = AsyncLimiter(1, 1 / total_rps)
        self._paused_until = 0.0

    async def acquire(self, *, urgent: bool = False) -> Permit:
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            raise Paused(f"Billing asked us to wait {wait:.1f}s more", retry_after=wait)
        await self._limiter.acquire()
        return Permit()

    async def report(
        self, permit: Permit, outcome: Outcome, *, retry_after: float | None = None
    ) -> None:
        if outcome == "throttled":
            self._paused_until = time.monotonic() + pause_seconds(retry_after)

    async def refresh(self) -> None:
        """Nothing is shared: nothing to read again."""


def pause_seconds(retry_after: float | None) -> float:
    """How long a 429 pauses calls: its Retry-After, within sane bounds."""
    if retry_after is None:
        return DEFAULT_RETRY_AFTER_SECONDS
    return min(retry_after, MAX_RETRY_AFTER_SECONDS)


# Connections the client keeps to Billing, at most (one per call in flight).
MAX_CONNECTIONS = 50
# The largest answer read, after decompression (a page of MAX_LIST_LIMIT payouts is
# ~0.4 MB): a larger one, or a compressed bomb, is not read whole into memory.
MAX_ANSWER_BYTES = 8 * 1024 * 1024
_READ_CHUNK = 64 * 1024


class _AnswerTooLarge(Exception):
    """The answer's body went past MAX_ANSWER_BYTES: not Billing's (see _send)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"an answer larger than {MAX_ANSWER_BYTES} bytes")
        self.status = status


@dataclasses.dataclass
class _Answer:
    """What came back from Billing: status, headers and the whole body, read."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    _parsed: Any = dataclasses.field(default=None, repr=False)
    _parsed_ok: bool = dataclasses.field(default=False, repr=False)

    def json(self) -> Any:
        """The body as JSON (parsed once); ValueError when it is not JSON."""
        if not self._parsed_ok:
            self._parsed = json.loads(self.content)
            self._parsed_ok = True
        return self._parsed

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class BillingClient:
    """Billing's contract over one keep-alive connection pool.

    The transport is aiohttp (tests/bench/http_client.py: about a third of httpx's CPU
    per call for this one POST, which at 1,000 calls/s is most of a worker's budget);
    every rule of what an answer means is this module's own, whatever the transport.
    Redirects are never followed (a 3xx is Undecided), `timeout` bounds each phase
    as httpx's did (the wait for a connection and connecting, then every read of the
    answer), and at most MAX_CONNECTIONS connections are open.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        timeout: float,
        budget: Gate,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # httpx's timeouts, phase by phase: a free connection (pool) and connecting
        # within `timeout` (connect), then each read of the answer (sock_read); and the
        # whole exchange within the sum of its three phases, so that an answer trickled a
        # byte at a time (each read in time) cannot hold a payout forever.
        self._timeout = aiohttp.ClientTimeout(
            total=3 * timeout, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        # Made in the event loop of the first call (aiohttp binds a session to one).
        self._session: aiohttp.ClientSession | None = None
        self.budget = budget

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def balance(self, park_id: str, *, urgent: bool = False) -> Balance:
        """One park's balance; `urgent` (a press, a manual payout) passes the budget first."""
        response = await self._request(
            "balance", "GET", Path.BALANCE, urgent=urgent, params={"park_id": park_id}
        )
        return _balance(response.json())

    async def balances(self, park_ids: Sequence[str]) -> dict[str, Balance]:
        """Balances of up to MAX_SELECT_PARK_IDS parks in one call; unknown parks are left out."""
        if len(park_ids) > MAX_SELECT_PARK_IDS:
            raise ValueError(f"at most {MAX_SELECT_PARK_IDS} parks per call")
        response = await self._request(
            "balances_select", "POST", Path.BALANCES_SELECT, json={"park_ids": list(park_ids)}
        )
        items = response.json().get("balances")
        if not isinstance(items, list):
            raise Transient("balances_select: Billing answered without a list of balances")
        wanted = set(park_ids)
        found: dict[str, Balance] = {}
        for item in items:
            try:
                balance = _balance(item)
            except Malformed as exc:
                # One park's bad data must not stop the others: that park gets
                # no snapshot, and its own payout asks and records why.
                logger.warning("balances_select: %s", exc)
                continue
            if balance.park_id in wanted:
                found[balance.park_id] = balance
        return found

    async def order_payout(
        self,
        key: str,
        *,
        park_id: str,
        amount: Decimal,
        currency: str,
        params: dict[str, Any],
        fee: Decimal | None = None,
        urgent: bool = False,
    ) -> BillingPayout:
        """Order a payout under `key`; `urgent` (a press, a manual payout) passes the
        budget before every periodic call waiting."""
        body: dict[str, Any] = {
            "park_id": park_id,
            "amount": format_money(amount),
            "currency": currency,
            "params": params,
        }
        if fee is not None:
            # Part of the one body under the key: the same fee on every resend.
            body["fee"] = format_money(fee)
        response = await self._request(
            "payout",
            "POST",
            Path.PAYOUTS,
            urgent=urgent,
            json=body,
            headers={"Idempotency-Key": key},
        )
        made = _payout(response.json())
        if (made.park_id, made.amount, made.currency) != (park_id, amount, currency):
            # Billing answers a key with the payout of that key's one body: another
            # payout (a cache's answer to someone else's request) says nothing of ours.
            raise Undecided(
                f"payout: answered with payout {made.id!r} ({made.park_id} {made.amount} "
                f"{made.currency}), not this order's",
                status=response.status_code,
            )
        return made

    async def find_payout(self, key: str) -> BillingPayout | None:
        """The payout Billing made under this key, or None if it made none."""
        try:
            response = await self._request("payout_status", "GET", payout_path(key))
        except Rejected:
            # DECISIVE allows one refusal here: Billing's own 404 for the key.
            return None
        return _payout(response.json())

    async def payouts_page(
        self,
        since: datetime,
        until: datetime,
        *,
        cursor: str | None = None,
        limit: int = MAX_LIST_LIMIT,
    ) -> PayoutPage:
        """One page of the payouts Billing made in [since, until), oldest first."""
        params: dict[str, str | int] = {
            "since": format_timestamp(since),
            "until": format_timestamp(until),
            "limit": limit,
        }
        if cursor is not None:
            params["cursor"] = cursor
        response = await self._request("payouts_list", "GET", Path.PAYOUTS, params=params)
        data = response.json()
        try:
            items = data["payouts"]
            next_cursor = data.get("next_cursor")
            if not isinstance(items, list) or not (
                next_cursor is None or isinstance(next_cursor, str)
            ):
                raise TypeError("payouts must be a list and next_cursor a string or null")
            return PayoutPage([_payout(item, listed=True) for item in items], next_cursor)
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"Billing sent a malformed payout list: {exc}") from exc

    async def returns_page(self, after: str | None, *, limit: int = MAX_LIST_LIMIT) -> ReturnsPage:
        """The returns Billing recorded after the cursor, in the order it recorded them."""
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        response = await self._request("returns", "GET", Path.RETURNS, params=params)
        data = response.json()
        try:
            items = data["returns"]
            next_cursor = data.get("next_cursor")
            if not isinstance(items, list) or not (
                next_cursor is None or isinstance(next_cursor, str)
            ):
                raise TypeError("returns must be a list and next_cursor a string or null")
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"Billing sent a malformed returns page: {exc}") from exc
        return ReturnsPage([r for r in map(_return, items) if r is not None], next_cursor)

    async def payouts_made(
        self, since: datetime, until: datetime, *, cursor: str | None = None
    ) -> AsyncIterator[PayoutPage]:
        """Stream every payout Billing made in [since, until), a page at a time.

        Holds one page in memory. Errors end the stream; a caller that wants to
        wait out a pause resumes from the last page's ``next_cursor``.
        """
        while True:
            page = await self.payouts_page(since, until, cursor=cursor)
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def _request(
        self,
        endpoint: str,
        method: str,
        url: str,
        *,
        urgent: bool = False,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer:
        waited = time.perf_counter()
        permit = await self.budget.acquire(urgent=urgent)
        start = time.perf_counter()
        observability.BILLING_BUDGET_WAIT.observe(start - waited)
        outcome = "error"
        # What the gate hears; None (a cancelled call) tells it nothing.
        heard: Outcome | None = None
        retry_after: float | None = None
        try:
            try:
                response = await self._send(method, url, params=params, body=json, headers=headers)
            except TimeoutError as exc:
                outcome, heard = "timeout", "failed"
                raise Transient(f"{endpoint}: timed out ({type(exc).__name__})") from exc
            except _AnswerTooLarge as exc:
                # Something answered, not with Billing's answer (no page is this large).
                heard = "answered"
                raise Undecided(f"{endpoint}: {exc}", status=exc.status) from exc
            except (aiohttp.ClientError, OSError) as exc:
                heard = "failed"
                raise Transient(f"{endpoint}: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 429:
                outcome, heard = "throttled", "throttled"
                retry_after = pause_seconds(_retry_after(response.headers.get("Retry-After")))
                raise Paused(f"{endpoint}: throttled by Billing", retry_after=retry_after)
            if response.status_code >= 500:
                heard = "failed"
                raise Transient(f"{endpoint}: Billing answered {response.status_code}")
            # Something answered: whatever it said, it is up (only transport
            # failures and 5xx feed the breaker).
            heard = "answered"
            status = response.status_code
            if not 200 <= status < 300:
                decision = _decision(endpoint, response)
                if decision is None:
                    raise Undecided(
                        f"{endpoint}: {status} {_snippet(response)} is not Billing's decision",
                        status=status,
                    )
                outcome = "rejected"
                raise Rejected(*decision, status)
            try:
                response.json()
            except ValueError as exc:
                raise Undecided(
                    f"{endpoint}: Billing answered {status} without JSON", status=status
                ) from exc
            outcome = "ok"
            return response
        finally:
            observability.BILLING_REQUESTS.labels(endpoint, outcome).inc()
            observability.BILLING_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
            if heard is not None:
                await self.budget.report(permit, heard, retry_after=retry_after)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str | int] | None,
        body: Any,
        headers: Mapping[str, str] | None,
    ) -> _Answer:
        """One HTTP exchange, the answer read whole, within the client's timeout."""
        data = None
        sent_headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            sent_headers["Content-Type"] = "application/json"
        async with self._http().request(
            method,
            self._base_url + url,
            params=params,
            data=data,
            headers=sent_headers,
            allow_redirects=False,
        ) as response:
            # Read by chunks up to the cap (aiohttp decompresses a chunk at a time), never
            # more: a compressed bomb or an endless body costs MAX_ANSWER_BYTES at most.
            content = bytearray()
            async for chunk in response.content.iter_chunked(_READ_CHUNK):
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise _AnswerTooLarge(response.status)
            return _Answer(response.status, response.headers, bytes(content))


def _retry_after(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _decision(endpoint: str, response: _Answer) -> tuple[str, str] | None:
    """(code, message) when the answer is Billing's own refusal listed in DECISIVE, else None."""
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(code, str) or (response.status_code, code) not in DECISIVE.get(
        endpoint, frozenset()
    ):
        return None
    message = body.get("message")
    return code, (message if isinstance(message, str) and message else code)[:500]


def _snippet(response: _Answer) -> str:
    """The start of an answer's body, for the log and support: enough to tell who sent it."""
    text = " ".join(response.text[:120].split())
    return repr(text) if text else "(empty body)"


def _money(raw: Any) -> Decimal:
    """A finite decimal sent as a string (SPEC: money is never a JSON number)."""
    try:
        value = Decimal(raw) if isinstance(raw, str) else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise ValueError(f"malformed amount {str(raw)[:40]!r}")
    return value


def _currency(raw: Any) -> str:
    # The schema stores ISO 4217 codes; anything else is Billing misbehaving.
    if not isinstance(raw, str) or not _CURRENCY_RE.fullmatch(raw):
        raise ValueError(f"malformed currency {str(raw)[:40]!r}")
    return raw


def _balance(data: Any) -> Balance:
    park_id = data.get("park_id") if isinstance(data, dict) else None
    try:
        if not isinstance(data, dict) or not isinstance(park_id, str):
            raise ValueError("not a balance object")
        return Balance(park_id, _money(data.get("available")), _currency(data.get("currency")))
    except ValueError as exc:
        raise Malformed(f"park {str(park_id)[:64]!r}: unusable balance: {exc}") from None


def _payout(data: Any, *, listed: bool = False) -> BillingPayout:
    # After an order, a garbled answer leaves its outcome unknown: ask again.
    try:
        if not isinstance(data, dict):
            raise ValueError("not a payout object")
        return BillingPayout(
            id=str(data["id"]),
            park_id=str(data["park_id"]),
            amount=_money(data["amount"]),
            currency=_currency(data["currency"]),
            status=str(data.get("status", "done")),
            idempotency_key=str(data["idempotency_key"]) if listed else None,
            created_at=_parse_timestamp(data["created_at"]) if listed else None,
            fee=_money(data["fee"]) if data.get("fee") is not None else None,
            return_code=str(data["return_code"]) if data.get("return_code") else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Undecided(f"Billing sent a malformed payout: {exc}", status=200) from None


def _return(item: Any) -> BillingReturn | None:
    """One item of the returns feed. One odd item must not stop the feed for every later
    one: an unreadable code or time is still a return of that key (applied, so its park is
    held; returned_at is then the time we read it), and an item without a key is left to
    reconciliation (returned_at_billing: Billing's payout says returned)."""
    if not isinstance(item, dict):
        logger.error(
            "returns feed: an item that is no object, left to reconciliation: %.200r", item
        )
        return None
    key = item.get("idempotency_key")
    if not isinstance(key, str | int) or not str(key).replace("\x00", ""):
        logger.error(
            "returns feed: an item without a usable key, left to reconciliation: %.200r", item
        )
        return None
    try:
        returned_at: datetime | None = _parse_timestamp(item.get("returned_at"))
    except (TypeError, ValueError, AttributeError):
        logger.error(
            "returns feed: key %.64s: unreadable returned_at %.64r", key, item.get("returned_at")
        )
        returned_at = None
    code = item.get("code")
    return BillingReturn(
        # PostgreSQL text cannot hold NUL.
        idempotency_key=str(key).replace("\x00", "")[:255],
        code=(str(code).replace("\x00", "")[:100] if code is not None else "") or "unknown",
        returned_at=returned_at,
    )


def _parse_timestamp(raw: Any) -> datetime:
    try:
        return parse_timestamp(raw)
    except ValueError as exc:
        raise TypeError(f"created_at {raw!r}: {exc}") from None
