"""service/ops/migrate.py: procrastinate's schema and ours, applied once, safely in parallel."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest

from service.core import db
from service.ops import migrate
from service.ops.migrate import Migration
from tests.helpers.api import ordered_payout
from tests.helpers.audit import Pg, connect
from tests.helpers.emulator import REPO_ROOT
from tests.helpers.procs import wait_for

# procrastinate's schema, then every file of migrations/ in name order.
EXPECTED_FIRST_RUN = ["procrastinate/schema", *(m.name for m in migrate.own_migrations())]
TABLES = ["parks", "payouts", "audit_log", "procrastinate_jobs", "schema_migrations"]


async def fetch_scalar(url: str, query: str, *params: object) -> object:
    conn = await db.connect(url, name="test")
    async with conn:
        cur = await conn.execute(query, params or None)
        row = await cur.fetchone()
        assert row is not None
        return next(iter(row.values()))


async def recorded(url: str) -> set[str]:
    conn = await db.connect(url, name="test")
    async with conn:
        cur = await conn.execute("SELECT name FROM schema_migrations")
        return {r["name"] for r in await cur.fetchall()}


def month_name(months_ahead: int) -> str:
    now = datetime.now(UTC)
    index = now.year * 12 + now.month - 1 + months_ahead
    return f"audit_log_{index // 12:04d}_{index % 12 + 1:02d}"


async def test_first_run_applies_procrastinate_and_our_schema(empty_db_url: str) -> None:
    """On an empty database, migrate creates procrastinate's tables and ours and records both."""
    applied = await migrate.migrate(empty_db_url)
    assert EXPECTED_FIRST_RUN == applied
    for table in TABLES:
        assert table == await fetch_scalar(empty_db_url, "SELECT to_regclass(%s)::text", table)
    names = await recorded(empty_db_url)
    assert set(EXPECTED_FIRST_RUN) <= names
    # Every upgrade file procrastinate ships is recorded, so none is replayed later.
    assert {m.name for m in migrate.procrastinate_upgrades()} <= names


async def test_second_run_is_a_no_op(empty_db_url: str) -> None:
    """Running migrate on an up-to-date database applies nothing and records nothing new."""
    await migrate.migrate(empty_db_url)
    before = await recorded(empty_db_url)
    assert [] == await migrate.migrate(empty_db_url)
    assert before == await recorded(empty_db_url)


async def test_three_concurrent_runs_apply_everything_exactly_once(empty_db_url: str) -> None:
    """Three migrate() calls at once all succeed, between them apply each file once, then none."""
    results = await asyncio.gather(*(migrate.migrate(empty_db_url) for _ in range(3)))
    assert sorted(EXPECTED_FIRST_RUN) == sorted(name for r in results for name in r)
    assert [] == await migrate.migrate(empty_db_url)


