"""The events outbox in the database: which changes write an event, what it holds, and the
position that orders the feed by commit (migrations/0005_events.sql)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from service.events import outbox as events
from tests.helpers.events import Conn, finish, insert_payout, register_parks, stored

FINAL = ["succeeded", "failed", "skipped"]
# A test that would wait on a lock for ever fails in seconds instead.
LOCK_WAIT: dict[str, Any] = {"options": "-c lock_timeout=10s"}


@pytest.fixture
def parks(pg: Conn) -> list[str]:
    register_parks(pg, "a", "b", "c")
    return ["a", "b", "c"]


def payout_row(pg: Conn, payout_id: str) -> dict[str, object]:
    row = pg.execute("SELECT * FROM payouts WHERE id = %s", (payout_id,)).fetchone()
    assert row is not None
    return dict(row)


def snapshot_of(pg: Conn, payout_id: str, kind: str) -> dict[str, object]:
    row = pg.execute(
        "SELECT payout::text AS payout FROM events WHERE payout_id = %s AND type = %s",
        (payout_id, kind),
    ).fetchone()
    assert row is not None
    return events.snapshot(row["payout"])


def test_a_new_payout_writes_one_created_event_with_its_snapshot(
    pg: Conn, parks: list[str]
) -> None:
    """Inserting a payout writes exactly one payout.created event holding the row as inserted."""
    payout_id = insert_payout(pg, "a")
    assert [("payout.created", payout_id, "a")] == [
        (e["type"], e["payout_id"], e["park_id"]) for e in stored(pg)
    ]
    row = payout_row(pg, payout_id)
    snap = snapshot_of(pg, payout_id, "payout.created")
    assert {k: row[k] for k in snap} | {"id": payout_id} == snap


@pytest.mark.parametrize("status", FINAL)
def test_only_the_final_status_writes_an_event(pg: Conn, parks: list[str], status: str) -> None:
    """pending -> processing writes nothing; the final update writes one payout.<status> event."""
    payout_id = insert_payout(pg, "a")
    pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    pg.execute("UPDATE payouts SET failure_message = 'retrying' WHERE id = %s", (payout_id,))
    assert ["payout.created"] == [e["type"] for e in stored(pg)]
    finish(pg, payout_id, status)
    assert ["payout.created", f"payout.{status}"] == [e["type"] for e in stored(pg)]
    snap = snapshot_of(pg, payout_id, f"payout.{status}")
    row = payout_row(pg, payout_id)
    assert (status, row["completed_at"], row["updated_at"]) == (
        snap["status"],
        snap["completed_at"],
        snap["updated_at"],
    )


def test_money_in_the_snapshot_is_exact(pg: Conn, parks: list[str]) -> None:
    """Amounts come back from the snapshot as the same Decimal the payout holds."""
    payout_id = insert_payout(pg, "a")
    finish(pg, payout_id, "succeeded")
    snap = snapshot_of(pg, payout_id, "payout.succeeded")
    assert (Decimal("12.50"), "RUB") == (snap["amount"], snap["currency"])


def test_a_rolled_back_change_leaves_no_event(pg: Conn, parks: list[str]) -> None:
    """An insert and a final update that roll back leave the events table as it was."""
    kept = insert_payout(pg, "b")
    with pytest.raises(RuntimeError), pg.transaction():
        insert_payout(pg, "a")
        finish(pg, kept, "failed")
        raise RuntimeError("roll back")
    assert [("payout.created", kept)] == [(e["type"], e["payout_id"]) for e in stored(pg)]


def test_one_statement_creating_many_payouts_writes_one_event_each(
    pg: Conn, parks: list[str]
) -> None:
    """A multi-row insert (as the periodic scan does) writes a created event per row inserted."""
    insert_payout(pg, "c")
    rows = pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " SELECT gen_random_uuid(), p, 'periodic', 100000 FROM unnest(%s::text[]) p"
        " ON CONFLICT (park_id) WHERE status IN ('pending', 'processing') DO NOTHING"
        " RETURNING id::text",
        (parks,),
    ).fetchall()
    assert 2 == len(rows)
    created = {e["payout_id"] for e in stored(pg) if e["type"] == "payout.created"}
    assert {r["id"] for r in rows} < created
    assert 3 == len(created)


def test_events_cannot_be_edited(pg: Conn, parks: list[str]) -> None:
    """The database refuses an UPDATE of an event."""
    insert_payout(pg, "a")
    with pytest.raises(psycopg.errors.IntegrityConstraintViolation):
        pg.execute("UPDATE events SET type = 'payout.failed'")


def test_an_event_written_after_another_committed_sorts_after_it(
    pg: Conn, db_url: str, parks: list[str]
) -> None:
    """A press that took its transaction id before a worker's `failed` committed still puts
    its `created` after that `failed` in the feed (the transaction id alone would not)."""
    first = insert_payout(pg, "a")
    # Taken by the worker beforehand, as the payout job does in a statement of its own.
    pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (first,))
    with (
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row, **LOCK_WAIT) as press,
        psycopg.connect(db_url, autocommit=True, row_factory=dict_row, **LOCK_WAIT) as worker,
        press.transaction(),
    ):
        # As the instant path does: lock the park first (this takes the transaction id).
        press.execute("SELECT 1 FROM parks WHERE park_id = 'a' FOR UPDATE")
        press_xid = press.execute("SELECT pg_current_xact_id()::text AS x").fetchone()
        with worker.transaction():
            worker_xid = worker.execute("SELECT pg_current_xact_id()::text AS x").fetchone()
            finish(worker, first, "failed")
        second = insert_payout(press, "a")
    assert press_xid is not None and worker_xid is not None
    assert int(press_xid["x"]) < int(worker_xid["x"])  # the race did happen
    assert [
        ("payout.created", first),
        ("payout.failed", first),
        ("payout.created", second),
    ] == [(e["type"], e["payout_id"]) for e in stored(pg, "a")]
