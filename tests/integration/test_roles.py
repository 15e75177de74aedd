"""Database roles (SPEC section 7): what `migrate` sets up and what each role may do.

The app role is what `serve` and `worker` log in as: it runs the whole payout flow, but
audit_log is append-only to it by privilege, not only by trigger.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from service.audit import chain as audit_chain
from service.audit import store as audit
from service.billing.client import BillingClient, Budget
from service.core import db
from service.ops import gauges, maintenance, migrate, roles
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.conftest import create_database, drop_database, make_settings, with_user
from tests.helpers.api import app_client, press_headers, register, set_balance
from tests.helpers.audit import THIS_MONTH, Pg, connect, partition, verify

APP = roles.ROLES.app
_names = itertools.count()


def denied_as_app(app_db_url: str, statement: str) -> str:
    """Run one statement as the app role; return the error PostgreSQL refused it with."""
    with (
        psycopg.connect(app_db_url, autocommit=True) as c,
        pytest.raises(psycopg.errors.InsufficientPrivilege) as refused,
    ):
        c.execute(statement)
    return str(refused.value)


NEXT = partition(audit_chain.next_month(THIS_MONTH))
REFUSED_ON_AUDIT = [
    "UPDATE {t} SET outcome = 'ok'",
    "DELETE FROM {t}",
    "TRUNCATE {t}",
    "ALTER TABLE {t} ADD COLUMN note text",
    "ALTER TABLE {t} DISABLE TRIGGER audit_log_append_only",
    "ALTER TABLE {t} DISABLE TRIGGER ALL",
    "CREATE TRIGGER sneak BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION audit_log_chain()",
    "DROP TABLE {t}",
]


@pytest.mark.parametrize("table", ["audit_log", "partition"])
@pytest.mark.parametrize("statement", REFUSED_ON_AUDIT)
def test_app_role_cannot_change_the_audit_log(
    pg: Pg, app_db_url: str, table: str, statement: str
) -> None:
    """As the app role, every change to audit_log or a partition but INSERT is refused by a
    privilege check (never reaching the append-only trigger), even on an empty table."""
    target = "audit_log" if table == "audit_log" else NEXT
    message = denied_as_app(app_db_url, statement.format(t=target))
    assert "permission denied" in message or "must be owner" in message, message


@pytest.mark.parametrize(
    "statement",
    [
        f"ALTER TABLE audit_log DETACH PARTITION {NEXT}",
        f"SELECT * FROM {NEXT}",
        f"INSERT INTO {NEXT} (id, actor_type, action, outcome) VALUES (1, 'user', 'a', 'ok')",
        "UPDATE audit_chain_heads SET last_seq = 0",
        "INSERT INTO audit_archive (month, entries, month_digest, location, export_sha256) "
        "VALUES ('2020-01-01', 0, sha256(''), 'x', repeat('0', 64))",
        "CREATE TABLE shadow (id int)",
        "SELECT audit_chain_open_month('2020-01-01')",
    ],
)
def test_app_role_cannot_reach_around_audit_log(app_db_url: str, statement: str) -> None:
    """The app role can touch neither partitions, chain heads, archive records, nor the schema."""
    message = denied_as_app(app_db_url, statement)
    assert "permission denied" in message or "must be owner" in message, message


def test_readonly_role_reads_everything_and_writes_nothing(pg: Pg) -> None:
    """fleet_payouts_readonly SELECTs the log, its partitions, heads and payouts; not INSERT."""
    pg.execute(f"SET ROLE {roles.ROLES.readonly}")
    for table in ("audit_log", partition(THIS_MONTH), "audit_chain_heads", "payouts", "parks"):
        pg.execute(f"SELECT count(*) FROM {table}").fetchone()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        pg.execute("INSERT INTO parks (park_id) VALUES ('p1')")


def test_every_object_belongs_to_the_owner(pg: Pg) -> None:
    """After migrate, fleet_payouts_owner owns every table, sequence, function and type."""
    rows = pg.execute(
        "SELECT c.relname AS name FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relowner <> %(o)s::regrole "
        "UNION ALL SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
        "AND proowner <> %(o)s::regrole "
        "UNION ALL SELECT typname FROM pg_type WHERE typnamespace = 'public'::regnamespace "
        "AND typowner <> %(o)s::regrole",
        {"o": roles.ROLES.owner},
    ).fetchall()
    assert [] == rows


async def test_app_role_runs_a_whole_instant_payout(
    pg: Pg, db_url: str, app_db_url: str, billing_url: str
) -> None:
    """As the app role: register, press, execute the job, refresh gauges, create partitions;
    the payout succeeds and its audit entries verify."""
    set_balance(billing_url, "p1", "700.00")
    with app_client(app_db_url) as client:
        register(client, "p1")
        r = client.post("/v1/payouts/instant", headers=press_headers(), json={})
        assert 202 == r.status_code, r.text
        payout_id = uuid.UUID(r.json()["id"])

    pool = db.make_pool(app_db_url, name="test", max_size=2)
    await pool.open(wait=True)
    billing = BillingClient(billing_url, token=None, timeout=2.0, budget=Budget(1000))
    try:
        deps = Deps(pool=pool, billing=billing, settings=make_settings(app_db_url, billing_url))
        assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
        await gauges.refresh_gauges(pool)
        pg.execute(f"DROP TABLE {NEXT}")
        assert 1 == await maintenance.ensure_partitions(deps)
    finally:
        await billing.aclose()
        await pool.close()

    actions = pg.execute(
        "SELECT action FROM audit_log WHERE payout_id = %s ORDER BY id", (payout_id,)
    ).fetchall()
    assert ["payout.instant.request", "payout.succeeded"] == [a["action"] for a in actions]
    owner = pg.execute(
        "SELECT relowner::regrole::text AS o FROM pg_class WHERE relname = %s", (NEXT,)
    )
    assert roles.ROLES.owner == owner.fetchone()["o"]  # type: ignore[index]
    outcome, _ = await verify(db_url)
    assert isinstance(outcome, audit_chain.Summary), outcome


# --- migrate, as roles and clusters really are ----------------------------------------


@pytest.fixture
def server(pg_server_url: str) -> Iterator[Pg]:
    with psycopg.connect(pg_server_url, autocommit=True, row_factory=dict_row) as c:
        yield c


def fresh_roles() -> roles.Roles:
    """Role names no database of this cluster knows yet."""
    tag = f"{os.getpid()}_{next(_names)}"
    return roles.Roles(
        owner=f"fpt_owner_{tag}",
        app=f"fpt_app_{tag}",
        readonly=f"fpt_ro_{tag}",
        ops=f"fpt_ops_{tag}",
    )


def drop_roles(server: Pg, *names: str) -> None:
    for name in names:
        server.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def plain_user(server: Pg) -> Iterator[str]:
    """A login role that is neither superuser nor CREATEROLE (a typical managed-database user)."""
    name = f"fpt_plain_{os.getpid()}_{next(_names)}"
    server.execute(f"CREATE ROLE {name} LOGIN")
    yield name
    drop_roles(server, name)


@pytest.fixture
def plain_db_url(server: Pg, pg_server_url: str, plain_user: str) -> Iterator[str]:
    """An empty database that `plain_user` owns, and so may create objects in."""
    url = create_database(pg_server_url, template="template0")
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    server.execute(f'ALTER DATABASE "{name}" OWNER TO {plain_user}')
    yield url
    drop_database(pg_server_url, url)


async def test_migrate_that_may_not_create_roles_says_what_to_run_and_continues(
    plain_db_url: str, plain_user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without CREATEROLE, migrate names the roles to create with the SQL, and migrates anyway."""
    names = fresh_roles()
    with caplog.at_level(logging.WARNING, logger="service.ops.roles"):
        applied = await migrate.migrate(with_user(plain_db_url, plain_user), role_names=names)
    assert "0003_audit_chain.sql" in applied
    said = caplog.text
    for line in (
        f"CREATE ROLE {names.owner} LOGIN",
        f"CREATE ROLE {names.app} LOGIN",
        f"CREATE ROLE {names.readonly} NOLOGIN",
        f"CREATE ROLE {names.ops} NOLOGIN",
        f"GRANT {names.owner} TO {plain_user}",
    ):
        assert line in said, said


