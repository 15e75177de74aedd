"""Helpers for the audit log tests: months of entries, superuser tampering, the verifier."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from service.audit import chain as audit_chain
from service.audit.chain import Broken, MonthResult, Summary
from service.core import db
from service.ops import roles

Pg = psycopg.Connection[DictRow]
NOW = datetime.now(UTC)
THIS_MONTH = date(NOW.year, NOW.month, 1)


def months_back(n: int) -> date:
    """The first day of the month `n` months before this one."""
    index = THIS_MONTH.year * 12 + THIS_MONTH.month - 1 - n
    return date(index // 12, index % 12 + 1, 1)


def broken(outcome: Summary | Broken) -> Broken:
    """The verifier's verdict, which must be a broken link."""
    assert isinstance(outcome, Broken), outcome
    return outcome


def connect(url: str, *, autocommit: bool = True) -> Pg:
    """Another connection to the test database, rows as dicts like `pg`'s."""
    return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row)


def partition(month: date) -> str:
    return f"audit_log_{month:%Y_%m}"


def add_month(pg: Pg, month: date) -> str:
    """A partition for a past month (the upkeep only makes the current one and later),
    the owner's like the upkeep's."""
    end = audit_chain.next_month(month)
    name = partition(month)
    pg.execute(f"SET ROLE {roles.ROLES.owner}")
    pg.execute(
        f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF audit_log "
        f"FOR VALUES FROM ('{month}') TO ('{end}')"
    )
    pg.execute("RESET ROLE")
    return name


def write(pg: Pg, at: datetime | None = None, **columns: Any) -> DictRow:
    """One audit entry, linked by the trigger; returns its id and link."""
    values: dict[str, Any] = {
        "actor_type": "user",
        "actor_id": "user-1",
        "park_id": "park-1",
        "action": "payout.instant.request",
        "outcome": "ok",
        **columns,
    }
    if at is not None:
        values["at"] = at
    names = ", ".join(values)
    marks = ", ".join(f"%({n})s" for n in values)
    row = pg.execute(
        f"INSERT INTO audit_log ({names}) VALUES ({marks}) "
        "RETURNING id, at, chain_stripe, chain_seq, chain_hash",
        {k: psycopg.types.json.Jsonb(v) if isinstance(v, dict) else v for k, v in values.items()},
    ).fetchone()
    assert row is not None
    return row


def mid(month: date, day: int = 15) -> datetime:
    return datetime(month.year, month.month, day, 12, tzinfo=UTC)


@contextlib.contextmanager
def guards_off(pg: Pg) -> Iterator[None]:
    """What a superuser (or the owner) can do: switch audit_log's append-only trigger off."""
    pg.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
    try:
        yield
    finally:
        pg.execute("ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_append_only")


async def verify(
    url: str, since: date | None = None, *, full: bool = True
) -> tuple[Summary | Broken, list[MonthResult]]:
    """Run the verifier (walking every month unless `full` is false); its verdict and the
    months it reported."""
    reported: list[MonthResult] = []
    conn = await db.connect(url, name="test")
    async with conn:
        outcome = await audit_chain.verify(conn, since=since, report=reported.append, full=full)
    return outcome, reported
