"""The Billing HTTP client: SPEC section 4, throttled, measured, errors translated.

Every foreign failure leaves this module as one of three exceptions, so the
payout job decides on meaning, not on status codes:

- ``Rejected``: Billing said no for good (insufficient funds, unknown park...).
- ``Transient``: try again later; for an order the outcome is *unknown*.
  ``Paused`` is the Transient raised without calling Billing at all, while
  calls are held back (Billing's Retry-After, the breaker).
- ``Malformed``: Billing answered with a balance we cannot use (one park's
  bad data); that park's payout decides, nobody else waits.
- (a ``None`` from ``find_payout``): Billing has no payout under that key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx
from aiolimiter import AsyncLimiter

from service import observability
from service.domain import format_money

logger = logging.getLogger(__name__)

_CURRENCY_RE = re.compile(r"[A-Z]{3}")
# SPEC section 4: the bulk endpoint takes at most this many parks per call.
MAX_SELECT = 1000


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
    """Billing could not answer now (5xx, 429, timeout, network); retry later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Paused(Transient):
    """Calls to Billing are held back for a while; nothing was sent."""


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


class Budget:
    """This process's share of the global BILLING_RPS budget.

    The budget is for all hosts together and there is no coordinator but
    the database: each worker takes ``BILLING_RPS / live workers`` (live =
    a procrastinate heartbeat in the last 30 s), refreshed periodically. One
    token at a time, spaced evenly, so no burst can exceed the share.
    """

    def __init__(self, total_rps: float) -> None:
        self.total_rps = total_rps
        self.share = 1
        self._limiter = AsyncLimiter(1, 1 / total_rps)
        self._not_before = 0.0

    def hold(self, seconds: float) -> None:
        """Send nothing for a while: a worker that just joined waits until the
        others have recounted and shrunk their shares to make room for it."""
        self._not_before = time.monotonic() + seconds

    async def set_share(self, workers: int) -> None:
        workers = max(1, workers)
        if workers != self.share:
            logger.info("billing budget: %s workers share %s rps", workers, self.total_rps)
            self.share = workers
            limiter = AsyncLimiter(1, workers / self.total_rps)
            # A new bucket starts empty, i.e. with a token to spend at once;
            # spend it now so that a change of share is never a burst.
            await limiter.acquire()
            self._limiter = limiter

    async def acquire(self) -> None:
        wait = self._not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await self._limiter.acquire()


class BillingClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        timeout: float,
        budget: Budget,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )
        self.budget = budget

    async def aclose(self) -> None:
        await self._http.aclose()

    async def balance(self, park_id: str) -> Balance:
        response = await self._request("balance", "GET", "/v1/balance", params={"park_id": park_id})
        return _balance(response.json())

    async def balances(self, park_ids: Sequence[str]) -> dict[str, Balance]:
        """Balances of up to MAX_SELECT parks in one call; unknown parks are left out."""
        if len(park_ids) > MAX_SELECT:
            raise ValueError(f"at most {MAX_SELECT} parks per call")
        response = await self._request(
            "balances_select", "POST", "/v1/balances/select", json={"park_ids": list(park_ids)}
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
    ) -> BillingPayout:
        body = {
            "park_id": park_id,
            "amount": format_money(amount),
            "currency": currency,
            "params": params,
        }
        response = await self._request(
            "payout", "POST", "/v1/payouts", json=body, headers={"Idempotency-Key": key}
        )
        return _payout(response.json())

    async def find_payout(self, key: str) -> BillingPayout | None:
        """The payout Billing made under this key, or None if it made none."""
        try:
            response = await self._request("payout_status", "GET", f"/v1/payouts/{key}")
        except Rejected as exc:
            if exc.status == 404:
                return None
            raise
        return _payout(response.json())

    async def _request(self, endpoint: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
        await self.budget.acquire()
        start = time.perf_counter()
        outcome = "error"
        try:
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TimeoutException as exc:
                outcome = "timeout"
                raise Transient(f"{endpoint}: timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                raise Transient(f"{endpoint}: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 429:
                outcome = "throttled"
                raise Transient(
                    f"{endpoint}: throttled by Billing",
                    retry_after=_retry_after(response.headers.get("Retry-After")),
                )
            if response.status_code >= 500:
                raise Transient(f"{endpoint}: Billing answered {response.status_code}")
            if response.status_code >= 400:
                outcome = "rejected"
                code, message = _error(response)
                raise Rejected(code, message, response.status_code)
            try:
                response.json()
            except ValueError as exc:
                raise Transient(
                    f"{endpoint}: Billing answered {response.status_code} without JSON"
                ) from exc
            outcome = "ok"
            return response
        finally:
            observability.BILLING_REQUESTS.labels(endpoint, outcome).inc()
            observability.BILLING_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


def _retry_after(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _error(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    code = str(body.get("code") or f"http_{response.status_code}")
    message = str(body.get("message") or response.reason_phrase or code)
    return code, message[:500]


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


def _payout(data: Any) -> BillingPayout:
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
        )
    except (KeyError, ValueError) as exc:
        raise Transient(f"Billing sent a malformed payout: {exc}") from None


async def live_workers(conn: Any, within_seconds: float) -> int:
    """How many procrastinate workers sent a heartbeat recently (all hosts)."""
    cur = await conn.execute(
        "SELECT count(*) AS n FROM procrastinate_workers "
        "WHERE last_heartbeat > now() - make_interval(secs => %s)",
        (within_seconds,),
    )
    row = await cur.fetchone()
    return int(row["n"]) if row else 1
