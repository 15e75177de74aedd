"""Bank returns (SPEC section 8): Billing's returns feed, applied to our payouts.

Days after a payout succeeded the bank may send it back. A worker task reads
Billing's `GET /v1/returns` at least once a minute, one reader at a time
under the `returns` lease (scan_leases, the database's clock), each call
through the shared Billing budget. Each page is applied in one transaction
with the feed's cursor, so a reader that dies mid-page applies it again
later, and applying is idempotent (only a `succeeded` payout can become
`returned`: the trigger says so).

For each return: the payout moves `succeeded -> returned` with its code and
time, the park is put on hold (`payout_returned: <code>`, by the system),
its clocks forget the returned payout (it no longer counts as the last
payout nor as a periodic attempt, so the park is due again once released),
and system audit entries are written; the event comes from the outbox
trigger. A return no succeeded payout of ours explains (an unknown key, a
payout that failed here) is never applied: it is kept for reconciliation,
which reports it as `returned_at_billing`.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from service.billing.client import BillingReturn, Transient
from service.core import db, observability
from service.core.lease import Lease
from service.payouts import store as payouts
from service.payouts.execution import Deps

logger = logging.getLogger(__name__)
Q = db.queries("returns")
LEASE_NAME = "returns"
# Pages read per run at most: a backlog drains over a few runs, and one run
# never holds the lease for long.
MAX_PAGES = 20


async def read(deps: Deps) -> int:
    """Apply the returns Billing recorded since the last run; how many were applied."""
    lease = Lease(LEASE_NAME, timedelta(seconds=deps.settings.stalled_job_seconds))
    applied = 0
    async with deps.pool.connection() as conn:
        if not await lease.take(conn):
            return 0
        try:
            for _ in range(MAX_PAGES):
                cursor = await _cursor(conn)
                try:
                    page = await deps.billing.returns_page(cursor)
                except Transient as exc:
                    logger.warning("returns feed unavailable: %s", exc)
                    break
                if not await lease.take(conn):
                    logger.warning("returns reader lost its lease; stopping")
                    break
                async with conn.transaction():
                    for item in page.returns:
                        applied += await apply(conn, item)
                    if page.next_cursor is not None and page.next_cursor != cursor:
                        await _save_cursor(conn, page.next_cursor)
                if not page.returns or page.next_cursor in (None, cursor):
                    break
        finally:
            await lease.release(conn)
    return applied


async def apply(conn: db.Conn, item: BillingReturn) -> int:
    """Apply one return inside the caller's transaction: 1 if applied, 0 if not ours to apply."""
    payout_id = _our_id(item.idempotency_key)
    if payout_id is not None:
        await _lock_park(conn, payout_id)
        done = await _apply(conn, payout_id, item)
        if done is not None:
            observability.RETURNS.labels(item.code).inc()
            logger.warning(
                "payout %s returned by the bank (%s); park %s put on hold",
                payout_id,
                item.code,
                done.park_id,
                extra={"payout_id": str(payout_id), "park_id": done.park_id},
            )
            return 1
        ours = await _status(conn, payout_id)
        if ours == "returned":
            return 0  # read again after a lost cursor: applied already
    else:
        ours = None
    logger.error(
        "Billing reports a return (%s) under key %s that no succeeded payout of ours explains",
        item.code,
        item.idempotency_key[:128],
    )
    await _unmatched(conn, item, our_status=ours)
    return 0


def _our_id(key: str) -> uuid.UUID | None:
    """Our payout ids are the keys we send; anything else is not ours."""
    try:
        return uuid.UUID(key)
    except ValueError:
        return None


# --- the queries (sql/returns.sql) ----------------------------------------------------


async def _cursor(conn: db.Conn) -> str | None:
    return await db.fetch_value(conn, str, Q["cursor"])


async def _save_cursor(conn: db.Conn, cursor: str) -> None:
    await db.execute(conn, Q["save_cursor"], cursor=cursor)


async def _lock_park(conn: db.Conn, payout_id: uuid.UUID) -> None:
    await db.execute(conn, Q["lock_park"], id=payout_id)


async def _apply(conn: db.Conn, payout_id: uuid.UUID, item: BillingReturn) -> payouts.Record | None:
    """The payout as returned; None when it is not succeeded here."""
    return await db.fetch_as(
        conn,
        payouts.Record,
        Q["apply"],
        id=payout_id,
        code=item.code,
        returned_at=item.returned_at,
    )


async def _status(conn: db.Conn, payout_id: uuid.UUID) -> str | None:
    """Our status of the payout; None when there is no such payout."""
    return await db.fetch_value(conn, str, Q["status"], id=payout_id)


async def _unmatched(conn: db.Conn, item: BillingReturn, *, our_status: str | None) -> None:
    await db.execute(
        conn,
        Q["unmatched"],
        key=item.idempotency_key[:255],
        code=item.code,
        returned_at=item.returned_at,
        our_status=our_status,
    )
