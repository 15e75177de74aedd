"""Issue 16's changes attacked from outside (attack16): secrets in what the real processes print
when the configuration is wrong, and hostile input on the paths the change rewrote."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import psycopg
import pytest

from tests.conftest import ADMIN_TOKEN, API_TOKEN
from tests.helpers.emulator import REPO_ROOT

PASSWORD = "s3cr%ZZetPW"
DSN_KEY = "SENTRYKEYabc0123"


def run_cli(*args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m service ARGS` with a complete configuration plus `env`; its output merged."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "DATABASE_"))}
    full = {
        **base,
        "BILLING_URL": "http://127.0.0.1:9",
        "API_TOKENS": API_TOKEN,
        "ADMIN_TOKENS": ADMIN_TOKEN,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=full,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", [["migrate"], ["serve", "--port", "21790"], ["worker"]])
def test_password_libpq_cannot_parse_is_refused_without_its_text(command: list[str]) -> None:
    """A DATABASE_URL whose password holds a stray `%` (libpq's refusal quotes the token: the
    password) stops the command as a configuration error naming the variable, never printing
    the password (before: migrate printed it, serve and worker logged it on every retry)."""
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:1/payouts"
    try:
        done = run_cli(*command, timeout=15, DATABASE_URL=url)
    except subprocess.TimeoutExpired as exc:
        printed = (exc.stdout or b"") + (exc.stderr or b"")
        text = printed.decode() if isinstance(printed, bytes) else printed
        pytest.fail(f"{command} kept running on a bad DATABASE_URL: {text[-600:]}")
    output = done.stdout + done.stderr
    assert 2 == done.returncode, output
    assert "configuration error: DATABASE_URL" in output
    assert "s3cr" not in output


@pytest.mark.parametrize(
    "dsn",
    [
        f"https://{DSN_KEY}@sentry.example",
        f"https://{DSN_KEY}@sentry.example/not-a-number",
        f"https://{DSN_KEY}@sentry.example:99999/1",
    ],
)
def test_malformed_sentry_dsn_is_a_configuration_error(dsn: str) -> None:
    """A SENTRY_DSN Sentry's client refuses (no project, a non-numeric one, a port out of range)
    is a configuration error naming the variable, not a start-up traceback, and its key is not
    printed."""
    done = run_cli(
        "serve", "--port", "21791", DATABASE_URL="postgresql://app@127.0.0.1:1/x", SENTRY_DSN=dsn
    )
    output = done.stdout + done.stderr
    assert 2 == done.returncode, output
    assert "configuration error: SENTRY_DSN" in output
    assert "Traceback" not in output
    assert DSN_KEY not in output


# --- the next release's expand migration, under this release's typed reads --------------

NEXT_RELEASE_COLUMNS = [
    "ALTER TABLE payouts ADD COLUMN zz_next_release text NOT NULL DEFAULT 'x'",
    "ALTER TABLE parks ADD COLUMN aa_next_release numeric",
    "ALTER TABLE events ADD COLUMN zz_next_release jsonb",
    "ALTER TABLE audit_log ADD COLUMN zz_next_release int",
    "ALTER TABLE billing_gate ADD COLUMN zz_next_release int",
    "ALTER TABLE scan_leases ADD COLUMN zz_next_release int",
]


async def test_typed_reads_survive_the_next_release_s_added_columns(
    sql: Any, deps: Any, db_url: str, billing_url: str
) -> None:
    """With a column added to payouts, parks, events, audit_log, billing_gate and scan_leases (an
    expand migration of the next release), every read through the API, a payout's run, the
    periodic scan and audit verify still answer as before: typed rows drop what they do not
    declare."""
    from service.audit import chain
    from service.payouts import periodic
    from service.payouts.execution import execute_payout
    from tests.helpers.api import (
        ADMIN,
        app_client,
        park_headers,
        press_headers,
        register,
        set_balance,
    )

    for statement in NEXT_RELEASE_COLUMNS:
        sql.execute(statement)
    with app_client(db_url, billing_url=billing_url) as api:
        register(api, "dba-1", instant=True, periodic=True)
        register(api, "dba-2", instant=False, periodic=True)
        set_balance(billing_url, "dba-1", "100.00")
        set_balance(billing_url, "dba-2", "100.00")
        sql.execute("UPDATE parks SET registered_at = now() - interval '30 days'")
        pressed = api.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers("dba-1")
        )
        assert 202 == pressed.status_code, pressed.text
        payout_id = pressed.json()["id"]
        assert "succeeded" == await execute_payout(deps, uuid.UUID(payout_id))
        scanned = await periodic.scan(deps)
        assert 1 <= scanned.created, scanned
        reads = [
            api.get(f"/v1/payouts/{payout_id}", headers=park_headers("dba-1")),
            api.get("/v1/payouts", headers=park_headers("dba-1")),
            api.get("/v1/payouts/instant/availability", headers=park_headers("dba-1")),
            api.get("/v1/events", headers=park_headers("dba-1")),
            api.get("/v1/parks/dba-1", headers=ADMIN),
            api.get("/v1/admin/payouts", headers=ADMIN),
            api.get("/v1/audit", headers=ADMIN),
        ]
        assert [200] * len(reads) == [r.status_code for r in reads], [r.text for r in reads]
        assert "zz_next_release" not in reads[0].text
    async with deps.pool.connection() as conn:
        verdict = await chain.verify(conn, report=lambda month: None)
    assert isinstance(verdict, chain.Summary), verdict


def test_a_park_row_held_by_an_idle_transaction_answers_a_press_without_a_500(
    db_url: str, billing_url: str
) -> None:
    """A psql session of the app role idle in a transaction that holds the park's row leaves
    a press on that park answered in bounded time with a JSON 4xx/503, never a 500 or a hang."""
    from tests.conftest import with_user
    from tests.helpers.api import app_client, press_headers, register

    with app_client(db_url, billing_url=billing_url) as api:
        register(api, "held-park", instant=True)
        with psycopg.connect(with_user(db_url, "fleet_payouts_app")) as dba:
            dba.execute(
                "SELECT 1 FROM parks WHERE park_id = 'held-park' FOR UPDATE"
            )  # psycopg opens the transaction and leaves it idle
            r = api.post(
                "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers("held-park")
            )
            dba.rollback()
    assert r.status_code < 500 or r.status_code == 503, r.text
    assert "code" in r.json()


# --- what the production wheel ships ---------------------------------------------------


def test_the_wheel_lists_every_package_and_data_file_of_the_tree() -> None:
    """pyproject's explicit package list names every package directory under service/ (a package
    left out is missing from the wheel, though every test passes from the clone), and its
    package data globs match every non-Python file in them, sql/ and migrations/ included."""
    import fnmatch
    import tomllib

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {
        "service": REPO_ROOT / "service",
        **{k: REPO_ROOT / v for k, v in config["package-dir"].items()},
    }
    in_tree = {"service.sql", "service.migrations"} | {
        ".".join(("service", *p.parent.relative_to(roots["service"]).parts)).rstrip(".")
        for p in roots["service"].rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert sorted(in_tree) == sorted(listed)
    unshipped = []
    for package in sorted(listed):
        where = roots.get(package) or REPO_ROOT.joinpath(*package.split("."))
        globs = config["package-data"].get(package, [])
        for path in where.rglob("*"):
            relative = path.relative_to(where)
            if (
                not path.is_file()
                or path.suffix in (".py", ".pyc")
                or "__pycache__" in relative.parts
            ):
                continue
            if (
                relative.parts[0] != relative.name
                and (where / relative.parts[0] / "__init__.py").exists()
            ):
                continue  # belongs to a subpackage, checked under its own name
            if not any(fnmatch.fnmatch(str(relative), g) for g in globs):
                unshipped.append(f"{package}: {relative}")
    assert [] == unshipped


# --- secrets in Sentry's frame variables ------------------------------------------------


@pytest.mark.parametrize("password", ["ab\\cd1234XY", "q'u\"cd1234XY"])
def test_a_secret_written_escaped_in_a_frame_variable_is_scrubbed(
    password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password with a backslash (or both quotes) sits in a frame variable's repr escaped
    (`ab\\\\cd...`), which the scrubber's plain search missed: the event sent to Sentry keeps
    no form of it."""
    import json

    import sentry_sdk

    from service.core import observability
    from tests.conftest import make_settings
    from tests.integration.test_sentry import Captured

    transport = Captured()
    quoted = password.replace("\\", "%5C").replace("'", "%27").replace('"', "%22")
    settings = make_settings(f"postgresql://app:{quoted}@127.0.0.1:1/x", webhook_secret=password)
    observability.init_sentry(settings, transport=transport)

    def connect() -> None:
        conninfo = settings.database_url.reveal().replace(quoted, password)
        hook = f"signing with {settings.webhook_secret.reveal() if settings.webhook_secret else ''}"
        raise RuntimeError(f"cannot connect ({len(conninfo)}, {len(hook)})")

    try:
        try:
            connect()
        except RuntimeError:
            sentry_sdk.capture_exception()
        sentry_sdk.flush()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()
    assert 1 == len(transport.events)
    frames = transport.events[0]["exception"]["values"][0]["stacktrace"]["frames"]
    assert any("conninfo" in f.get("vars", {}) for f in frames), frames
    assert "cd1234XY" not in json.dumps(transport.events)