async def test_superuser_migrate_hands_an_older_schema_to_the_owner(
    plain_db_url: str, plain_user: str, pg: Pg, caplog: pytest.LogCaptureFixture
) -> None:
    """A schema migrated by another role (as before the roles existed) is handed to the owner
    by the next migrate run as a superuser, and the app role gets its privileges."""
    with caplog.at_level(logging.WARNING, logger="service.ops.roles"):
        await migrate.migrate(with_user(plain_db_url, plain_user))
    assert f"cannot act as {roles.ROLES.owner}" in caplog.text
    superuser = with_user(plain_db_url, "postgres")
    assert [] == await migrate.migrate(superuser)
    with psycopg.connect(superuser, row_factory=dict_row) as c:
        owners = c.execute(
            "SELECT DISTINCT relowner::regrole::text AS o FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace"
        ).fetchall()
    assert [roles.ROLES.owner] == [r["o"] for r in owners]
    with psycopg.connect(with_user(plain_db_url, APP), autocommit=True) as app:
        app.execute("INSERT INTO parks (park_id) VALUES ('p1')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("DELETE FROM audit_log")


async def test_several_databases_create_the_roles_at_once(server: Pg, pg_server_url: str) -> None:
    """Three databases of one cluster migrating at once with roles not yet there all succeed."""
    names = fresh_roles()
    urls = [create_database(pg_server_url, template="template0") for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate.migrate(u, role_names=names) for u in urls))
        assert [True, True, True] == ["0003_audit_chain.sql" in r for r in results]
        found = server.execute(
            "SELECT count(*) AS n FROM pg_roles WHERE rolname IN (%s, %s, %s)",
            (names.owner, names.app, names.readonly),
        ).fetchone()
        assert found is not None
        assert 3 == found["n"]
    finally:
        for url in urls:
            drop_database(pg_server_url, url)
        drop_roles(server, names.ops, names.owner, names.app, names.readonly)


async def test_partition_upkeep_as_the_app_role_gives_dbas_the_new_month(
    pg: Pg, app_db_url: str
) -> None:
    """A month the app role's upkeep creates is the owner's, readable by DBAs, not by the app."""
    pg.execute(f"DROP TABLE {NEXT}")
    conn = await db.connect(app_db_url, name="test")
    async with conn:
        assert 1 == await audit.ensure_partitions(conn)
    pg.execute(f"SET ROLE {roles.ROLES.readonly}")
    pg.execute(f"SELECT count(*) FROM {NEXT}")
    pg.execute("RESET ROLE")
    with connect(app_db_url) as app, pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(f"SELECT count(*) FROM {NEXT}")


def test_app_db_url_logs_in_as_the_app_role(app_db_url: str) -> None:
    """app_db_url's sessions are fleet_payouts_app's, which the tests above rely on."""
    with connect(app_db_url) as c:
        row = c.execute("SELECT current_user AS u").fetchone()
    assert row is not None
    assert APP == row["u"]
