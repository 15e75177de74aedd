"""Least privilege as SPEC section 7 states it, tried as each role: the policy of
service/ops/roles.py table by table and privilege by privilege, nothing by default; the
app role can neither write events nor date an audit entry; the ops role runs the
runbooks' "Do" steps and nothing more; readonly reads query text.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from service.audit import chain as audit_chain
from service.ops import migrate, reconcile, roles
from tests.conftest import TEMPLATE, drop_database, make_settings, with_dbname, with_user
from tests.helpers.audit import Pg, add_month, connect, months_back

R = roles.ROLES
ATTEMPTS = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE")


@pytest.fixture(scope="module")
def policy_db(pg_server_url: str, template_url: str) -> Iterator[str]:
    """One migrated database for the privilege-by-privilege tests, which change nothing."""
    # Its own name: tests.conftest imported here is a second copy of pytest's conftest,
    # whose database counter starts from 0 again.
    name = f"fp_policy_{os.getpid()}"
    with psycopg.connect(pg_server_url, autocommit=True) as s:
        s.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE)
            )
        )
    url = with_dbname(pg_server_url, name)
    yield url
    drop_database(pg_server_url, url)


@pytest.fixture(scope="module")
def sessions(policy_db: str) -> Iterator[dict[str, Pg]]:
    """A session as the app role (its own login), and one acting as ops (NOLOGIN: SET ROLE)."""
    with connect(with_user(policy_db, R.app)) as app, connect(policy_db) as ops:
        ops.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(R.ops)))
        yield {"app": app, "ops": ops}


def _columns(pg: Pg, table: str) -> list[str]:
    rows = pg.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
        "AND NOT attisdropped AND attidentity = '' AND attgenerated = '' ORDER BY attnum",
        (table,),
    ).fetchall()
    return [r["attname"] for r in rows]


def attempt(pg: Pg, table: str, privilege: str) -> bool:
    """Whether the session gets past the privilege check of one statement needing exactly
    `privilege` on `table` (rolled back; an error other than a refusal counts as allowed)."""
    t = sql.Identifier(table)
    column = sql.Identifier(_columns(pg, table)[0])
    statement = {
        "SELECT": sql.SQL("SELECT 1 FROM {} LIMIT 0").format(t),
        "INSERT": sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
        "UPDATE": sql.SQL("UPDATE {} SET {} = {} WHERE false").format(t, column, column),
        "DELETE": sql.SQL("DELETE FROM {} WHERE false").format(t),
        "TRUNCATE": sql.SQL("TRUNCATE {}").format(t),
    }[privilege]
    try:
        with pg.transaction(force_rollback=True):
            pg.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        return False
    except psycopg.Error:
        return True
    return True


def expected(role: str, table: str, privilege: str) -> bool:
    access = roles.TABLES[table]
    if role == "ops":
        # ops is a member of readonly, which SELECTs everything.
        return privilege in access.ops | {"SELECT"}
    return privilege in access.app


@pytest.mark.parametrize("privilege", ATTEMPTS)
@pytest.mark.parametrize("table", sorted(roles.TABLES))
@pytest.mark.parametrize("role", ["app", "ops"])
def test_each_role_has_exactly_the_privileges_its_policy_line_gives(
    sessions: dict[str, Pg], role: str, table: str, privilege: str
) -> None:
    """As the role itself, a statement needing one privilege on one table passes the
    privilege check exactly when service/ops/roles.py TABLES gives it that privilege."""
    assert expected(role, table, privilege) == attempt(sessions[role], table, privilege)


def test_the_policy_names_every_table_of_the_schema(policy_db: str) -> None:
    """Every table and view of the migrated schema has a line in TABLES and every line a
    table: a new table cannot be forgotten (it would get nothing, and this fails)."""
    with connect(policy_db) as pg:
        rows = pg.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
            "AND relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT relispartition"
        ).fetchall()
    assert sorted(roles.TABLES) == sorted(r["relname"] for r in rows)


def test_an_unlisted_table_gives_the_app_nothing(
    pg: Pg, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A table no policy line names gets no privilege for the app (SELECT for readonly),
    whatever its migration granted, and migrate names it."""
    pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(R.owner)))
    pg.execute("CREATE TABLE unlisted (id int)")
    pg.execute(sql.SQL("GRANT ALL ON unlisted TO {}").format(sql.Identifier(R.app)))
    pg.execute("RESET ROLE")
    with caplog.at_level("WARNING", logger="service.ops.roles"):
        asyncio.run(migrate.migrate(db_url))
    assert "no line of service/ops/roles.py TABLES names unlisted" in caplog.text
    with connect(with_user(db_url, R.app)) as app:
        assert [False] * 5 == [attempt(app, "unlisted", p) for p in ATTEMPTS]
    pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(R.readonly)))
    assert attempt(pg, "unlisted", "SELECT")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO events (xid, type, park_id, payout_id, payout) VALUES "
        "(pg_current_xact_id(), 'payout.succeeded', 'p1', gen_random_uuid(), '{}')",
        "UPDATE events SET type = 'payout.succeeded'",
        "DELETE FROM events",
        "TRUNCATE events",
    ],
)
def test_app_role_cannot_write_events(app_db_url: str, statement: str) -> None:
    """As the app role, no statement writes `events` directly: a leaked password cannot
    forge or erase a payout event (the outbox triggers write them as the owner)."""
    with connect(app_db_url) as app, pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(statement)


