"""Execute one payout, exactly once, whatever crashes and retries come.

The job is split into short transactions that end at recovery points; the
Billing call happens between them, never inside one:

1. take:   pending -> processing (attempts + 1)
2. decide: read the balance (or the periodic scan's snapshot), compute the
           amount; nothing to pay -> ``skipped``
3. commit to ordering: record amount, body and ``ordered_at``
4. order:  POST /v1/payouts with Idempotency-Key = payout id
5. finish: ``succeeded`` / ``failed``, the park's clock, the audit entry

A run that finds ``ordered_at`` set does not know whether an earlier run's
order reached Billing, so it asks (GET /v1/payouts/{id}) before ordering
again; ordering again is safe anyway, because Billing dedupes on the key and
the body is byte-for-byte the recorded one.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from service import db, observability, payouts
from service.billing.client import BillingClient, BillingPayout, Rejected, Transient
from service.domain import Status, payout_amount
from service.settings import Settings

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
    """Drive one payout to a final status, or raise RetryLater."""
    async with deps.pool.connection() as conn:
        row = await payouts.take(conn, payout_id)
        if row is None:
            current = await payouts.get(conn, payout_id)
            if current is None:
                logger.error("payout %s does not exist; dropping its job", payout_id)
                return None
            return Status(current["status"])
        run = _Run(deps, conn, row)
        try:
            return await run.drive()
        except Transient as exc:
            deadline = row["created_at"] + deps.settings.billing_retry_window
            if datetime.now(UTC) < deadline:
                await payouts.note_transient(conn, payout_id, str(exc))
                raise RetryLater(str(exc), retry_after=exc.retry_after) from exc
            logger.error("payout %s: Billing unavailable for the whole retry window", payout_id)
            details = {"order_outcome_unknown": run.row["ordered_at"] is not None}
            return await run.finish(
                Status.FAILED,
                "billing_unavailable",
                details,
                failure_code="billing_unavailable",
                failure_message=f"Billing unavailable: {exc}",
            )


class _Run:
    """One attempt at one payout; holds the latest row it has seen."""

    def __init__(self, deps: Deps, conn: db.Conn, row: payouts.Row):
        self.deps = deps
        self.conn = conn
        self.row = row
        self.params: dict[str, Any] = row["park_params"]
        self.id: UUID = row["id"]
        self.rereads_left = 1
        # True once *this* run recorded the order: nothing can have reached
        # Billing under the key yet, so there is nothing to settle first.
        self.ordered_here = False

    async def drive(self) -> Status | None:
        while True:
            if Status(self.row["status"]).is_final:
                return Status(self.row["status"])
            if self.row["ordered_at"] is not None:
                status = await self._settle_or_order()
                if status is not None:
                    return status
                continue

            balance = await self._balance()
            if balance is None:
                return self.final_status()
            available, currency = balance
            amount = payout_amount(available, self.row["max_amount"], self.row["requested_amount"])
            if amount <= 0:
                # An overdrawn park (Billing reports a negative balance) has
                # nothing to pay either; the raw figure goes to the audit entry.
                return await self.finish(
                    Status.SKIPPED,
                    "ok",
                    {"available": str(available), "currency": currency},
                    available=max(available, Decimal(0)),
                    currency=currency,
                )
            self.ordered_here = await self._change(
                "record_order",
                available=available,
                amount=amount,
                currency=currency,
                billing_params=self.params,
            )

    async def _settle_or_order(self) -> Status | None:
        """An order is recorded: find out what Billing did with it, or place it.

        Returns None when the order was refused as stale and cleared, so the
        caller decides the amount again.
        """
        found = None if self.ordered_here else await self.deps.billing.find_payout(str(self.id))
        self.ordered_here = False  # a retry within this run must settle first
        if found is None:
            try:
                found = await self.deps.billing.order_payout(
                    str(self.id),
                    park_id=self.row["park_id"],
                    amount=self.row["amount"],
                    currency=self.row["currency"],
                    params=self.row["billing_params"],
                )
            except Rejected as exc:
                if exc.code == "insufficient_funds" and self.rereads_left > 0:
                    # The balance we decided on was stale; Billing moved
                    # nothing, so read it again and decide again, once.
                    self.rereads_left -= 1
                    await self._change("clear_order", ordered_at=self.row["ordered_at"])
                    return None
                return await self.fail(exc.code, exc.message)
        return await self.succeed(found)

    async def _balance(self) -> tuple[Decimal, str] | None:
        # The periodic scan leaves a snapshot from POST /v1/balances/select;
        # use it once, so a periodic payout costs Billing one call, not two.
        if self.row["available"] is not None and self.row["currency"] is not None:
            snapshot = (self.row["available"], self.row["currency"])
            self.row = {**self.row, "available": None}
            return snapshot
        try:
            balance = await self.deps.billing.balance(self.row["park_id"])
        except Rejected as exc:
            await self.fail(exc.code, exc.message)
            return None
        return balance.available, balance.currency

    def final_status(self) -> Status | None:
        status = Status(self.row["status"])
        return status if status.is_final else None

    async def _change(self, name: str, **params: Any) -> bool:
        """Apply a conditional state change; if it no longer applies, reload the row.

        It no longer applies when another run of this job (a stalled one that
        came back to life) moved the payout first: take its state and go on
        from there.
        """
        row = await payouts.change(self.conn, name, self.id, **params)
        applied = row is not None
        if row is None:
            row = await payouts.get(self.conn, self.id)
            assert row is not None
        self.row = row
        return applied

    async def finish(
        self, status: Status, outcome: str, details: dict[str, Any], **params: Any
    ) -> Status | None:
        row = await payouts.finish(
            self.conn,
            self.id,
            status=status,
            outcome=outcome,
            details={"kind": self.row["kind"], "attempts": self.row["attempts"], **details},
            **params,
        )
        if row is None:
            await self._change("get")
            return self.final_status()
        self.row = row
        observability.PAYOUTS.labels(row["kind"], row["status"]).inc()
        logger.info(
            "payout %s %s",
            self.id,
            row["status"],
            extra={"payout_id": str(self.id), "park_id": row["park_id"]},
        )
        return status

    async def succeed(self, done: BillingPayout) -> Status | None:
        if done.amount != self.row["amount"] or done.park_id != self.row["park_id"]:
            # Same key and body must give the same payout; if not, say it loudly.
            logger.error(
                "payout %s: Billing payout %s (%s %s for %s) differs from our order (%s for %s)",
                self.id,
                done.id,
                done.amount,
                done.currency,
                done.park_id,
                self.row["amount"],
                self.row["park_id"],
            )
        return await self.finish(
            Status.SUCCEEDED,
            "ok",
            {
                "amount": str(self.row["amount"]),
                "currency": self.row["currency"],
                "billing_payout_id": done.id,
            },
            billing_payout_id=done.id,
        )

    async def fail(self, code: str, message: str) -> Status | None:
        return await self.finish(
            Status.FAILED,
            code,
            {"failure_message": message},
            failure_code=code,
            failure_message=message,
        )
