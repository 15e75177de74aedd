"""Reconciliation with Billing: our payouts against the payouts Billing made.

For a window [since, until) it reports every mismatch (SPEC section 5):

- ``unknown_at_billing``: Billing made a payout in the window that no payout
  of ours explains (made outside the service, or under a key not ours);
- ``failed_here_paid_there``: Billing made it under the key of a payout of
  ours that did not end ``succeeded`` (failed, skipped, an unknown order
  outcome...) and is no longer in flight;
- ``amount_differs``: ours succeeded, Billing's payout under its key moved
  another amount (or currency, or park);
- ``missing_at_billing``: ours succeeded in the window and Billing has no
  payout under its key.
- ``fee_differs``: same payout, but Billing recorded another fee (SPEC 8);
- ``returned_at_billing``: Billing says the bank returned it and ours is not
  returned (the returns reader has not applied it), or Billing's returns
  feed named a key no succeeded payout of ours explains (never applied).

Both sides stream in bounded memory, whatever the window (80,000 parks'
month): Billing's list goes page by page into a temporary table of this
session, and the comparison runs in the database, read back a page at a
time. Billing's list is taken ``PAD`` wider than the window, because its
clock and ours do not stamp a payout alike; our succeeded payouts still not
found in it (Billing made it long before we learnt of it, after an outage)
are asked about one by one, by key, before being called missing.

Run by hand (`fleet-payouts reconcile`, read-only) and daily by the workers
(`run_daily`: recorded in billing_reconciliations, audited, and reported as
``fleet_payouts_reconciliation_mismatches`` by every worker).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, LiteralString, TextIO, TypeVar

import psycopg

from service.audit import store as audit
from service.billing import gate as billing_gate
from service.billing.client import BillingClient, BillingPayout, Paused, PayoutPage, Transient
from service.core import db, observability, retry
from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.core.values import format_money, format_timestamp
from service.ops import checks
from service.payouts.execution import Deps

logger = logging.getLogger(__name__)
Q = db.queries("reconcile")

Kind = Literal[
    "missing_at_billing",
    "unknown_at_billing",
    "amount_differs",
    "failed_here_paid_there",
    "fee_differs",
    "returned_at_billing",
]

# Billing's clock and ours stamp one payout seconds apart; ten minutes of
# margin on each side of the window keeps a payout at a window's edge from
# looking missing on one side and unknown on the other.
PAD = timedelta(minutes=10)
# Mismatches read back from the database per page.
PAGE = 500
# Our payouts asked about one by one, at most, per run: normally only those
# near the window's edges; past this Billing has lost far more than a run can
# confirm at BILLING_RPS, and the rest are reported unconfirmed.
MAX_LOOKUPS = 1000
# Billing errors (not pauses, which are waited out) tolerated per call.
TRANSIENT_RETRIES = 5
TRANSIENT_BACKOFF_CAP_SECONDS = 16.0  # 1 + 2 + 4 + 8 + 16 s: about half a minute in all
# The daily run covers this many days up to now: each payout is looked at
# by two runs, so one missed run (every worker down at its tick) loses nothing.
RECONCILE_DAYS = 2
# The audit entry of a daily run lists at most this many mismatches.
AUDIT_SAMPLE = 20

T = TypeVar("T")


class ReconcileError(Exception):
    """Billing could not be read to the end; nothing can be concluded."""


@dataclasses.dataclass(frozen=True)
class Mismatch:
    kind: Kind
    key: str  # the idempotency key: our payout id, when the payout is ours
    park_id: str
    our_status: str | None = None
    our_amount: Decimal | None = None
    our_currency: str | None = None
    billing_id: str | None = None
    billing_amount: Decimal | None = None
    billing_currency: str | None = None
    billing_created_at: datetime | None = None
    note: str | None = None

    def line(self) -> str:
        """One line for a human: the kind first, then what each side says."""
        parts = [self.kind, f"key={self.key}", f"park={self.park_id}"]
        if self.our_status is not None:
            ours = [self.our_status]
            if self.our_amount is not None:
                ours.append(f"{format_money(self.our_amount)} {self.our_currency}")
            parts.append(f"ours=({' '.join(ours)})")
        if self.billing_id is not None:
            if not (self.billing_amount is not None and self.billing_created_at is not None):
                raise InvariantError(
                    "self.billing_amount is not None and self.billing_created_at is not None"
                )
            parts.append(
                f"billing=({self.billing_id} {format_money(self.billing_amount)} "
                f"{self.billing_currency} at {format_timestamp(self.billing_created_at)})"
            )
        if self.note:
            parts.append(f"note={self.note}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, Decimal):
                fields[name] = format_money(value)
            elif isinstance(value, datetime):
                fields[name] = format_timestamp(value)
            elif value is not None:
                fields[name] = value
        return fields


@dataclasses.dataclass
class Summary:
    since: datetime
    until: datetime
    billing_listed: int = 0
    looked_up: int = 0
    by_kind: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def mismatches(self) -> int:
        return sum(self.by_kind.values())


async def reconcile(
    conn: db.Conn,
    billing: BillingClient,
    since: datetime,
    until: datetime,
    on_mismatch: Callable[[Mismatch], None],
    *,
    on_pause: Callable[[float], None] | None = None,
) -> Summary:
    """Compare both sides for [since, until); report each mismatch as it is found."""
    summary = Summary(since, until)

    def found(mismatch: Mismatch) -> None:
        summary.by_kind[mismatch.kind] += 1
        on_mismatch(mismatch)

    patient = _Patience(on_pause)
    await conn.execute(Q["drop_seen"])
    await conn.execute(Q["create_seen"])
    try:
        summary.billing_listed = await _load_billing_side(
            conn, billing, since - PAD, until + PAD, patient
        )
        for query in ("index_seen_by_key", "index_seen_by_time", "analyze_seen"):
            await conn.execute(Q[query])
        await _billing_side(conn, since, until, found)
        await _unmatched_returns(conn, since, until, found)
        summary.looked_up = await _our_side(conn, billing, since, until, found, patient)
    finally:
        await conn.execute(Q["drop_seen"])
    return summary


async def _load_billing_side(
    conn: db.Conn, billing: BillingClient, since: datetime, until: datetime, patient: _Patience
) -> int:
    listed = 0
    cursor: str | None = None
    while True:
        try:
            async for page in billing.payouts_made(since, until, cursor=cursor):
                listed += await _copy_page(conn, page)
                cursor = page.next_cursor
                patient.errors = 0
            return listed
        except Transient as exc:
            await patient.after(exc)


async def _copy_page(conn: db.Conn, page: PayoutPage) -> int:
    async with conn.cursor().copy(Q["copy_seen"]) as copy:
        for p in page.payouts:
            key = p.idempotency_key
            row = (
                key,
                _our_id(key),
                p.id,
                p.park_id,
                p.amount,
                p.currency,
                p.created_at,
                p.fee,
                p.status,
            )
            await copy.write_row(row)
    return len(page.payouts)


def _our_id(key: str | None) -> uuid.UUID | None:
    """The key as one of our payout ids (we send str(uuid)); None when it cannot be one."""
    try:
        parsed = uuid.UUID(key or "")
    except ValueError:
        return None
    return parsed if str(parsed) == key else None


async def _rows(
    conn: db.Conn, query: LiteralString, order: tuple[str, str], **params: Any
) -> AsyncIterator[dict[str, Any]]:
    """Every row of a keyset-paged query, PAGE rows per round trip, in `order`."""
    after_at: Any = None
    after_key: Any = None
    while True:
        rows = await db.fetch_all(
            conn, query, after_at=after_at, after_key=after_key, limit=PAGE, **params
        )
        for row in rows:
            yield row
        if len(rows) < PAGE:
            return
        after_at, after_key = rows[-1][order[0]], rows[-1][order[1]]


async def _billing_side(
    conn: db.Conn, since: datetime, until: datetime, found: Callable[[Mismatch], None]
) -> None:
    order = ("created_at", "key")
    async for row in _rows(conn, Q["billing_side"], order, since=since, until=until):
        found(_billing_side_mismatch(row))


async def _unmatched_returns(
    conn: db.Conn, since: datetime, until: datetime, found: Callable[[Mismatch], None]
) -> None:
    for row in await db.fetch_all(conn, Q["unmatched_returns"], since=since, until=until):
        found(
            Mismatch(
                "returned_at_billing",
                row["idempotency_key"],
                "-",  # the park is Billing's to name: its feed gives only the key
                our_status=row["our_status"],
                note=f"return {row['code']} at {format_timestamp(row['returned_at'])} not applied",
            )
        )


def _billing_side_mismatch(row: dict[str, Any]) -> Mismatch:
    billing = {
        "billing_id": row["billing_id"],
        "billing_amount": row["amount"],
        "billing_currency": row["currency"],
        "billing_created_at": row["created_at"],
    }
    if row["our_id"] is None:
        return Mismatch("unknown_at_billing", row["key"], row["park_id"], **billing)
    ours = {
        "our_status": row["our_status"],
        "our_amount": row["our_amount"],
        "our_currency": row["our_currency"],
    }
    if row["our_status"] in ("succeeded", "returned"):
        same_order = (row["our_amount"], row["our_currency"], row["our_park_id"]) == (
            row["amount"],
            row["currency"],
            row["park_id"],
        )
        if same_order and row["our_fee"] != row["fee"]:
            return Mismatch(
                "fee_differs",
                row["key"],
                row["our_park_id"],
                **ours,
                **billing,
                note=f"fee ours={row['our_fee']} billing={row['fee']}",
            )
        if same_order:
            return Mismatch(
                "returned_at_billing", row["key"], row["our_park_id"], **ours, **billing
            )
        return Mismatch("amount_differs", row["key"], row["our_park_id"], **ours, **billing)
    note = f"failure_code={row['our_failure_code']}" if row["our_failure_code"] else None
    return Mismatch(
        "failed_here_paid_there", row["key"], row["our_park_id"], **ours, **billing, note=note
    )


async def _our_side(
    conn: db.Conn,
    billing: BillingClient,
    since: datetime,
    until: datetime,
    found: Callable[[Mismatch], None],
    patient: _Patience,
) -> int:
    looked_up = 0
    order = ("completed_at", "id")
    async for row in _rows(conn, Q["ours_unseen"], order, since=since, until=until):
        ours = {
            "our_status": "succeeded",
            "our_amount": row["amount"],
            "our_currency": row["currency"],
        }
        key = str(row["id"])
        if looked_up >= MAX_LOOKUPS:
            found(Mismatch("missing_at_billing", key, row["park_id"], **ours, note="unconfirmed"))
            continue
        looked_up += 1
        made = await patient.call(functools.partial(billing.find_payout, key))
        if made is None:
            found(Mismatch("missing_at_billing", key, row["park_id"], **ours))
        elif (made.amount, made.currency, made.park_id) != (
            row["amount"],
            row["currency"],
            row["park_id"],
        ):
            found(
                Mismatch(
                    "amount_differs",
                    key,
                    row["park_id"],
                    **ours,
                    **_billing_fields(made),
                    note="outside Billing's list for the window",
                )
            )
    return looked_up


def _billing_fields(made: BillingPayout) -> dict[str, Any]:
    return {
        "billing_id": made.id,
        "billing_amount": made.amount,
        "billing_currency": made.currency,
        "billing_created_at": made.created_at,
    }


class _Patience:
    """Wait out Billing's pauses (they are not errors); retry a few transient errors in a row."""

    def __init__(self, on_pause: Callable[[float], None] | None) -> None:
        self.on_pause = on_pause
        self.errors = 0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                result = await fn()
            except Transient as exc:
                await self.after(exc)
                continue
            self.errors = 0
            return result

    async def after(self, exc: Transient) -> None:
        if isinstance(exc, Paused):
            if self.on_pause is not None:
                self.on_pause(exc.retry_after)
            await asyncio.sleep(exc.retry_after)
            return
        self.errors += 1
        if self.errors > TRANSIENT_RETRIES:
            raise ReconcileError(f"Billing unavailable: {exc}") from exc
        await asyncio.sleep(retry.delay(self.errors - 1, cap=TRANSIENT_BACKOFF_CAP_SECONDS))