CLOSED = months_back(1)


@pytest.mark.parametrize(
    "at",
    [
        datetime(CLOSED.year, CLOSED.month, 15, 12, tzinfo=UTC),
        datetime(CLOSED.year + 1, CLOSED.month, 15, 12, tzinfo=UTC),
    ],
    ids=["closed month", "a year ahead"],
)
def test_app_role_cannot_date_an_audit_entry(pg: Pg, app_db_url: str, at: datetime) -> None:
    """As the app role, an audit entry naming its own `at` (in a closed month, or ahead) is
    refused; one that does not is dated by the database at the insert."""
    add_month(pg, CLOSED)
    with connect(app_db_url) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="audit_log"):
            app.execute(
                "INSERT INTO audit_log (at, actor_type, action, outcome) "
                "VALUES (%s, 'user', 'forged', 'ok')",
                (at,),
            )
        for column, overriding in (("id", "OVERRIDING SYSTEM VALUE"), ("chain_seq", "")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(
                    sql.SQL(
                        "INSERT INTO audit_log ({}, actor_type, action, outcome) {} "
                        "VALUES (1, 'user', 'forged', 'ok')"
                    ).format(sql.Identifier(column), sql.SQL(overriding))
                )
        with app.transaction():
            began = app.execute("SELECT now() AS t").fetchone()
            row = app.execute(
                "INSERT INTO audit_log (actor_type, action, outcome) "
                "VALUES ('user', 'honest', 'ok') RETURNING at, clock_timestamp() AS after"
            ).fetchone()
    assert began is not None and row is not None
    # The insert's own moment (clock_timestamp()), not the transaction's start.
    assert began["t"] < row["at"] <= row["after"]
    forged = pg.execute("SELECT count(*) AS n FROM audit_log WHERE action = 'forged'").fetchone()
    assert {"n": 0} == forged


def test_migrate_takes_back_privileges_granted_by_hand(pg: Pg, db_url: str) -> None:
    """A table or column privilege granted by hand beyond the policy is revoked by the next
    migrate run: INSERT on events, INSERT (at) on audit_log."""
    pg.execute(sql.SQL("GRANT INSERT ON events TO {}").format(sql.Identifier(R.app)))
    pg.execute(
        sql.SQL("GRANT INSERT (at), UPDATE (at) ON audit_log TO {}").format(sql.Identifier(R.app))
    )
    asyncio.run(migrate.migrate(db_url))
    row = pg.execute(
        "SELECT has_table_privilege(%(r)s, 'events', 'INSERT') AS events, "
        "has_column_privilege(%(r)s, 'audit_log', 'at', 'INSERT') AS at_insert, "
        "has_column_privilege(%(r)s, 'audit_log', 'at', 'UPDATE') AS at_update, "
        "has_column_privilege(%(r)s, 'audit_log', 'details', 'INSERT') AS details",
        {"r": R.app},
    ).fetchone()
    assert {"events": False, "at_insert": False, "at_update": False, "details": True} == row


# --- roles for people ---------------------------------------------------------------


def test_readonly_role_reads_other_sessions_query_text(pg: Pg, app_db_url: str) -> None:
    """fleet_payouts_readonly (pg_read_all_stats) sees the app's query text in
    pg_stat_activity, not `<insufficient privilege>`."""
    with connect(app_db_url) as app:
        app.execute("SELECT 'marker-7c1e' AS m")
        pid = app.info.backend_pid
        pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(R.readonly)))
        row = pg.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    assert row is not None
    assert "SELECT 'marker-7c1e' AS m" == row["query"]


@pytest.fixture
def login_in(pg_server_url: str, db_url: str) -> Iterator[Callable[[str], str]]:
    """Makes a person's own login, granted one of our roles as the runbooks ask; its URL."""
    made: list[str] = []

    def make(role: str) -> str:
        name = f"fpt_dba_{os.getpid()}_{len(made)}"
        with psycopg.connect(pg_server_url, autocommit=True) as s:
            s.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            s.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(name), sql.Identifier(role)
                )
            )
        made.append(name)
        return with_user(db_url, name)

    yield make
    with psycopg.connect(with_user(db_url, "postgres"), autocommit=True) as s:
        for name in made:
            s.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            s.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture
