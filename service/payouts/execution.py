"""Execute one payout, exactly once, whatever crashes, retries and delays come.

A payout moves through named recovery points, each one committed row state
(domain.Phase, the phases of rocket-rides-atomic); every run of its job reads
the row and resumes from the phase it names:

- NEW -> DECIDING: a run takes it (pending -> processing, attempts + 1). A
  periodic payout with the scan's snapshot and something to pay goes straight
  to ORDERED in that same statement (the take query, migration 0016): the
  worker's round trips per payout are procrastinate's fetch, the take, the
  final write and procrastinate's finish.
- DECIDING: ask Billing for the balance (or use the periodic scan's
  snapshot), decide the amount. Nothing has been sent under the payout's key,
  so this phase may end it: ``skipped`` (nothing to pay), ``failed`` (Billing
  refused the balance read, or has been unreachable for the whole retry
  window). Otherwise it records the order -> ORDERED.
- ORDERED: amount, currency and body are fixed for good (the schema refuses
  any change), and the order may have reached Billing. Only Billing's answer
  under the key ends the payout: ``succeeded``, or ``failed`` with Billing's
  refusal. Sending the recorded body again is always safe, because Billing
  decides a key once and answers every later copy alike (SPEC section 4);
  so the run sends it until Billing answers, however long that takes. The
  payout stays in flight meanwhile and nothing else starts for the park; the
  open-order alert calls a person past a bound.
- FINISHED: nothing to do.

A periodic payout that Billing refused because its figures were stale (a
lower balance, a new currency) is followed at once by a new payout with its
own id and fresh figures, in the transaction that ends it.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from decimal import Decimal
from typing import Any, NoReturn
from uuid import UUID

from service.billing.client import (
    BillingClient,
    BillingPayout,
    Malformed,
    Paused,
    Rejected,
    Transient,
    Undecided,
)
from service.core import db, observability
from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.core.values import is_storable_balance
from service.payouts import store as payouts
from service.payouts.model import STALE_FIGURES, Phase, Status, order_amount, quote

logger = logging.getLogger(__name__)


class RetryLater(Exception):
    """The payout cannot finish now; the job is retried after a backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Deps:
    pool: db.Pool
    billing: BillingClient
    settings: Settings


async def execute_payout(deps: Deps, payout_id: UUID) -> Status | None:
    """Drive one payout to a final status, or raise RetryLater.

    Each step borrows a pooled connection for its own statements only and gives it
    back before any wait on Billing or on the budget: a worker's connections stay
    a small constant however many payouts it runs at once.
    """
    async with deps.pool.connection() as conn:
        taken = await payouts.take(
            conn,
            payout_id,
            retry_window=deps.settings.billing_retry_window,
            min_amount=deps.settings.payout_min_amount,
        )
        if taken is None:
            current = await payouts.get(conn, payout_id)
            if current is None:
                logger.warning("payout %s does not exist; dropping its job", payout_id)
                return None
            return Status(current.status)
    db.CLOCK.observe(taken.db_now)
    observability.bind(park_id=taken.park_id, kind=taken.kind)
    return await _Run(deps, taken).drive()


