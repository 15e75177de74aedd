"""`fleet-payouts migrate`: procrastinate's schema and ours, in order, exactly once.

Every host runs this at start-up, so it must be safe three at a time: a
session advisory lock serialises the runs, each file is applied in its own
transaction together with the row that records it, and a run that finds
everything recorded does nothing.

procrastinate tracks nothing itself: on an empty database we apply its full
schema and record every upgrade file it ships as already applied; later
versions' upgrade files are then applied in version order.

A file whose first line is `-- migrate: concurrently` holds one CREATE [UNIQUE] INDEX
CONCURRENTLY and runs outside a transaction, so that no write waits for the build (see
_build_concurrently: an interrupted build, and rows that already break a unique one).

Around the files: the database roles (service/ops/roles.py) before, so that what the
files create belongs to fleet_payouts_owner, and their privileges after; then the
audit partitions ahead, and the partition indexes that a migration created
`ON ONLY` the parent, built CONCURRENTLY so that no insert waits for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import pathlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, LiteralString, TypeVar, cast

import psycopg
from procrastinate.schema import SchemaManager
from psycopg import sql

from service.audit import store as audit
from service.core import db
from service.ops import roles

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Arbitrary but fixed: every host must take the same lock.
MIGRATION_LOCK_KEY = 0x666C_7065_6D69_6772 & 0x7FFF_FFFF_FFFF_FFFF
# Waiting runs poll for the lock rather than queue for it: a session waiting inside
# pg_advisory_lock() holds a snapshot that CREATE INDEX CONCURRENTLY, run by the
# holder, would wait for in turn.
LOCK_POLL_SECONDS = 0.2
PROCRASTINATE_BASE = "procrastinate/schema"

CONCURRENTLY = "-- migrate: concurrently"
_CONCURRENT_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?P<name>[a-z_][a-z0-9_]*)\s+ON\s",
    re.IGNORECASE | re.MULTILINE,
)
# A unique index built over rows that already break it: a build that meets them is
# tried again without them (after the first try, and once more if a release before
# wrote another meanwhile), then migrate gives up and names them.
CONCURRENT_ATTEMPTS = 3
# More rows than this sharing values is no stray record but a wrong index or wrong
# data: migrate refuses, naming them, rather than list them all in the predicate.
MAX_SPARED_ROWS = 1000
# A CONCURRENTLY build waits for every transaction older than its snapshots, in any
# session of the database: a psql left idle in a transaction (no timeout ends a DBA's)
# holds it for as long as it stays open. Migrate waits -- ending someone's session is
# not its decision -- but says this often which sessions it waits for.
WAIT_REPORT_SECONDS = 10.0

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

    @property
    def concurrent_index(self) -> str | None:
        """The index a `-- migrate: concurrently` file builds; None for the other files."""
        if not self.sql.startswith(CONCURRENTLY + "\n"):
            return None
        statement = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        ).strip()
        found = _CONCURRENT_INDEX.match(statement)
        if found is None or ";" in statement.rstrip(";"):
            raise MigrationError(
                f"{self.name}: a `{CONCURRENTLY}` file holds exactly one "
                "CREATE [UNIQUE] INDEX CONCURRENTLY statement"
            )
        return found["name"]


Q_MIGRATE = db.queries("migrate")


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


async def migrate(url: str, *, role_names: roles.Roles = roles.ROLES) -> list[str]:
    """Bring the database to the current version; return the names applied."""
    applied_now: list[str] = []
    conn = await db.connect(url, name="migrate")
    async with conn:
        await _lock(conn)
        try:
            await roles.prepare(conn, role_names)
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
                index = migration.concurrent_index
                if index is not None:
                    await _build_concurrently(conn, migration, index, url=url)
                    await _record(conn, migration)
                else:
                    await db.ddl_transaction(
                        conn, _applying(conn, migration), f"migration {migration.name}"
                    )
                applied_now.append(migration.name)

            await audit.ensure_partitions(conn)
            await complete_partition_indexes(conn, url=url)
            await roles.grant(conn, role_names)
        finally:
            await conn.execute("RESET ROLE")
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


async def _lock(conn: db.Conn) -> None:
    """Take the migration lock, saying every WAIT_REPORT_SECONDS which session holds it
    (another host's migrate, or the server session of one killed mid-build, which goes
    on building until its statement ends)."""
    loop = asyncio.get_running_loop()
    report_at = loop.time() + WAIT_REPORT_SECONDS
    while True:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (MIGRATION_LOCK_KEY,))
        row = await cur.fetchone()
        if row and row["got"]:
            return
        if loop.time() >= report_at:
            report_at = loop.time() + WAIT_REPORT_SECONDS
            holder = await db.fetch_one(conn, Q_MIGRATE["lock_holder"], key=MIGRATION_LOCK_KEY)
            if holder is not None:
                logger.warning(
                    "waiting for the migration lock, held by %s", _session(holder, "connected")
                )
        await asyncio.sleep(LOCK_POLL_SECONDS)


def _applying(conn: db.Conn, migration: Migration) -> Callable[[], Awaitable[None]]:
    async def apply() -> None:
        await conn.execute(migration.sql)
        await _record(conn, migration)

    return apply


async def _build_concurrently(
    conn: db.Conn, migration: Migration, index: str, *, url: str | None = None
) -> None:
    """Build the file's index CONCURRENTLY: writes to the table go on while it builds.

    A build that failed or was interrupted leaves the index invalid (enforcing and
    slowing writes, serving no read): it is dropped and built again. A unique index
    that meets rows already sharing a value is built again without them, as long as the
    table's key names them and they are few: they are records, which cannot be edited,
    and a migrate that refused would keep every host it runs on from starting. They are
    logged at error level and stay visible in the index's predicate (pg_indexes).
    """
    statement = migration.sql
    for attempt in itertools.count(1):
        valid = await db.fetch_value(conn, bool, Q_MIGRATE["index_valid"], name=index)
        if valid is True:
            return  # built by a run that stopped before recording the file
        if valid is False:
            await _drop_index(conn, index)
        try:
            await _reporting_waits(conn, url, index, conn.execute(statement))
            return
        except psycopg.errors.UniqueViolation as exc:
            try:
                statement = await _sparing_shared_rows(conn, migration, index, exc, attempt)
            except MigrationError:
                await _drop_index(conn, index)
                raise


async def _reporting_waits(
    conn: db.Conn, url: str | None, index: str, statement: Awaitable[T]
) -> T:
    """Await `statement` (a CONCURRENTLY build on `conn`); every WAIT_REPORT_SECONDS it
    runs, log at warning level the sessions it waits for, read on a second connection
    to `url` (none: it waits silently)."""
    running = asyncio.ensure_future(statement)
    watch: db.Conn | None = None
    try:
        while True:
            done, _ = await asyncio.wait({running}, timeout=WAIT_REPORT_SECONDS)
            if done or url is None:
                return await running
            try:
                watch = watch or await db.connect(url, name="migrate-watch")
                blockers = await db.fetch_all(
                    watch, Q_MIGRATE["blockers"], pid=conn.info.backend_pid
                )
            except psycopg.Error as exc:
                logger.warning("building index %s; cannot tell what it waits for: %s", index, exc)
                continue
            if blockers:
                logger.warning(
                    "building index %s CONCURRENTLY: waiting for %s to end (a build waits for "
                    "every older transaction; end it, or pg_terminate_backend(pid))",
                    index,
                    "; ".join(_session(b, "transaction open") for b in blockers),
                )
    finally:
        if not running.done():
            running.cancel()
        if watch is not None:
            await watch.close()


def _session(row: dict[str, Any], age: str) -> str:
    """A session as the blockers and lock_holder queries name it, `age` saying since what."""
    return (
        f"pid {row['pid']} (user {row['user']}, {row['application_name'] or 'no app'} from "
        f"{row['client'] or 'local'}, {row['state']}, {age} {row['age']}, last: {row['query']})"
    )


async def _drop_index(conn: db.Conn, index: str) -> None:
    await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(sql.Identifier(index)))


async def _sparing_shared_rows(
    conn: db.Conn,
    migration: Migration,
    index: str,
    exc: psycopg.errors.UniqueViolation,
    attempt: int,
) -> str:
    """The index's statement again, without the rows that already share a value (read
    from the invalid index the failed build left); MigrationError if it cannot be."""
    parts = await db.fetch_one(conn, Q_MIGRATE["unique_index_parts"], name=index)
    if parts is None:
        raise MigrationError(f"{migration.name}: {exc}") from exc
    key = sql.SQL(cast(LiteralString, parts["key"]))
    primary_key = parts["primary_key"]
    rows = sql.SQL(cast(LiteralString, primary_key or "NULL"))
    predicate = parts["predicate"]
    cur = await conn.execute(
        sql.SQL(
            "SELECT ({key})::text AS value, array_agg(({rows})::text ORDER BY ({rows})::text)"
            " FILTER (WHERE ({rows}) IS NOT NULL) AS rows, count(*) AS n"
            " FROM {table} WHERE {predicate} GROUP BY {key} HAVING count(*) > 1 ORDER BY 1"
        ).format(
            key=key,
            rows=rows,
            table=sql.SQL(cast(LiteralString, parts["table_name"])),
            predicate=sql.SQL(cast(LiteralString, predicate or "true")),
        )
    )
    shared = await cur.fetchall()
    named = "; ".join(
        f"{r['value']}: {', '.join(r['rows'] or [str(r['n']) + ' rows'])}" for r in shared
    )
    where = f"{parts['table_name']} ({parts['key']}), by {primary_key or 'no one-column key'}"
    spared = [row for r in shared for row in (r["rows"] or [])[1:]]
    if primary_key is None or len(spared) > MAX_SPARED_ROWS or attempt >= CONCURRENT_ATTEMPTS:
        raise MigrationError(
            f"{migration.name}: unique index {index} cannot be built: rows of {where} "
            f"share a value it must keep unique: {named or exc}"
        ) from exc
    logger.error(
        "%s: rows of %s already share a value that unique index %s keeps unique; "
        "they are records, left as they are and outside the index (the first of each stays "
        "in it, so no new row takes the value): %s",
        migration.name,
        where,
        index,
        named,
    )
    spare = sql.SQL("{} NOT IN ({})").format(
        sql.SQL(cast(LiteralString, primary_key)),
        sql.SQL(", ").join(sql.Literal(row) for row in spared),
    )
    rebuilt = sql.SQL("{} WHERE {}").format(
        sql.SQL(cast(LiteralString, parts["definition"])),
        sql.SQL("({}) AND {}").format(sql.SQL(cast(LiteralString, predicate)), spare)
        if predicate
        else spare,
    )
    text = rebuilt.as_string(conn)
    prefix = "CREATE UNIQUE INDEX "
    if not text.startswith(prefix):
        raise MigrationError(f"{migration.name}: unexpected definition of {index}: {text}")
    return prefix + "CONCURRENTLY " + text[len(prefix) :]


async def complete_partition_indexes(conn: db.Conn, *, url: str | None = None) -> int:
    """Build, CONCURRENTLY, each partition's share of an index that a migration created
    `ON ONLY` a partitioned table, and attach it; the parent index turns valid once
    every partition has its share. Returns how many it built.

    A plain CREATE INDEX on a partitioned table holds a SHARE lock on every partition
    until it has indexed them all: on a log of millions of rows, every audited press
    would wait that long. An index left invalid by an interrupted run is rebuilt.
    """
    built = 0
    for row in await db.fetch_all(conn, Q_MIGRATE["unattached_partition_indexes"]):
        child = sql.Identifier(row["child"])
        if row["child_valid"] is False:
            await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(child))
        if row["child_valid"] is not True:
            # Catalog text (pg_get_indexdef) after its "USING": method and columns.
            method_and_columns = sql.SQL(cast(LiteralString, row["using_clause"]))
            build = sql.SQL("CREATE INDEX CONCURRENTLY {} ON {}{}").format(
                child, sql.Identifier(row["partition"]), method_and_columns
            )
            await _reporting_waits(conn, url, row["child"], conn.execute(build))
            built += 1
        await conn.execute(
            sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                sql.Identifier(row["parent_index"]), child
            )
        )
    return built


async def _record(conn: db.Conn, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (name, checksum) VALUES (%s, %s)",
        (migration.name, migration.checksum),
    )