def ops_login(login_in: Callable[[str], str]) -> str:
    """A DBA's own login, granted fleet_payouts_ops."""
    return login_in(R.ops)


def _failed_job(pg: Pg) -> int:
    row = pg.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status) "
        "VALUES ('payouts', 'execute_payout', '{}', 'failed') RETURNING id"
    ).fetchone()
    assert row is not None
    return int(row["id"])


def test_ops_role_runs_every_do_step_of_the_runbooks(
    pg: Pg, ops_login: str, app_db_url: str
) -> None:
    """A DBA granted fleet_payouts_ops runs the runbooks' "Do" statements verbatim: a probe
    through billing_gate, retrying and deleting failed jobs, webhook delivery state,
    partition upkeep, ending another session."""
    retry, delete = _failed_job(pg), _failed_job(pg)
    pg.execute("INSERT INTO webhook_parks VALUES ('p1', '0', 0, '0', 0, now() + interval '1h')")
    with connect(ops_login) as dba, connect(app_db_url) as app:
        dba.execute("UPDATE billing_gate SET paused_until = now()")
        dba.execute("SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", (retry,))
        dba.execute("DELETE FROM procrastinate_jobs WHERE id = %s AND status = 'failed'", (delete,))
        dba.execute(
            "UPDATE webhook_parks SET next_attempt_at = now() WHERE next_attempt_at > now()"
        )
        dba.execute("DELETE FROM webhook_parks")
        dba.execute("DELETE FROM webhook_state")
        dba.execute(
            "INSERT INTO webhook_state (xid, seq) SELECT xid, seq FROM events "
            "ORDER BY xid DESC, seq DESC LIMIT 1"
        )
        dba.execute("SELECT audit_log_ensure_partitions(4)")
        dba.execute("SELECT pg_terminate_backend(%s)", (app.info.backend_pid,))
    statuses = pg.execute(
        "SELECT id, status FROM procrastinate_jobs WHERE id IN (%s, %s)", (retry, delete)
    ).fetchall()
    assert [(retry, "todo")] == [(r["id"], r["status"]) for r in statuses]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE payouts SET failure_message = 'x'",
        "UPDATE parks SET hold_reason = NULL",
        "INSERT INTO events (xid, type, park_id, payout_id, payout) VALUES "
        "(pg_current_xact_id(), 'payout.succeeded', 'p1', gen_random_uuid(), '{}')",
        "DELETE FROM audit_log",
        "INSERT INTO audit_archive (month, entries, month_digest, location, export_sha256) "
        "VALUES ('2020-01-01', 0, sha256(''), 'x', repeat('0', 64))",
        "UPDATE billing_reconciliations SET mismatches = 0",
        "CREATE TABLE shadow (id int)",
    ],
)
def test_ops_role_writes_nothing_else(pg: Pg, statement: str) -> None:
    """fleet_payouts_ops may not touch money, events, the audit log or the schema."""
    pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(R.ops)))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        pg.execute(statement)


async def test_reconcile_runs_as_the_ops_role(ops_login: str, billing_url: str) -> None:
    """`fleet-payouts reconcile` as a DBA's login granted fleet_payouts_ops reads both
    sides and answers 0 (its Billing calls take slots from billing_gate)."""
    out, err = io.StringIO(), io.StringIO()
    settings = make_settings(ops_login, billing_url)
    code = await reconcile.main(settings, since=None, until=None, out=out, err=err)
    assert 0 == code, err.getvalue()


async def test_audit_verify_as_readonly_walks_all_and_records_nothing(
    pg: Pg, db_url: str, login_in: Callable[[str], str]
) -> None:
    """As fleet_payouts_readonly, `audit verify` still verifies (closed months included)
    and says it records nothing; as the app role it records them."""
    add_month(pg, CLOSED)
    pg.execute(
        "INSERT INTO audit_log (at, actor_type, action, outcome) VALUES (%s, 'user', 'a', 'ok')",
        (datetime(CLOSED.year, CLOSED.month, 3, tzinfo=UTC),),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await audit_chain.run(login_in(R.readonly), since=None)
    assert 0 == code, out.getvalue()
    assert "may not write audit_verified_months" in out.getvalue()
    assert {"n": 0} == pg.execute("SELECT count(*) AS n FROM audit_verified_months").fetchone()
    with contextlib.redirect_stdout(io.StringIO()):
        assert 0 == await audit_chain.run(with_user(db_url, R.app), since=None)
    recorded = pg.execute(
        "SELECT month, entries, verified_by FROM audit_verified_months"
    ).fetchall()
    assert [(CLOSED, 1, R.app)] == [(r["month"], r["entries"], r["verified_by"]) for r in recorded]
