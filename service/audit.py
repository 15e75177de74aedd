"""The append-only audit log: write an entry inside the caller's transaction.

The database refuses UPDATE, DELETE and TRUNCATE on audit_log (triggers in
migrations/0001_schema.sql): an entry, once committed, is there for good.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

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
    return await db.fetch_all(
        conn,
        Q["list_page"],
        **dataclasses.asdict(filters),
        after_at=after[0] if after else None,
        after_id=after[1] if after else None,
        limit=limit,
    )
