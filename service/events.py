"""The payout events outbox: reading it in commit order, and each event's JSON.

Events are written by triggers on `payouts` (migrations/0005_events.sql), in
the transaction of the change; nothing in Python writes one. Readers walk the
feed with a position (xid8, seq) that only moves forward: see the migration
for why a reader never misses an event nor sees one twice.

Takes a connection from its caller, never opens one.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from service import db
from service.wire import payout_json, timestamp

Q = db.queries("events")
Row = dict[str, Any]

# A page never holds more than this (GET /v1/events `limit`, 1-100).
PAGE_MAX = 100
_XID8_END = 2**64
_BIGINT_END = 2**63


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """Where a reader is in the feed: after the event with this (xid, seq)."""

    xid: int
    seq: int

    @classmethod
    def of(cls, row: Row) -> Position:
        return cls(int(row["xid"]), int(row["seq"]))


# Before every event.
START = Position(0, 0)


class UnknownPosition(Exception):
    """A position past the feed's horizon: no reader could have been given it."""


@dataclasses.dataclass(frozen=True)
class Page:
    events: list[Row]
    next: Position


def xid_part(value: Any) -> int:
    """A cursor's xid8 part, checked (for params.decode_cursor: ValueError means 400)."""
    return _bounded_int(value, _XID8_END)


def seq_part(value: Any) -> int:
    """A cursor's seq part, checked (for params.decode_cursor: ValueError means 400)."""
    return _bounded_int(value, _BIGINT_END)


def _bounded_int(value: Any, end: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < end:
        raise ValueError("not a cursor position")
    return value


async def page(conn: db.Conn, *, after: Position, limit: int, park_id: str | None) -> Page:
    """Up to `limit` events after `after` (one park's, or every park's), oldest first.

    The next position is the last event's, or `after` itself when nothing newer
    is committed yet. Raises UnknownPosition for a position from the future.
    """
    params = {"after_xid": str(after.xid), "after_seq": after.seq, "limit": limit}
    if park_id is None:
        rows = await db.fetch_all(conn, Q["page"], **params)
    else:
        rows = await db.fetch_all(conn, Q["park_page"], park_id=park_id, **params)
    # Issued positions are all below the horizon of the read that issued
    # them, and the horizon (the oldest running transaction) never goes back.
    if after != START and after.xid >= int(rows[0]["horizon"]):
        raise UnknownPosition(f"position {after} is past the feed's horizon")
    found = [r for r in rows if r["seq"] is not None]
    return Page(found, Position.of(found[-1]) if found else after)


def event_json(row: Row) -> dict[str, Any]:
    """The API's event object (SPEC section 3) of a row read by this module."""
    return {
        "id": event_id(row["seq"]),
        "type": row["type"],
        "created_at": timestamp(row["created_at"]),
        "payout": payout_json(snapshot(row["payout"])),
    }


def event_id(seq: int) -> str:
    """Opaque to consumers; unique because seq is."""
    return f"evt_{seq}"


def snapshot(text: str) -> Row:
    """The payout columns the trigger stored, as the payouts table types them."""
    payout: Row = json.loads(text, parse_float=Decimal)
    for column in ("created_at", "updated_at", "completed_at"):
        if payout[column] is not None:
            payout[column] = datetime.fromisoformat(payout[column])
    return payout