# --- the daily run by the workers --------------------------------------------------------


async def run_daily(deps: Deps) -> Summary:
    """Reconcile the last RECONCILE_DAYS days; record, audit and report the result."""
    sample: list[dict[str, Any]] = []

    def keep(mismatch: Mismatch) -> None:
        logger.warning("reconciliation mismatch: %s", mismatch.line())
        if len(sample) < AUDIT_SAMPLE:
            sample.append(mismatch.to_json())

    async with deps.pool.connection() as conn:
        window = await db.fetch_one(conn, Q["daily_window"], days=RECONCILE_DAYS)
        if window is None:
            raise InvariantError("window is not None")
        summary = await reconcile(conn, deps.billing, window["since"], window["until"], keep)
        async with conn.transaction():
            await db.execute(
                conn,
                Q["record_run"],
                since=summary.since,
                until=summary.until,
                mismatches=summary.mismatches,
                by_kind=dict(summary.by_kind),
            )
            await checks.record(
                conn,
                checks.RECONCILE,
                ok=summary.mismatches == 0,
                detail=f"{summary.mismatches} mismatches" if summary.mismatches else None,
            )
            await audit.write(
                conn,
                audit.Entry(
                    actor_type="system",
                    actor_id="worker",
                    action="billing.reconcile",
                    outcome="ok" if summary.mismatches == 0 else "mismatches_found",
                    details={
                        "since": format_timestamp(summary.since),
                        "until": format_timestamp(summary.until),
                        "mismatches": summary.mismatches,
                        "by_kind": dict(summary.by_kind),
                        "billing_payouts_listed": summary.billing_listed,
                        "looked_up_by_key": summary.looked_up,
                        "sample": sample,
                    },
                ),
            )
    await refresh_gauges(deps.pool)
    log = logger.warning if summary.mismatches else logger.info
    log(
        "reconciliation of %s .. %s: %s mismatches (%s Billing payouts listed)",
        format_timestamp(summary.since),
        format_timestamp(summary.until),
        summary.mismatches,
        summary.billing_listed,
    )
    return summary


