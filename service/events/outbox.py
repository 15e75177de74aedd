"""The payout events outbox: reading it in commit order, and each event's JSON.

Events are written by triggers on `payouts` (migrations/0005_events.sql), in
the transaction of the change; nothing in Python writes one. Each gets a
position once it has committed, from the database's sequencer
(migrations/0008_feed_positions.sql): readers stamp what has committed, then
read stamped events in position order, so a reader never misses an event nor
sees one twice, and no open transaction anywhere holds the feed back.

Takes a connection from its caller, never opens one.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from service.core import db
from service.payouts.wire import from_snapshot, payout_json, timestamp

Q = db.queries("events")
Row = dict[str, Any]

# A page never holds more than this (GET /v1/events `limit`, 1-100).
PAGE_MAX = 100
_XID8_END = 2**64
_BIGINT_END = 2**63

# Before every event: positions start at 1.
START = 0


class UnknownPosition(Exception):
    """A position past the feed's end: no reader could have been given it."""


class ExpiredPosition(Exception):
    """Events after this position were deleted (EVENTS_RETENTION_DAYS): resume at `oldest`."""

    def __init__(self, oldest: int) -> None:
        super().__init__(f"events after this cursor are gone; the oldest kept follows {oldest}")
        self.oldest = oldest


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event as the feed reads it; `payout` is the snapshot's JSON text."""

    seq: int
    position: int
    type: str
    created_at: datetime
    payout: str


@dataclasses.dataclass(frozen=True, slots=True)
class EventColumns:
    """An event's columns in a row that may carry none (an empty page, a park whose owed
    events are gone): the rows that read them extend this, their own columns after."""

    seq: int | None
    position: int | None
    type: str | None
    created_at: datetime | None
    payout: str | None

    def event(self) -> Event | None:
        if (
            self.seq is None
            or self.position is None
            or self.type is None
            or self.created_at is None
            or self.payout is None
        ):
            return None
        return Event(self.seq, self.position, self.type, self.created_at, self.payout)


@dataclasses.dataclass(frozen=True, slots=True)
class _PageRow(EventColumns):
    """A row of the page queries: an event (all None on an empty page), the feed's ends."""

    last_position: int
    oldest: int


@dataclasses.dataclass(frozen=True)
class Page:
    events: list[Event]
    next: int


def position_part(value: Any) -> int:
    """A cursor's position, checked (for params.decode_cursor: ValueError means 400)."""
    return _bounded_int(value, _BIGINT_END)


def xid_part(value: Any) -> int:
    """A v5 cursor's xid8 part, checked (for params.decode_cursor: ValueError means 400)."""
    return _bounded_int(value, _XID8_END)


def seq_part(value: Any) -> int:
    """A v5 cursor's seq part, checked (for params.decode_cursor: ValueError means 400)."""
    return _bounded_int(value, _BIGINT_END)


def _bounded_int(value: Any, end: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < end:
        raise ValueError("not a cursor position")
    return value


# What one call of the sequencer stamps at most. A reader's call stays short
# (a backlog, e.g. the events of v5 right after the deploy, about 0.2 s per
# thousand on a busy host) so that readers queued behind it stay well inside
# the API's statement timeout; the webhook dispatcher's start stamps in bulk.
READ_BATCH = 1_000
SEQUENCE_BATCH = 10_000


async def sequence(conn: db.Conn, batch: int = READ_BATCH) -> int:
    """Give up to `batch` committed events their positions (autocommit: they commit at once)."""
    return await db.fetch_value(conn, int, Q["sequence"], batch=batch) or 0


async def legacy_position(conn: db.Conn, xid: int, seq: int) -> int | None:
    """The position that resumes a v5 (xid, seq) cursor; None if we cannot have issued it."""
    await sequence(conn)
    return await db.fetch_value(conn, int, Q["legacy_position"], xid=str(xid), seq=seq)


async def page(conn: db.Conn, *, after: int, limit: int, park_id: str | None) -> Page:
    """Up to `limit` events after position `after` (one park's, or every park's), oldest first.

    The next position is the last event's, or `after` itself when nothing newer
    is committed yet. Raises UnknownPosition for a position from the future and
    ExpiredPosition when events after `after` were deleted by retention.
    """
    await sequence(conn)
    if park_id is None:
        rows = await db.fetch_all_as(conn, _PageRow, Q["page"], after=after, limit=limit)
    else:
        rows = await db.fetch_all_as(
            conn, _PageRow, Q["park_page"], park_id=park_id, after=after, limit=limit
        )
    if after > rows[0].last_position:
        raise UnknownPosition(f"position {after} is past the feed's end")
    oldest = rows[0].oldest
    if after != START and after < oldest - 1:
        raise ExpiredPosition(oldest - 1)
    found = [e for e in (r.event() for r in rows) if e is not None]
    return Page(found, found[-1].position if found else after)


# Retention deletes this many events per statement (each its own short
# transaction), up to EXPIRE_BATCHES_PER_RUN per hourly run: a backlog is
# worked off over runs, never in one long lock.
EXPIRE_BATCH = 5000
EXPIRE_BATCHES_PER_RUN = 200


async def expire(conn: db.Conn, days: float) -> int:
    """Delete the events older than `days` (EVENTS_RETENTION_DAYS), a batch at a time."""
    deleted = 0
    for _ in range(EXPIRE_BATCHES_PER_RUN):
        count = await db.fetch_value(conn, int, Q["expire"], days=days, batch=EXPIRE_BATCH) or 0
        deleted += count
        if count < EXPIRE_BATCH:
            break
    return deleted


def event_json(event: Event) -> dict[str, Any]:
    """The API's event object (SPEC section 3): the feed's and the webhooks' alike."""
    return {
        "id": event_id(event.seq),
        "type": event.type,
        "created_at": timestamp(event.created_at),
        "payout": payout_json(snapshot(event.payout)),
    }


def event_id(seq: int) -> str:
    """Opaque to consumers; unique because seq is (and the same as v5 gave)."""
    return f"evt_{seq}"


def snapshot(text: str) -> Row:
    """The payout columns the trigger stored, as the payouts table types them (wire.py)."""
    return from_snapshot(json.loads(text, parse_float=Decimal))