# --- attack16b: this session's changes from outside ---------------------------------------


def test_an_expand_migration_run_beside_a_warm_api_leaves_its_reads_answering(
    sql: Any, db_url: str, billing_url: str
) -> None:
    """A column added to payouts while the API runs (a rolling deploy's expand step, after the
    pool's connections have prepared their reads) leaves every payout read answering 200, as
    before the column: no `cached plan must not change result type` surfacing as a 500."""
    from tests.helpers.api import ADMIN, app_client, park_headers, press_headers, register

    with app_client(db_url, billing_url=billing_url) as api:
        register(api, "warm-1", instant=True)
        register(api, "warm-2", instant=True)
        pressed = api.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers("warm-1")
        )
        assert 202 == pressed.status_code, pressed.text
        payout_id = pressed.json()["id"]

        def reads() -> list[int]:
            return [
                api.get(f"/v1/payouts/{payout_id}", headers=park_headers("warm-1")).status_code,
                api.get("/v1/payouts", headers=park_headers("warm-1")).status_code,
                api.get("/v1/admin/payouts", headers=ADMIN).status_code,
            ]

        for _ in range(12):  # past psycopg's prepare threshold (5) on each connection
            assert [200, 200, 200] == reads()
        sql.execute("ALTER TABLE payouts ADD COLUMN zz_next_release int")
        assert [[200, 200, 200]] * 12 == [reads() for _ in range(12)]
        # The press (its function returns a payouts row) goes on too.
        again = api.post(
            "/v1/payouts/instant", json={"amount": "10.00"}, headers=press_headers("warm-2")
        )
        assert 202 == again.status_code, again.text