async def refresh_gauges(pool: db.Pool) -> None:
    """Every worker reports the latest daily run, whichever worker ran it."""
    async with pool.connection() as conn:
        row = await db.fetch_one(conn, Q["latest_run"])
    observability.RECONCILIATION_MISMATCHES.set(row["mismatches"] if row else 0)
    observability.RECONCILIATION_LAST_RUN.set(row["finished_at"] if row else 0)


# --- `fleet-payouts reconcile` -----------------------------------------------------------


async def main(
    settings: Settings,
    *,
    since: datetime | None,
    until: datetime | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print each mismatch of [since, until); 0 when none, 1 when some, 2 when unsure.

    Read-only: the daily run, not this, feeds the gauge. Billing is called
    through the shared gate, so the workers' budget holds meanwhile.
    """
    pool = db.make_pool(settings.database_url.reveal(), name="reconcile", min_size=1, max_size=2)
    try:
        await pool.open(wait=True, timeout=10)
    except psycopg.Error as exc:
        await pool.close()
        print(f"fleet-payouts reconcile: database unavailable: {exc}", file=err)
        return 2
    billing = billing_gate.client(pool, settings)
    try:
        async with pool.connection() as conn:
            if until is None:
                now = await db.fetch_one(conn, Q["now"])
                if now is None:
                    raise InvariantError("now is not None")
                until = now["now"]
            since = since if since is not None else until - timedelta(days=1)
            if since >= until:
                print("fleet-payouts reconcile: --since must be before --until", file=err)
                return 2
            summary = await reconcile(
                conn,
                billing,
                since,
                until,
                lambda m: print(m.line(), file=out, flush=True),
                on_pause=lambda s: print(f"Billing calls paused; waiting {s:.1f}s", file=err),
            )
    except (ReconcileError, psycopg.Error) as exc:
        print(f"fleet-payouts reconcile: {exc}", file=err)
        return 2
    finally:
        await billing.aclose()
        await pool.close()
    print(
        f"reconcile {format_timestamp(summary.since)} .. {format_timestamp(summary.until)}: "
        f"{summary.mismatches} mismatch(es); {summary.billing_listed} Billing payouts listed, "
        f"{summary.looked_up} looked up by key",
        file=out,
    )
    return 1 if summary.mismatches else 0
