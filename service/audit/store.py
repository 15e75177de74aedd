"""The append-only audit log: write an entry inside the caller's transaction, list
entries, keep monthly partitions ahead.

The database refuses UPDATE, DELETE and TRUNCATE on audit_log, by privilege for
the app role and by trigger for everyone (migrations/0001_schema.sql, 0003): an
entry, once committed, is there for good. It also links every entry into a hash
chain at insert; service/audit/chain.py verifies the chains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg import sql

from service.core import db, listing, retry

logger = logging.getLogger(__name__)
Q = db.queries("audit")
ActorType = Literal["user", "admin", "system"]
# Current month plus four: at least three months ahead on the month's last day.
MONTHS_AHEAD = 4
# A month whose ATTACH could not get its lock (200 ms, in the SQL function) is tried
# again this many times, backing off; then the next hourly run tries.
PARTITION_ATTEMPTS = 5
# What GET /v1/audit shows; the chain columns are for `audit verify`.
COLUMNS = sql.SQL(
    "id, at, actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details"
)


@dataclasses.dataclass(frozen=True)
class Entry:
    actor_type: ActorType
    actor_id: str | None
    action: str
    outcome: str
    park_id: str | None = None
    request_id: str | None = None
    payout_id: UUID | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


async def write(conn: db.Conn, entry: Entry) -> None:
    await db.execute(conn, Q["insert"], **dataclasses.asdict(entry))


@dataclasses.dataclass(frozen=True, slots=True)
class Logged:
    """An entry as written (COLUMNS: what GET /v1/audit and the console show)."""

    id: int
    at: datetime
    actor_type: str
    actor_id: str | None
    park_id: str | None
    action: str
    outcome: str
    request_id: str | None
    payout_id: UUID | None
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Filters:
    park_id: str | None = None
    actor_id: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def page(
    conn: db.Conn, filters: Filters, *, limit: int, after: tuple[datetime, int] | None
) -> list[Logged]:
    """Newest first, keyset pagination on (at, id), only the filters given (core/listing.py)."""
    query, params = listing.newest_first(
        table="audit_log", columns=COLUMNS, at="at", filters=filters, after=after, limit=limit
    )
    async with conn.cursor(row_factory=db.row_as(Logged)) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def ensure_partitions(
    conn: db.Conn, months_ahead: int = MONTHS_AHEAD, *, attempts: int = PARTITION_ATTEMPTS
) -> int:
    """Create the missing monthly partitions up to `months_ahead`; returns how many.

    Never blocks a press: each ATTACH waits at most 200 ms for its lock. A month that
    did not get it is retried a few times here, then left to the next run (the
    AuditPartitionsRunningOut alert watches the runway).
    """
    created = 0
    missing = 0
    for attempt in range(attempts):
        async with conn.transaction():
            # The SQL function adds a month to a timestamptz, which PostgreSQL does in the
            # session's TimeZone (a fresh cluster's default is the host's): in a zone west
            # of UTC, or one with DST, the month would end days or hours off the UTC month,
            # leaving a gap no insert fits (or an overlap that stops every later month).
            await conn.execute("SET LOCAL TimeZone = 'UTC'")
            made = await db.fetch_value(
                conn, int, Q["ensure_partitions"], months_ahead=months_ahead
            )
        created += made or 0
        missing = (
            await db.fetch_value(conn, int, Q["missing_partitions"], months_ahead=months_ahead) or 0
        )
        if not missing:
            return created
        if attempt + 1 < attempts:
            await asyncio.sleep(retry.delay(attempt, base=0.2, cap=5.0))
    logger.warning(
        "audit_log: %d of the next %d monthly partitions still missing (lock timeouts); "
        "the next run tries again",
        missing,
        months_ahead + 1,
    )
    return created
