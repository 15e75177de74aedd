"""One due rule: the scan's (park_periodic_due, migrations/0018) and the API's
(model.next_periodic_payout_at) agree on every edge, and no query spells the rule again."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from psycopg.rows import DictRow

from service.core import db, queue
from service.payouts.model import next_periodic_payout_at
from tests.helpers.emulator import REPO_ROOT

AT = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # a DST night in Europe: days stay 24 h in UTC
N = timedelta(days=7)
TICK = timedelta(microseconds=1)

# (enabled, on hold, registered_at, last payout, last periodic attempt)
CASES = [
    (True, False, AT - N, None, None),
    (True, False, AT - N + TICK, None, None),
    (True, False, AT - N - TICK, None, None),
    (True, False, AT - 3 * N, AT - N + TICK, None),
    (True, False, AT - 3 * N, None, AT - N + TICK),
    (True, False, AT - 3 * N, AT - 2 * N, AT - N),
    (True, False, AT - 3 * N, AT - N, AT - 2 * N),
    (True, False, AT + N, None, None),
    (True, False, AT - 3 * N, AT + TICK, AT - 2 * N),
    (False, False, AT - 3 * N, None, None),
    (True, True, AT - 3 * N, None, None),
    (False, True, AT - 3 * N, None, None),
]


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
@pytest.mark.parametrize(("enabled", "on_hold", "registered", "paid", "attempted"), CASES)
def test_the_python_rule_answers_as_the_scans(
    pg: psycopg.Connection[DictRow],
    zone: str,
    enabled: bool,
    on_hold: bool,
    registered: datetime,
    paid: datetime | None,
    attempted: datetime | None,
) -> None:
    """Due in SQL exactly when the Python rule's next payout time has come, to the microsecond,
    whatever the session's TimeZone (AT is the night Berlin's clocks go forward)."""
    pg.execute(f"SET TimeZone = '{zone}'")
    row = pg.execute(
        "SELECT park_periodic_due(%(enabled)s, %(hold)s, %(registered)s, %(paid)s,"
        " %(attempted)s, %(period)s, %(at)s) AS due,"
        " park_periodic_anchor(%(registered)s, %(paid)s, %(attempted)s) AS anchor",
        {
            "enabled": enabled,
            "hold": "dispute" if on_hold else None,
            "registered": registered,
            "paid": paid,
            "attempted": attempted,
            "period": N,
            "at": AT,
        },
    ).fetchone()
    assert row is not None
    next_at = next_periodic_payout_at(
        enabled=enabled,
        on_hold=on_hold,
        registered_at=registered,
        last_succeeded_at=paid,
        last_periodic_attempt_at=attempted,
        period=N,
    )
    assert row["due"] == (next_at is not None and next_at <= AT)
    if next_at is not None:
        assert next_at == row["anchor"].astimezone(UTC) + N


def test_no_query_spells_the_due_rule_again() -> None:
    """No named query computes the anchor (greatest of the park's three clocks) itself."""
    anchor = re.compile(r"greatest\([^)]*registered_at", re.IGNORECASE)
    assert [] == [
        p.name for p in sorted((REPO_ROOT / "sql").glob("*.sql")) if anchor.search(p.read_text())
    ]


def test_the_app_role_runs_the_due_scan(app_db_url: str, pg: psycopg.Connection[DictRow]) -> None:
    """Logged in as the service's own role, the scan's queries call the rule's functions and
    its insert draws the job's id from procrastinate's sequence."""
    pg.execute(
        "INSERT INTO parks (park_id, registered_at) VALUES ('due-park', now() - interval '8 days')"
    )
    queries = db.queries("periodic")
    with psycopg.connect(app_db_url, autocommit=True) as app:
        found = app.execute(queries["due_candidates"], {"period": N, "limit": 10}).fetchall()
        assert [("due-park",)] == found
        with app.transaction():
            locked = app.execute(
                queries["lock_due"], {"period": N, "park_ids": ["due-park"]}
            ).fetchall()
            made = app.execute(
                queries["insert"],
                {
                    "ids": [uuid.uuid4()],
                    "park_ids": ["due-park"],
                    "available": [None],
                    "currency": [None],
                    "max_amount": Decimal("1000"),
                    "min_amount": Decimal("1"),
                    **queue.payout_job("periodic"),
                },
            ).rowcount
        assert [("due-park",)] == locked
        assert 1 == made
    jobs = pg.execute("SELECT p.job_id = j.id AS same FROM payouts p, procrastinate_jobs j")
    assert [True] == [r["same"] for r in jobs.fetchall()]
