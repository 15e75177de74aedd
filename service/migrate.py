"""`fleet-payouts migrate`: procrastinate's schema and ours, in order, exactly once.

Every host runs this at start-up, so it must be safe three at a time: a
session advisory lock serialises the runs, each file is applied in its own
transaction together with the row that records it, and a run that finds
everything recorded does nothing.

procrastinate tracks nothing itself: on an empty database we apply its full
schema and record every upgrade file it ships as already applied; later
versions' upgrade files are then applied in version order.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from dataclasses import dataclass
from typing import LiteralString

from procrastinate.schema import SchemaManager

from service import db

logger = logging.getLogger(__name__)

# Arbitrary but fixed: every host must take the same lock.
MIGRATION_LOCK_KEY = 0x666C_7065_6D69_6772 & 0x7FFF_FFFF_FFFF_FFFF
# Current month plus four: at least three months ahead on the month's last day.
AUDIT_MONTHS_AHEAD = 4
PROCRASTINATE_BASE = "procrastinate/schema"

CREATE_LEDGER: LiteralString = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    """An applied migration file was edited afterwards, or one failed to apply."""


def procrastinate_upgrades() -> list[Migration]:
    path = pathlib.Path(SchemaManager.get_migrations_path())
    return [
        Migration(f"procrastinate/{p.name}", p.read_text("utf-8"))
        for p in sorted(path.glob("*.sql"))
    ]


def own_migrations() -> list[Migration]:
    files = db.resource_dir("migrations")
    names = sorted(f.name for f in files.iterdir() if f.name.endswith(".sql"))
    return [Migration(n, files.joinpath(n).read_text("utf-8")) for n in names]


async def migrate(url: str) -> list[str]:
    """Bring the database to the current version; return the names applied."""
    applied_now: list[str] = []
    conn = await db.connect(url, name="migrate")
    async with conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            await conn.execute(CREATE_LEDGER)
            rows = await (
                await conn.execute("SELECT name, checksum FROM schema_migrations")
            ).fetchall()
            done = {r["name"]: r["checksum"] for r in rows}

            pending: list[Migration] = []
            upgrades = procrastinate_upgrades()
            if PROCRASTINATE_BASE not in done:
                base = Migration(PROCRASTINATE_BASE, SchemaManager.get_schema())
                async with conn.transaction():
                    await conn.execute(base.sql)
                    await _record(conn, base)
                    # The full schema already contains every upgrade it ships with.
                    for upgrade in upgrades:
                        await _record(conn, upgrade)
                applied_now.append(base.name)
            else:
                pending.extend(u for u in upgrades if u.name not in done)

            for migration in own_migrations():
                if migration.name in done:
                    if done[migration.name] != migration.checksum:
                        raise MigrationError(
                            f"{migration.name} was changed after it was applied; "
                            "migrations are forward-only: add a new file instead"
                        )
                    continue
                pending.append(migration)

            for migration in pending:
                logger.info("applying migration %s", migration.name)
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await _record(conn, migration)
                applied_now.append(migration.name)

            await ensure_audit_partitions(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


async def ensure_audit_partitions(conn: db.Conn) -> int:
    cur = await conn.execute(
        "SELECT audit_log_ensure_partitions(%s) AS created", (AUDIT_MONTHS_AHEAD,)
    )
    row = await cur.fetchone()
    return int(row["created"]) if row else 0


async def _record(conn: db.Conn, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
        (migration.name, migration.checksum),
    )
