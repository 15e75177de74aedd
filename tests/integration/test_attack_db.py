"""Breaks found from a DBA's chair (psql, cluster settings, a restored dump), pinned."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from service import audit, db
from tests.helpers.audit import Pg

BOUNDS = """
SELECT b.bound[1]::timestamptz AS low, b.bound[2]::timestamptz AS high
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS bound
) b
WHERE i.inhparent = 'audit_log'::regclass
ORDER BY 1
"""


def next_utc_month(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year + at.month // 12, at.month % 12 + 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin"])
async def test_partitions_are_utc_months_whatever_the_database_time_zone(
    pg: Pg, db_url: str, app_db_url: str, zone: str
) -> None:
    """With the database's TimeZone set to a zone with DST (a fresh cluster's default is the
    host's), the upkeep still makes each partition exactly one UTC month, edge to edge."""
    dbname = pg.execute("SELECT current_database() AS d").fetchone()
    assert dbname is not None
    pg.execute(f"ALTER DATABASE \"{dbname['d']}\" SET TimeZone = '{zone}'")  # type: ignore[arg-type]
    conn = await db.connect(app_db_url, name="test")
    async with conn:
        await audit.ensure_partitions(conn, months_ahead=12, attempts=1)
    rows = pg.execute(BOUNDS).fetchall()
    assert 13 <= len(rows)
    for row, following in zip(rows, [*rows[1:], None], strict=True):
        low = row["low"].astimezone(UTC)
        assert (1, 0, 0) == (low.day, low.hour, low.minute), row
        assert next_utc_month(low) == row["high"], row
        if following is not None:
            assert row["high"] == following["low"], (row, following)