class _Run:
    """One run of one payout's job: holds the latest row it has seen."""

    def __init__(self, deps: Deps, taken: payouts.Taken) -> None:
        self.deps = deps
        self.taken = taken
        self.payout: payouts.Record = taken
        self.log = {"payout_id": str(taken.id), "park_id": taken.park_id}
        # A press or an approved manual payout: someone is waiting on it, so its
        # calls pass the Billing budget before any periodic one (gate.py).
        self.urgent = taken.kind != "periodic"

    async def drive(self) -> Status | None:
        while True:
            phase = self.payout.phase
            if phase is Phase.FINISHED:
                return Status(self.payout.status)
            if phase is Phase.ORDERED:
                return await self.order()
            # NEW cannot be seen here: the run took the payout.
            done = await self.decide()
            if done is not None:
                return done

    # --- DECIDING ---------------------------------------------------------------

    async def decide(self) -> Status | None:
        """Read the balance, decide the amount, record the order (or end the payout)."""
        try:
            available, currency = await self.balance()
        except Paused as exc:
            # Nothing was asked: the shared pause spends none of the retry window.
            await self.wait(exc)
        except Transient as exc:
            if isinstance(exc, Undecided) and exc.credentials_refused:
                # Our BILLING_TOKEN is wrong: waiting out the window would fail
                # every payout for an operator's mistake. The alerts call one.
                logger.error("balance read refused: %s", exc, extra=self.log)
                await self.wait(exc)
            if not self.taken.retry_window_over:
                await self.wait(exc)
            # Nothing was ever ordered under this key: failing moves no money.
            logger.error("Billing unavailable for the whole retry window", extra=self.log)
            return await self.fail("billing_unavailable", f"Billing unavailable: {exc}")
        except Malformed as exc:
            return await self.fail("invalid_balance", str(exc))
        except Rejected as exc:
            return await self.fail(exc.code, exc.message)

        p = self.payout
        minimum = p.min_amount or self.deps.settings.payout_min_amount
        if p.kind == "manual":
            # Exactly what the second admin approved; Billing refuses it
            # (insufficient_funds) if the park has less.
            amount: Decimal | None = p.requested_amount
        else:
            amount = order_amount(available, p.max_amount, p.requested_amount, minimum)
        split = quote(amount, p.fee) if amount is not None else None
        if split is not None and split.net_amount is not None and split.net_amount < minimum:
            # The fee would leave the park less than the minimum: not worth ordering.
            return await self.finish(
                Status.SKIPPED,
                "ok",
                {
                    "available": str(available),
                    "currency": currency,
                    "min_amount": str(minimum),
                    "amount": str(split.amount),
                    "fee_amount": str(split.fee_amount),
                    "reason": "net_below_minimum",
                },
                available=available if is_storable_balance(available) else None,
                currency=currency,
            )
        if amount is None or split is None:
            # Nothing (or too little) to pay; an overdrawn park's raw figure
            # goes to the audit entry, the column keeps only storable ones.
            return await self.finish(
                Status.SKIPPED,
                "ok",
                {
                    "available": str(available),
                    "currency": currency,
                    "min_amount": str(minimum),
                    "reason": "below_minimum" if available > 0 else "nothing_available",
                },
                available=available if is_storable_balance(available) else None,
                currency=currency,
            )
        async with self.deps.pool.connection() as conn:
            recorded = await payouts.record_order(
                conn,
                p.id,
                available=available,
                amount=amount,
                currency=currency,
                billing_params=self.taken.park_params,
                fee_amount=split.fee_amount,
                net_amount=split.net_amount,
            )
            # No row: a stalled run of this job that came back to life recorded
            # first; go on from the order it recorded.
            self.payout = recorded or await payouts.reload(conn, p.id)
        return None

    async def balance(self) -> tuple[Decimal, str]:
        # The periodic scan leaves a snapshot from POST /v1/balances/select, so
        # a periodic payout costs Billing one call, not two.
        p = self.payout
        if p.available is not None and p.currency is not None:
            return p.available, p.currency
        balance = await self.deps.billing.balance(p.park_id, urgent=self.urgent)
        return balance.available, balance.currency

    # --- ORDERED ----------------------------------------------------------------

    async def order(self) -> Status | None:
        """Send the recorded order (again) until Billing answers under the payout's key."""
        p = self.payout
        if not (p.amount is not None and p.currency is not None and p.billing_params is not None):
            raise InvariantError(
                "p.amount is not None and p.currency is not None and p.billing_params is not None"
            )
        try:
            done = await self.deps.billing.order_payout(
                str(p.id),
                park_id=p.park_id,
                amount=p.amount,
                currency=p.currency,
                params=p.billing_params,
                fee=p.fee_amount,
                urgent=self.urgent,
            )
        except Rejected as exc:
            # Only Billing's own refusal, one of the client's DECISIVE answers.
            return await self.refused(exc)
        except Transient as exc:
            # The outcome is unknown (a timeout, a 5xx, an answer that is not
            # Billing's decision): never give up on it, however long.
            if isinstance(exc, Undecided):
                logger.error("order not decided by Billing: %s", exc, extra=self.log)
            await self.wait(exc)
        return await self.succeed(done)

    async def wait(self, exc: Transient) -> NoReturn:
        """Try again later; the problem stays visible to support meanwhile (a pause
        asked Billing nothing, so there is no problem to show)."""
        if not isinstance(exc, Paused):
            async with self.deps.pool.connection() as conn:
                await payouts.note_transient(conn, self.payout.id, str(exc))
        raise RetryLater(str(exc), retry_after=exc.retry_after) from exc

    async def succeed(self, done: BillingPayout) -> Status | None:
        p = self.payout
        if done.amount != p.amount or done.park_id != p.park_id or done.fee != p.fee_amount:
            # Same key and body must give the same payout; if not, say it loudly.
            logger.error(
                "Billing payout %s (%s %s for %s) differs from our order (%s for %s)",
                done.id,
                done.amount,
                done.currency,
                done.park_id,
                p.amount,
                p.park_id,
                extra=self.log,
            )
        try:
            return await self.finish(
                Status.SUCCEEDED,
                "ok",
                {
                    "amount": str(p.amount),
                    "currency": p.currency,
                    "billing_payout_id": done.id,
                    **({"fee_amount": str(p.fee_amount)} if p.fee_amount is not None else {}),
                },
                billing_payout_id=done.id,
            )
        except payouts.BillingPayoutTaken as exc:
            # Billing's answer names no key, and this payout object already settles
            # another payout of ours: something between us and Billing (a gateway, a
            # cache) answered this order with an earlier one's. That is no answer to
            # this order: it stays in flight and is asked again, like a proxy's page.
            logger.error(
                "order answered with a Billing payout that settles another payout: %s",
                exc,
                extra=self.log,
            )
            await self.wait(Undecided(f"answered with another order's payout: {exc}", status=200))

    async def refused(self, exc: Rejected) -> Status | None:
        """Billing decided the key: no money moved, for good. Maybe follow with fresh figures."""
        p = self.payout
        follow = p.kind == "periodic" and p.follows is None and exc.code in STALE_FIGURES
        async with self.deps.pool.connection() as conn, conn.transaction():
            status = await self.fail(exc.code, exc.message, conn=conn)
            if follow and status is Status.FAILED:
                settings = self.deps.settings
                new = await payouts.follow_up(
                    conn,
                    p,
                    uuid.uuid4(),
                    reason=exc.code,
                    max_amount=settings.payout_max_amount,
                    min_amount=settings.payout_min_amount,
                )
                if new is not None:
                    logger.info("followed by payout %s with fresh figures", new.id, extra=self.log)
        return status

    # --- FINISHED ---------------------------------------------------------------

    async def fail(self, code: str, message: str, *, conn: db.Conn | None = None) -> Status | None:
        return await self.finish(
            Status.FAILED,
            code,
            {"failure_message": message},
            conn=conn,
            failure_code=code,
            failure_message=message,
        )

    async def finish(
        self,
        status: Status,
        outcome: str,
        details: dict[str, Any],
        *,
        conn: db.Conn | None = None,
        **params: Any,
    ) -> Status | None:
        """Write the final status (on `conn` when the caller's transaction goes on)."""
        if conn is None:
            async with self.deps.pool.connection() as own:
                return await self.finish(status, outcome, details, conn=own, **params)
        p = self.payout
        row = await payouts.finish(
            conn,
            p.id,
            status=status,
            outcome=outcome,
            details={"kind": p.kind, "attempts": self.taken.attempts, **details},
            **params,
        )
        if row is None:
            # Another run of this job finished it first: its word stands.
            self.payout = await payouts.reload(conn, p.id)
            return Status(self.payout.status)
        self.payout = row
        observability.PAYOUTS.labels(row.kind, row.status).inc()
        if row.status == Status.SUCCEEDED and row.fee_amount is not None and row.currency:
            observability.INSTANT_FEES.labels(row.currency).inc(float(row.fee_amount))
        logger.info("payout %s %s", p.id, row.status, extra=self.log)
        return status
