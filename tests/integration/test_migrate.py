"""service/ops/migrate.py: procrastinate's schema and ours, applied once, safely in parallel."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from service.core import db
from service.ops import migrate
from tests.helpers.emulator import REPO_ROOT

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
