"""Audit log upkeep that never blocks a press: partitions by ATTACH, indexes CONCURRENTLY,
DDL that gives up its lock wait instead of queueing everyone behind it."""

from __future__ import annotations

import logging

import psycopg
import pytest

from service.audit import chain as audit_chain
from service.audit import store as audit
from service.core import db
from service.ops import migrate
from tests.helpers.audit import THIS_MONTH, Pg, connect, partition, write

NEXT = partition(audit_chain.next_month(THIS_MONTH))
FILTER_INDEXES = [
    "(park_id, at DESC, id DESC)",
    "(actor_id, at DESC, id DESC)",
    "(action, at DESC, id DESC)",
    "(at DESC, id DESC)",
    "(chain_stripe, chain_seq)",
]


def exists(pg: Pg, table: str) -> bool:
    row = pg.execute("SELECT to_regclass(%s) IS NOT NULL AS e", (table,)).fetchone()
    assert row is not None
    return bool(row["e"])


async def test_new_month_is_attached_while_a_long_reader_holds_the_log(pg: Pg, db_url: str) -> None:
    """With a report reading audit_log in an open transaction, the upkeep still attaches the
    missing month, and inserts go on meanwhile."""
    pg.execute(f"DROP TABLE {NEXT}")
    with connect(db_url, autocommit=False) as report, connect(db_url) as press:
        report.execute("SELECT count(*) FROM audit_log").fetchone()
        conn = await db.connect(db_url, name="test")
        async with conn:
            assert 1 == await audit.ensure_partitions(conn, attempts=1)
        press.execute("SET lock_timeout = '1s'")
        write(press)
        report.rollback()
    assert exists(pg, NEXT)


async def test_a_month_whose_lock_is_taken_is_skipped_then_created(
    pg: Pg, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While another session holds a lock ATTACH needs, the upkeep gives up after its lock
    timeouts (presses are not held) and says so; the next run creates the month."""
    pg.execute(f"DROP TABLE {NEXT}")
    conn = await db.connect(db_url, name="test")
    async with conn:
        with connect(db_url, autocommit=False) as vacuum_like, connect(db_url) as press:
            vacuum_like.execute("LOCK TABLE audit_log IN SHARE UPDATE EXCLUSIVE MODE")
            with caplog.at_level(logging.WARNING, logger="service.audit.store"):
                assert 0 == await audit.ensure_partitions(conn, attempts=2)
            press.execute("SET lock_timeout = '1s'")
            write(press)
            vacuum_like.rollback()
        assert not exists(pg, NEXT)
        assert "still missing" in caplog.text
        assert 1 == await audit.ensure_partitions(conn, attempts=1)
    assert exists(pg, NEXT)


def test_every_partition_has_an_index_for_every_audit_filter(pg: Pg) -> None:
    """Each partition indexes park_id, actor_id, action and `at`, each with (at, id), and the
    chain order; the parent indexes are all valid."""
    parts = pg.execute(
        "SELECT inhrelid::regclass::text AS p FROM pg_inherits "
        "WHERE inhparent = 'audit_log'::regclass"
    ).fetchall()
    assert len(parts) >= 4
    for part in parts:
        defs = [
            r["indexdef"]
            for r in pg.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = %s", (part["p"],)
            ).fetchall()
        ]
        for columns in FILTER_INDEXES:
            assert any(d.endswith(f"btree {columns}") for d in defs), (part, columns, defs)
    invalid = pg.execute(
        "SELECT indexrelid::regclass::text AS i FROM pg_index "
        "WHERE indrelid = 'audit_log'::regclass AND NOT indisvalid"
    ).fetchall()
    assert [] == invalid


async def test_index_made_on_only_the_parent_is_completed_concurrently(pg: Pg, db_url: str) -> None:
    """An index a migration creates ON ONLY audit_log is built on each partition and attached,
    after which the parent index is valid."""
    pg.execute("CREATE INDEX audit_log_outcome_at ON ONLY audit_log (outcome, at DESC)")
    parts = pg.execute(
        "SELECT count(*) AS n FROM pg_inherits WHERE inhparent = 'audit_log'::regclass"
    ).fetchone()
    assert parts is not None
    conn = await db.connect(db_url, name="test")
    async with conn:
        assert parts["n"] == await migrate.complete_partition_indexes(conn)
        assert 0 == await migrate.complete_partition_indexes(conn)
    valid = pg.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'audit_log_outcome_at'::regclass"
    ).fetchone()
    assert valid is not None
    assert valid["indisvalid"]
    assert exists(pg, f"{partition(THIS_MONTH)}_outcome_at")


async def test_ddl_gives_up_its_lock_wait_instead_of_queueing_presses(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDL that cannot get its lock in DDL_LOCK_TIMEOUT rolls back and, after its attempts,
    fails, rather than waiting behind a reader with every press queued behind it."""
    monkeypatch.setattr(db, "DDL_LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(db, "DDL_ATTEMPTS", 2)
    with connect(db_url, autocommit=False) as report:
        report.execute("SELECT count(*) FROM parks").fetchone()
        conn = await db.connect(db_url, name="test")
        async with conn:

            async def alter() -> None:
                await conn.execute("ALTER TABLE parks ADD COLUMN note text")

            with pytest.raises(psycopg.errors.LockNotAvailable):
                await db.ddl_transaction(conn, alter, "test")
            report.rollback()
            await db.ddl_transaction(conn, alter, "test")
