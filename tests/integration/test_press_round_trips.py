"""How many round trips the instant press costs, counted on the wire (libpq's trace)."""

from __future__ import annotations

import tempfile
from decimal import Decimal
from pathlib import Path

from service.core import db
from service.payouts import instant
from service.payouts.instant import InstantRequest
from tests.conftest import make_settings

PARK = "press-trips"


def round_trips(trace: Path) -> int:
    """Frontend messages that end a round trip: Sync (extended protocol) or Query (simple)."""
    fields = [line.split("\t") for line in trace.read_text().splitlines()]
    return sum(1 for f in fields if len(f) > 3 and f[1] == "F" and f[3] in ("Sync", "Query"))


async def pressed(conn: db.Conn, db_url: str, key: str) -> tuple[str, int]:
    """Press once on `conn`, tracing its protocol; (outcome, round trips)."""
    settings = make_settings(db_url)
    req = InstantRequest(PARK, "user-1", key, f"req-{key}", Decimal("10.00"))
    with tempfile.NamedTemporaryFile("w", suffix=".trace") as f:
        conn.pgconn.trace(f.fileno())
        try:
            await instant.request_instant(conn, settings, req)
            outcome = "accepted"
        except instant.Refused as refusal:
            outcome = refusal.code
        finally:
            conn.pgconn.untrace()
        return outcome, round_trips(Path(f.name))


async def test_an_accepted_press_is_one_round_trip_and_a_refused_one_two(
    conn: db.Conn, db_url: str
) -> None:
    """An accepted press costs 1 round trip (one function call in autocommit); a press refused
    because a payout is in flight costs 2 (the call, then its audit entry)."""
    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled) VALUES (%s, true)", (PARK,)
    )
    assert ("accepted", 1) == await pressed(conn, db_url, "k-1")
    assert ("payout_in_progress", 2) == await pressed(conn, db_url, "k-2")
