"""The append-only audit log: write an entry inside the caller's transaction.

The database refuses UPDATE, DELETE and TRUNCATE on audit_log (triggers in
migrations/0001_schema.sql): an entry, once committed, is there for good.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg import sql

from service import db

Q = db.queries("audit")
ActorType = Literal["user", "admin", "system"]


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


@dataclasses.dataclass(frozen=True)
class Filters:
    park_id: str | None = None
    actor_id: str | None = None
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def page(
    conn: db.Conn, filters: Filters, *, limit: int, after: tuple[datetime, int] | None
) -> list[dict[str, Any]]:
    """Newest first, keyset pagination on (at, id).

    The WHERE clause names only the filters given: with `(x IS NULL OR ...)`
    a cached generic plan could not pick the park or actor index, and this
    table grows for years.
    """
    conditions: list[sql.Composable] = []
    params: dict[str, Any] = {"limit": limit}
    for column, op in (
        ("park_id", "="),
        ("actor_id", "="),
        ("action", "="),
        ("since", ">="),
        ("until", "<"),
    ):
        value = getattr(filters, column)
        if value is not None:
            target = "at" if column in ("since", "until") else column
            conditions.append(
                sql.SQL("{} {} {}").format(
                    sql.Identifier(target), sql.SQL(op), sql.Placeholder(column)
                )
            )
            params[column] = value
    if after is not None:
        conditions.append(sql.SQL("(at, id) < (%(after_at)s, %(after_id)s)"))
        params.update(after_at=after[0], after_id=after[1])
    where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    query = sql.SQL(
        "SELECT * FROM audit_log WHERE {} ORDER BY at DESC, id DESC LIMIT %(limit)s"
    ).format(where)
    cur = await conn.execute(query, params)
    return await cur.fetchall()