# One INSERT of three entries whose third row, evaluated after the second's trigger ran,
# points every stripe's tail setting back at the first entry (stashed by the second row):
# the app role's own SQL forging the trigger's pointer mid-statement.
FORK_FROM_FIRST = """
INSERT INTO audit_log (actor_type, actor_id, action, outcome, details)
SELECT 'system', 'forger', 'forge', 'ok', jsonb_build_object('n', g, 'forged', CASE
    WHEN g = 2 THEN (
        SELECT string_agg(set_config('x.saved_' || s, coalesce(current_setting(
            'fleet_payouts.audit_tail_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMM') || '_' || s,
            true), ''), true), ',')
        FROM generate_series(0, audit_chain_stripes() - 1) s)
    WHEN g = 3 THEN (
        SELECT string_agg(set_config(
            'fleet_payouts.audit_tail_' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMM') || '_' || s,
            current_setting('x.saved_' || s), true), ',')
        FROM generate_series(0, audit_chain_stripes() - 1) s)
    END)
FROM generate_series(1, 3) g
RETURNING id, chain_stripe, chain_seq
"""


async def test_a_tail_pointer_forged_mid_statement_by_the_app_role_is_named_by_verify(
    db_url: str, deps: Any
) -> None:
    """The app role rewriting the chain trigger's tail setting between the rows of one INSERT
    (a fork: two entries linked to the same predecessor) is named by `audit verify` as a
    broken link, never passed as intact."""
    from service.audit import chain
    from tests.conftest import with_user

    with psycopg.connect(with_user(db_url, "fleet_payouts_app"), autocommit=True) as app:
        rows = app.execute(FORK_FROM_FIRST).fetchall()
    seqs = [r[2] for r in rows]
    async with deps.pool.connection() as conn:
        verdict = await chain.verify(conn, report=lambda month: None)
    assert isinstance(verdict, chain.Broken), (seqs, verdict)