def test_three_concurrent_migrate_commands_succeed(empty_db_url: str) -> None:
    """Three `fleet-payouts migrate` processes started at once all exit 0; a fourth applies none."""
    env = {**os.environ, "DATABASE_URL": empty_db_url}
    cmd = [sys.executable, "-m", "service", "migrate"]
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert [0, 0, 0] == codes, outputs
    summary = sorted(out.strip() for out, _ in outputs)
    assert [
        "migrate: applied 0 migration(s)",
        "migrate: applied 0 migration(s)",
        f"migrate: applied {len(EXPECTED_FIRST_RUN)} migration(s): "
        + ", ".join(EXPECTED_FIRST_RUN),
    ] == summary, outputs
    fourth = subprocess.run(
        cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert 0 == fourth.returncode, fourth.stderr
    assert "migrate: applied 0 migration(s)" == fourth.stdout.strip()


async def test_audit_partitions_cover_at_least_three_months_ahead(empty_db_url: str) -> None:
    """After migrate, audit_log has partitions for this month and the next three at least."""
    await migrate.migrate(empty_db_url)
    ahead = await fetch_scalar(empty_db_url, "SELECT audit_log_months_ahead()")
    assert isinstance(ahead, int)
    assert ahead >= 3
    for i in range(4):
        name = month_name(i)
        assert name == await fetch_scalar(empty_db_url, "SELECT to_regclass(%s)::text", name)


async def test_edited_migration_is_refused(db_url: str) -> None:
    """A recorded migration whose file no longer matches its checksum raises MigrationError."""
    conn = await db.connect(db_url, name="test")
    async with conn:
        await conn.execute(
            "UPDATE schema_migrations SET checksum = 'x' WHERE name = '0001_schema.sql'"
        )
    with pytest.raises(migrate.MigrationError, match=r"0001_schema\.sql"):
        await migrate.migrate(db_url)


# --- migration 0020: a unique index built CONCURRENTLY -----------------------------

FILE_0020 = "0020_one_payout_per_billing_payout.sql"
INDEX_0020 = "payouts_one_per_billing_payout"


def as_before_0020(pg: Pg) -> None:
    """The database as the release before left it: no index, 0020 not recorded."""
    pg.execute(f"DROP INDEX {INDEX_0020}")
    pg.execute("DELETE FROM schema_migrations WHERE name = %s", (FILE_0020,))


def index_0020(pg: Pg) -> dict[str, object] | None:
    """The index's oid and validity; None if there is none."""
    return pg.execute(
        "SELECT i.indexrelid::int AS oid, i.indisvalid AS valid FROM pg_index i"
        " WHERE i.indexrelid = to_regclass(%s)",
        (INDEX_0020,),
    ).fetchone()


def settle(pg: Pg, payout_id: uuid.UUID, billing_payout_id: str) -> None:
    pg.execute(
        "UPDATE payouts SET status = 'succeeded', billing_payout_id = %s, completed_at = now()"
        " WHERE id = %s",
        (billing_payout_id, payout_id),
    )


def succeeded(pg: Pg, park: str, billing_payout_id: str) -> uuid.UUID:
    """A payout of `park` that succeeded with `billing_payout_id`."""
    payout_id = ordered_payout(pg, park)
    settle(pg, payout_id, billing_payout_id)
    return payout_id


async def test_payouts_already_sharing_a_billing_payout_stay_outside_the_new_index(
    db_url: str, pg: Pg, caplog: pytest.LogCaptureFixture
) -> None:
    """Two payouts that already share a Billing payout when 0020 runs do not stop migrate: it
    names them at error level, leaves them as they are, and the index it builds refuses that
    value (and every other one taken) to any new payout."""
    as_before_0020(pg)
    shared = sorted(
        [succeeded(pg, "mig-p", "b-shared"), succeeded(pg, "mig-p", "b-shared")], key=str
    )
    succeeded(pg, "mig-p", "b-own")

    with caplog.at_level(logging.ERROR, logger="service.ops.migrate"):
        assert [FILE_0020] == await migrate.migrate(db_url)

    assert {"valid": True} == {"valid": (index_0020(pg) or {}).get("valid")}
    [logged] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert FILE_0020 in logged and INDEX_0020 in logged
    assert f"b-shared: {shared[0]}, {shared[1]}" in logged
    for taken in ("b-shared", "b-own"):
        with pytest.raises(psycopg.errors.UniqueViolation) as refused:
            settle(pg, ordered_payout(pg, f"mig-{taken}"), taken)
        assert INDEX_0020 == refused.value.diag.constraint_name
    # The records stay as they were, and a bank return still applies to the one spared.
    pg.execute(
        "UPDATE payouts SET status = 'returned', return_code = 'account_closed',"
        " returned_at = now() WHERE id = %s",
        (shared[1],),
    )
    rows = pg.execute(
        "SELECT status FROM payouts WHERE billing_payout_id = 'b-shared' ORDER BY id::text"
    ).fetchall()
    assert ["succeeded", "returned"] == [r["status"] for r in rows]


async def test_too_many_payouts_sharing_billing_payouts_refuse_0020_by_name(
    db_url: str, pg: Pg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_SPARED_ROWS, migrate refuses 0020 with an error naming the file, the index, the
    shared value and each payout, records nothing and leaves no half-built index behind."""
    monkeypatch.setattr(migrate, "MAX_SPARED_ROWS", 0)
    as_before_0020(pg)
    shared = [succeeded(pg, "mig-p", "b-shared") for _ in range(2)]

    with pytest.raises(migrate.MigrationError) as refused:
        await migrate.migrate(db_url)

    for named in [FILE_0020, INDEX_0020, "b-shared", *map(str, shared)]:
        assert named in str(refused.value)
    assert None is index_0020(pg)
    assert FILE_0020 not in await recorded(db_url)


async def test_an_index_left_invalid_by_an_interrupted_build_is_built_again(
    db_url: str, pg: Pg
) -> None:
    """An invalid index left by a build that was interrupted before 0020 was recorded is dropped
    and built again (valid, a new index), and 0020 is recorded."""
    before = index_0020(pg)
    assert before is not None
    pg.execute("DELETE FROM schema_migrations WHERE name = %s", (FILE_0020,))
    pg.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s", (before["oid"],))

    assert [FILE_0020] == await migrate.migrate(db_url)

    after = index_0020(pg)
    assert after is not None and after["valid"] is True and after["oid"] != before["oid"]
    assert FILE_0020 in await recorded(db_url)


async def test_an_index_built_before_0020_was_recorded_is_kept(db_url: str, pg: Pg) -> None:
    """A valid index whose file a stopped run did not record is kept as it is, and recorded."""
    before = index_0020(pg)
    pg.execute("DELETE FROM schema_migrations WHERE name = %s", (FILE_0020,))

    assert [FILE_0020] == await migrate.migrate(db_url)
    assert before == index_0020(pg)


def migrate_waits_on_a_lock(pg: Pg) -> bool:
    row = pg.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'fleet-payouts-migrate' AND wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row["n"])


def test_writes_to_payouts_go_on_while_0020_builds_its_index(db_url: str, pg: Pg) -> None:
    """While 0020's index waits for a transaction writing to payouts, another write to payouts
    goes through at once (a plain CREATE INDEX would queue it behind its lock), and the build
    completes once that transaction ends."""
    as_before_0020(pg)
    writing, other = ordered_payout(pg, "mig-p"), ordered_payout(pg, "mig-q")
    # The holder ends (commits or, on a failure here, rolls back) before the pool waits.
    with ThreadPoolExecutor(1) as pool, connect(db_url, autocommit=False) as holder:
        holder.execute("UPDATE payouts SET failure_message = 'x' WHERE id = %s", (writing,))
        built = pool.submit(asyncio.run, migrate.migrate(db_url))
        wait_for(lambda: migrate_waits_on_a_lock(pg), timeout=60, what="the build to wait")

        pg.execute("SET lock_timeout = '200ms'")
        pg.execute("UPDATE payouts SET failure_message = 'y' WHERE id = %s", (other,))
        assert not built.done()
        holder.commit()
        assert [FILE_0020] == built.result(timeout=60)
    assert {"valid": True} == {"valid": (index_0020(pg) or {}).get("valid")}


async def test_a_table_without_a_one_column_key_is_refused_naming_the_shared_values(
    db_url: str, pg: Pg
) -> None:
    """Rows that share a value of a concurrent unique index on a table with no one-column key
    cannot be left out by key: migrate refuses, naming each value and how many rows share it,
    and leaves no half-built index behind."""
    pg.execute("CREATE TABLE scratch (k text, n int)")
    pg.execute("INSERT INTO scratch VALUES ('a', 1), ('a', 2), ('b', 3)")
    file = Migration(
        "0099_scratch.sql",
        f"{migrate.CONCURRENTLY}\nCREATE UNIQUE INDEX CONCURRENTLY scratch_k ON scratch (k);\n",
    )
    conn = await db.connect(db_url, name="test")
    async with conn:
        with pytest.raises(migrate.MigrationError, match=r"0099_scratch\.sql: .*a: 2 rows"):
            await migrate._build_concurrently(conn, file, "scratch_k")
    assert {"i": None} == pg.execute("SELECT to_regclass('scratch_k') AS i").fetchone()