def test_a_concurrent_build_held_by_an_idle_transaction_names_the_session_it_waits_for(
    db_url: str, pg: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 0020's CONCURRENTLY build waits for a session idle in a REPEATABLE READ transaction
    (a DBA's psql or a pg_dump: no timeout ends it), migrate says so at warning level, naming
    that session's pid, and completes once it ends (before: it waited silently, for ever)."""
    import asyncio
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from service.ops import migrate
    from tests.helpers.procs import wait_for

    monkeypatch.setattr(migrate, "WAIT_REPORT_SECONDS", 0.2, raising=False)
    pg.execute("DROP INDEX payouts_one_per_billing_payout")
    pg.execute(
        "DELETE FROM schema_migrations WHERE name = '0020_one_payout_per_billing_payout.sql'"
    )
    with (
        caplog.at_level(logging.WARNING, logger="service.ops.migrate"),
        ThreadPoolExecutor(1) as pool,
        psycopg.connect(db_url) as idle,
    ):
        # A snapshot kept (pg_dump's REPEATABLE READ, a DBA's BEGIN), then idle in it.
        idle.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        idle.execute("SELECT count(*) FROM payouts")
        idle_pid = idle.info.backend_pid
        built = pool.submit(asyncio.run, migrate.migrate(db_url))

        def named() -> bool:
            return any(
                f"pid {idle_pid}" in r.getMessage() and "idle in transaction" in r.getMessage()
                for r in caplog.records
            )

        try:
            wait_for(named, timeout=20, what="migrate to name the session it waits for")
        finally:
            idle.rollback()
        assert ["0020_one_payout_per_billing_payout.sql"] == built.result(timeout=60)


@pytest.mark.parametrize(
    "value", ["0", "-1", "nan", "inf", "1e9", "9" * 5000, "1e-9", "0.001", "1_5"]
)
def test_a_gauge_period_no_process_should_run_stops_start_up_naming_the_variable(
    value: str,
) -> None:
    """GAUGE_SECONDS that is not a plain number of seconds from 0.1 to a day (a nanosecond
    period would read the gauges in a busy loop on every process; `1_5` is Python's 15, no
    operator's) is refused at load with an error naming the variable."""
    from service.core import settings

    env = {
        "DATABASE_URL": "postgresql://a@127.0.0.1:1/x",
        "BILLING_URL": "http://127.0.0.1:9",
        "API_TOKENS": API_TOKEN,
        "ADMIN_TOKENS": ADMIN_TOKEN,
        "GAUGE_SECONDS": value,
    }
    with pytest.raises(settings.ConfigError) as refused:
        settings.load(env)
    assert str(refused.value).startswith("GAUGE_SECONDS: ")


async def test_a_gateway_answering_a_new_order_first_with_an_in_flight_order_s_payout(
    via_proxy: Any, proxy: Any, conn: Any, billing_url: str
) -> None:
    """A gateway that answers a new order FIRST with the object Billing made for an order whose
    own answer was lost (still in flight; so another park's, one in flight per park) leaves
    the new payout unsettled by it: each ends succeeded with the Billing payout of its key."""
    import httpx

    from service.payouts import store as payouts
    from service.payouts.execution import RetryLater, execute_payout
    from service.payouts.model import Status
    from tests.helpers.proxy import Canned

    park = f"lie-first-{uuid.uuid4().hex[:8]}"

    async def pending(park: str) -> uuid.UUID:
        payout_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
            "VALUES (%s, %s, 'periodic', 1000, 70, 'RUB')",
            (payout_id, park),
        )
        return payout_id

    # One payout in flight per park: the lie can only name another park's order.
    parks = [f"{park}-a", f"{park}-b"]
    async with httpx.AsyncClient(base_url=billing_url) as billing:
        for each in parks:
            await conn.execute("INSERT INTO parks (park_id) VALUES (%s)", (each,))
            balance = {"available": "500.00", "currency": "RUB"}
            (await billing.put(f"/admin/balances/{each}", json=balance)).raise_for_status()
        first = await pending(parks[0])
        # Billing pays the first order; its answer is lost on the way back.
        proxy.answer_order = lambda n: Canned(502, b"bad gateway", forward=True)
        with pytest.raises(RetryLater):
            await execute_payout(via_proxy, first)
        made = (await billing.get(f"/v1/payouts/{first}")).json()
    second = await pending(parks[1])
    proxy.answer_order = lambda n: Canned(200, json.dumps(made).encode(), "application/json")
    with contextlib.suppress(RetryLater):
        await execute_payout(via_proxy, second)

    proxy.answer_order = None  # honest from here on
    for payout_id in (first, second):
        with contextlib.suppress(RetryLater):
            await execute_payout(via_proxy, payout_id)
    done = {p: await payouts.reload(conn, p) for p in (first, second)}
    assert [Status.SUCCEEDED, Status.SUCCEEDED] == [done[p].status for p in (first, second)]
    assert made["id"] == done[first].billing_payout_id
    assert made["id"] != done[second].billing_payout_id


async def test_three_hosts_migrating_at_once_build_0020_once(db_url: str, pg: Any) -> None:
    """Three `migrate` runs started together on a database before 0020 (three hosts starting
    at once) apply it exactly once between them, all succeed, and leave the index valid."""
    import asyncio

    from service.ops import migrate

    pg.execute("DROP INDEX payouts_one_per_billing_payout")
    pg.execute(
        "DELETE FROM schema_migrations WHERE name = '0020_one_payout_per_billing_payout.sql'"
    )
    runs = await asyncio.wait_for(
        asyncio.gather(*(migrate.migrate(db_url) for _ in range(3))), timeout=120
    )
    assert [["0020_one_payout_per_billing_payout.sql"], [], []] == sorted(runs, key=len)[::-1]
    row = pg.execute(
        "SELECT indisvalid AS valid FROM pg_index"
        " WHERE indexrelid = to_regclass('payouts_one_per_billing_payout')"
    ).fetchone()
    assert {"valid": True} == row


def test_a_migrate_killed_mid_build_leaves_the_next_one_waiting_by_name_then_done(
    db_url: str, pg: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migrate process killed (SIGKILL) while 0020's build waits for an old transaction leaves
    its server session building under the migration lock: the next migrate says at warning
    level which session holds that lock, then, once the old transaction ends, finds the index
    valid and records 0020."""
    import asyncio
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from service.ops import migrate
    from tests.helpers.procs import wait_for

    monkeypatch.setattr(migrate, "WAIT_REPORT_SECONDS", 0.2)
    pg.execute("DROP INDEX payouts_one_per_billing_payout")
    pg.execute(
        "DELETE FROM schema_migrations WHERE name = '0020_one_payout_per_billing_payout.sql'"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "DATABASE_"))}
    with psycopg.connect(db_url) as idle:
        idle.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        idle.execute("SELECT count(*) FROM payouts")
        first = subprocess.Popen(
            [sys.executable, "-m", "service", "migrate"],
            env={**env, "DATABASE_URL": db_url},
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def building() -> int | None:
                row = pg.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name ="
                    " 'fleet-payouts-migrate' AND wait_event = 'virtualxid'"
                ).fetchone()
                return None if row is None else int(row["pid"])

            builder = wait_for(building, timeout=30, what="the first migrate to wait")
        finally:
            first.kill()
            first.wait(timeout=10)
        with (
            caplog.at_level(logging.WARNING, logger="service.ops.migrate"),
            ThreadPoolExecutor(1) as pool,
        ):
            second = pool.submit(asyncio.run, migrate.migrate(db_url))
            try:
                wait_for(
                    lambda: any(f"pid {builder}" in r.getMessage() for r in caplog.records),
                    timeout=20,
                    what="the next migrate to name the session holding the lock",
                )
                assert not second.done()
            finally:
                idle.rollback()
            assert ["0020_one_payout_per_billing_payout.sql"] == second.result(timeout=60)
        assert any(f"pid {builder}" in r.getMessage() for r in caplog.records), caplog.text
    row = pg.execute(
        "SELECT indisvalid AS valid FROM pg_index"
        " WHERE indexrelid = to_regclass('payouts_one_per_billing_payout')"
    ).fetchone()
    assert {"valid": True} == row


@pytest.mark.parametrize(
    "statement",
    [
        "DROP INDEX payouts_one_per_billing_payout",
        "ALTER INDEX payouts_one_per_billing_payout RENAME TO gone",
        "REINDEX INDEX payouts_one_per_billing_payout",
        "SET session_replication_role = replica",
        "ALTER TABLE audit_log DISABLE TRIGGER zz_audit_log_chain",
        "INSERT INTO audit_log (at, actor_type, action, outcome)"
        " VALUES ('2026-01-15', 'system', 'backdated', 'ok')",
        "INSERT INTO audit_log (id, actor_type, action, outcome) OVERRIDING SYSTEM VALUE"
        " VALUES (1, 'system', 'chosen-id', 'ok')",
        "PARTITION",
    ],
)
def test_the_app_role_cannot_unmake_the_index_or_route_around_the_chain(
    db_url: str, pg: Any, statement: str
) -> None:
    """The app role (its password is in every host's environment) is refused dropping, renaming
    or rebuilding 0020's index, replica mode (which would skip the chain trigger), disabling
    the trigger, dating or numbering an audit entry itself, and writing a partition directly."""
    from tests.conftest import with_user

    if statement == "PARTITION":
        part = pg.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'audit_log'::regclass ORDER BY 1 LIMIT 1"
        ).fetchone()["relname"]
        statement = f"INSERT INTO {part} (actor_type, action, outcome) VALUES ('system', 'x', 'ok')"
    with (
        psycopg.connect(with_user(db_url, "fleet_payouts_app"), autocommit=True) as app,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        app.execute(statement)


async def test_two_scans_batching_the_same_parks_at_once_make_one_payout_and_job_each(
    deps: Any, pg: Any
) -> None:
    """Two scan batches over the same due parks at once, in opposite orders (a scan frozen past
    its lease and the one that took over), beside procrastinate's own defer drawing from the
    same job sequence, make one payout per park, one job per payout, and no job naming no
    payout; neither deadlocks."""
    import asyncio
    from decimal import Decimal

    from service.billing.client import Balance
    from service.payouts import periodic

    parks = [f"twin-{n:03d}" for n in range(60)]
    pg.execute(
        "INSERT INTO parks (park_id, registered_at) SELECT p, now() - interval '30 days'"
        " FROM unnest(%s::text[]) p",
        (parks,),
    )
    balances = {p: Balance(p, Decimal("50.00"), "RUB") for p in parks}

    async def batch(order: list[str]) -> int:
        async with deps.pool.connection() as conn:
            return await periodic.create_batch(conn, deps, order, balances)

    async def defer() -> None:
        async with deps.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " VALUES ('other', 'other_task', '{}')"
            )

    first, second, *_ = await asyncio.wait_for(
        asyncio.gather(batch(parks), batch(parks[::-1]), *(defer() for _ in range(5))),
        timeout=60,
    )
    assert len(parks) == (first or 0) + (second or 0)
    counts = pg.execute(
        "SELECT (SELECT count(*) FROM payouts WHERE park_id LIKE 'twin-%%') AS payouts,"
        " (SELECT count(DISTINCT park_id) FROM payouts WHERE park_id LIKE 'twin-%%') AS parks,"
        " (SELECT count(*) FROM procrastinate_jobs j JOIN payouts p ON p.job_id = j.id"
        "   AND (j.args ->> 'payout_id')::uuid = p.id WHERE p.park_id LIKE 'twin-%%') AS jobs,"
        " (SELECT count(*) FROM procrastinate_jobs j WHERE j.args ? 'payout_id' AND NOT EXISTS"
        "   (SELECT 1 FROM payouts p WHERE p.id = (j.args ->> 'payout_id')::uuid)) AS orphans"
    ).fetchone()
    assert {"payouts": 60, "parks": 60, "jobs": 60, "orphans": 0} == counts
