"""The database roles of SPEC section 7, set up by `fleet-payouts migrate`.

- `fleet_payouts_owner` owns every object, ours and procrastinate's; only migrate
  acts as it.
- `fleet_payouts_app` (serve, worker) gets exactly what TABLES below lists, table by
  table: the payout flow's tables and the queue's, SELECT and INSERT on audit_log
  (never naming `at`, `id` or the chain columns: the database fills them), SELECT
  only on `events` (the outbox triggers write them as the owner). UPDATE, DELETE,
  TRUNCATE, ALTER and trigger changes on the audit log are refused by privileges, not
  only by triggers. It has no DDL right: audit partitions come from an owner's
  SECURITY DEFINER function.
- `fleet_payouts_readonly` SELECTs everything (DBAs, analysts: grant it to them), and
  is a member of `pg_read_all_stats`: query text in pg_stat_activity and
  pg_stat_statements.
- `fleet_payouts_ops` (NOLOGIN, granted to the DBAs on call) is readonly plus exactly
  what the runbooks' "Do" steps write: the Billing gate, the queue's failed jobs, the
  webhook delivery state, partition upkeep, `audit verify`'s record, and ending
  another session (`pg_signal_backend`). `fleet-payouts reconcile` runs as it: the
  comparison only reads, but its calls to Billing take their slots from the shared
  budget in `billing_gate`.

A table no line of TABLES names gets nothing for the app and ops roles (and SELECT for
readonly); migrate says so, and a test fails while a table of the schema has no line.

Roles belong to the cluster, not to one database, so several databases (test
databases, a staging copy) may create them at the same moment: creation tolerates
losing that race. When migrate may not create roles, or not act as the owner, it
says what a DBA has to run and carries on with what it may do.

Privileges are compared with the policy below on every run and only differences
are granted or revoked: a steady-state run changes no catalog row, the tables of
later migrations get their grants from the run that creates them, and a privilege
granted by hand beyond the policy (table or column) is taken back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import LiteralString

import psycopg
from psycopg import sql

from service.core import db
from service.core.invariant import InvariantError

logger = logging.getLogger(__name__)
Q = db.queries("roles")


@dataclass(frozen=True)
class Roles:
    owner: str = "fleet_payouts_owner"
    app: str = "fleet_payouts_app"
    readonly: str = "fleet_payouts_readonly"
    ops: str = "fleet_payouts_ops"

    @property
    def params(self) -> dict[str, str]:
        return {"owner": self.owner, "app": self.app, "readonly": self.readonly, "ops": self.ops}


ROLES = Roles()


def _p(*privileges: str) -> frozenset[str]:
    return frozenset(privileges)


NONE: frozenset[str] = frozenset()
SELECT = _p("SELECT")
DML = _p("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Access:
    """What the app and ops roles may do on one table; readonly SELECTs every table."""

    app: frozenset[str] = NONE
    ops: frozenset[str] = NONE
    # Columns the database fills and the app may not name: its INSERT is then granted
    # column by column, on every other column (those a later migration adds included).
    app_insert_stamped: frozenset[str] = NONE


# The policy, table by table. A table not listed gets nothing (readonly: SELECT).
# SELECT ... FOR UPDATE needs UPDATE. No DELETE on payouts and parks: records.
TABLES: Mapping[str, Access] = {
    # The payout flow.
    "parks": Access(app=_p("SELECT", "INSERT", "UPDATE")),
    "payouts": Access(app=_p("SELECT", "INSERT", "UPDATE")),
    "scan_leases": Access(app=DML),
    "billing_gate": Access(app=_p("SELECT", "UPDATE"), ops=_p("SELECT", "UPDATE")),
    "billing_reconciliations": Access(app=_p("SELECT", "INSERT")),
    # The audit log: appended to, never changed; dated and linked by the database.
    "audit_log": Access(
        app=_p("SELECT", "INSERT"),
        app_insert_stamped=_p("id", "at", "chain_stripe", "chain_seq", "chain_hash"),
    ),
    # Written only by the chain triggers; readable so `audit verify` runs as any role.
    "audit_chain_heads": Access(app=SELECT),
    "audit_chain_legacy": Access(app=SELECT),
    # Filled by the owner when a DBA archives a month.
    "audit_archive": Access(app=SELECT),
    # `audit verify`'s record of closed months (the daily unit runs as the app role).
    "audit_verified_months": Access(app=_p("SELECT", "INSERT"), ops=_p("SELECT", "INSERT")),
    # The outbox: written by the payouts triggers as the owner, never by the app.
    "events": Access(app=SELECT),
    "webhook_state": Access(
        app=_p("SELECT", "INSERT", "UPDATE"), ops=_p("SELECT", "INSERT", "DELETE")
    ),
    "webhook_parks": Access(
        app=_p("SELECT", "INSERT", "UPDATE"), ops=_p("SELECT", "UPDATE", "DELETE")
    ),
    # The feed's sequencer: moved only by events_sequence(), as the owner.
    "events_sequencer": Access(app=SELECT),
    # Webhook delivery (0008): the dispatcher's lease and position, and each park's.
    "webhook_feed": Access(
        app=_p("SELECT", "INSERT", "UPDATE"), ops=_p("SELECT", "UPDATE", "DELETE")
    ),
    "webhook_feed_parks": Access(
        app=_p("SELECT", "INSERT", "UPDATE"), ops=_p("SELECT", "UPDATE", "DELETE")
    ),
    # Billing's returns feed (0012): where the reader is, and returns no payout explains.
    "billing_returns_cursor": Access(app=_p("SELECT", "UPDATE")),
    "billing_returns_unmatched": Access(app=_p("SELECT", "INSERT")),
    # The scheduled checks' verdicts (0010): updated by verify and reconcile, rows fixed.
    "ops_checks": Access(app=_p("SELECT", "UPDATE"), ops=_p("SELECT", "UPDATE")),
    "schema_migrations": Access(app=SELECT),
    # Kept by triggers as the owner (0015), for the gauges.
    "job_status_counts": Access(app=SELECT),
    "instant_payout_parks": Access(app=SELECT),
    "instant_payout_park_hours": Access(app=SELECT),
    # procrastinate's queue: its functions run with the caller's rights. Ops retries a
    # failed job (procrastinate_retry_job_v2: an UPDATE whose trigger logs an event) or
    # deletes it (a trigger unlinks its periodic defer; its events go by cascade).
    "procrastinate_jobs": Access(app=DML, ops=_p("SELECT", "UPDATE", "DELETE")),
    "procrastinate_events": Access(app=DML, ops=_p("SELECT", "INSERT")),
    "procrastinate_periodic_defers": Access(app=DML, ops=_p("SELECT", "UPDATE")),
    "procrastinate_workers": Access(app=DML),
}
# A sequence follows its table: nextval() without setval() for whoever may INSERT
# there (an identity or a queue id never goes backwards); SELECT for readonly.
SEQUENCE_FOR_INSERT = _p("USAGE", "SELECT")
# SECURITY DEFINER functions run with the owner's rights: each role may call these
# only. (Other functions run with the caller's rights: executing one grants nothing.)
APP_DEFINER_FUNCTIONS = _p("audit_log_ensure_partitions", "events_sequence", "events_expire")
OPS_FUNCTIONS = _p("audit_log_ensure_partitions", "procrastinate_retry_job_v2")
# Built-in roles: (member, of) pairs, by the field names of Roles.
MEMBERSHIPS = (
    # Query text in pg_stat_activity / pg_stat_statements, which the runbooks read.
    ("readonly", "pg_read_all_stats"),
    ("ops", "readonly"),
    # `SELECT pg_terminate_backend(pid)` on a session blocking the parks.
    ("ops", "pg_signal_backend"),
)
PRIVILEGES = {
    p: sql.SQL(p)
    for p in (
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "TRUNCATE",
        "REFERENCES",
        "TRIGGER",
        "USAGE",
        "MAINTAIN",
    )
}


@dataclass(frozen=True)
class Wanted:
    """The privileges one relation should carry: table-level per role, and the app's
    column-level INSERT."""

    app: frozenset[str]
    ops: frozenset[str]
    readonly: frozenset[str]
    app_insert_columns: frozenset[str] = NONE


def wanted(
    relname: str,
    relkind: str,
    partition: bool,
    *,
    columns: frozenset[str] = NONE,
    sequence_of: str | None = None,
) -> Wanted:
    """What the policy gives one relation; PUBLIC gets nothing."""
    if relkind == "S":
        table = TABLES.get(sequence_of or "", Access())
        return Wanted(
            app=SEQUENCE_FOR_INSERT if "INSERT" in table.app else NONE,
            ops=SEQUENCE_FOR_INSERT if "INSERT" in table.ops else NONE,
            readonly=SELECT,
        )
    if partition:
        # Written and read through the parent, whose privileges apply to its rows;
        # directly, only DBAs read them.
        return Wanted(NONE, NONE, SELECT)
    access = TABLES.get(relname, Access())
    if access.app_insert_stamped and "INSERT" in access.app:
        return Wanted(
            access.app - {"INSERT"}, access.ops, SELECT, columns - access.app_insert_stamped
        )
    return Wanted(access.app, access.ops, SELECT)


def _create_role(name: str, login: bool) -> sql.Composed:
    # Another database of the cluster may create it between our look and our CREATE.
    return sql.SQL(
        "DO $$ BEGIN CREATE ROLE {} {}; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    ).format(sql.Identifier(name), sql.SQL("LOGIN" if login else "NOLOGIN"))


def _dba_script(roles: Roles, user: str) -> str:
    return "\n".join(
        [
            f"  CREATE ROLE {roles.owner} LOGIN PASSWORD '...';",
            f"  CREATE ROLE {roles.app} LOGIN PASSWORD '...';",
            f"  CREATE ROLE {roles.readonly} NOLOGIN;",
            f"  CREATE ROLE {roles.ops} NOLOGIN;",
            f"  GRANT CREATE, USAGE ON SCHEMA public TO {roles.owner};",
            f"  GRANT {roles.owner} TO {user};  -- or run migrate as {roles.owner}",
        ]
    )


@dataclass(frozen=True, slots=True)
class Me:
    """Who migrate runs as (the whoami query): what it may do, which roles exist."""

    name: str
    superuser: bool
    createrole: bool
    owner_exists: bool
    app_exists: bool
    readonly_exists: bool
    ops_exists: bool
    acts_as_owner: bool
    app_acts_as_owner: bool
    owns_schema: bool


@dataclass(frozen=True, slots=True)
class SchemaPrivileges:
    """What one role may do in the schema (usage, create) and the database (create_schema)."""

    usage: bool
    create: bool
    create_schema: bool


@dataclass(frozen=True, slots=True)
class Membership:
    """A wanted (member, role) pair: whether both roles exist, and whether it holds."""

    member: str
    role: str
    possible: bool
    held: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table, partition, view or sequence of the schema with the privileges held on it
    (explicit grants; column ones as 'role:PRIVILEGE:column')."""

    name: str
    relname: str
    relkind: str
    partition: bool
    ours: bool
    app: list[str]
    ops: list[str]
    readonly: list[str]
    public: list[str]
    columns: list[str]
    column_privileges: list[str]
    sequence_of: str | None


@dataclass(frozen=True, slots=True)
class Function:
    """A function of the schema: SECURITY DEFINER or not, and who may execute it."""

    signature: str
    proname: str
    definer: bool
    ours: bool
    public: bool
    app: bool
    ops: bool


@dataclass(frozen=True, slots=True)
class ReadonlyDefaults:
    """Whether tables and sequences created later come with SELECT for readonly."""

    tables: bool
    sequences: bool


async def _whoami(conn: db.Conn, roles: Roles) -> Me:
    me = await db.fetch_as(conn, Me, Q["whoami"], **roles.params)
    if me is None:
        raise InvariantError("me is not None")
    return me


async def prepare(conn: db.Conn, roles: Roles = ROLES) -> None:
    """Before the migrations: create the roles (when allowed), hand every existing object
    to the owner, and go on as the owner, so that what the migrations create is its."""
    me = await _whoami(conn, roles)
    user = me.name
    may_create = me.superuser or me.createrole
    missing = [
        (name, login)
        for name, login, exists in (
            (roles.owner, True, me.owner_exists),
            (roles.app, True, me.app_exists),
            (roles.readonly, False, me.readonly_exists),
            (roles.ops, False, me.ops_exists),
        )
        if not exists
    ]
    if missing and may_create:
        for name, login in missing:
            await conn.execute(_create_role(name, login))
            logger.info("created role %s", name)
        if me.createrole and not me.superuser and not me.acts_as_owner:
            # PostgreSQL 15: CREATEROLE may grant membership in roles it did not create.
            await conn.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles.owner), sql.Identifier(user))
            )
        me = await _whoami(conn, roles)
    if missing and not may_create:
        logger.warning(
            "fleet-payouts migrate: %s may not create roles (it needs superuser or "
            "CREATEROLE); missing: %s. Ask a DBA to run:\n%s\nthen run migrate again. "
            "Continuing without them.",
            user,
            ", ".join(name for name, _ in missing),
            _dba_script(roles, user),
        )

    # Before SET ROLE below: the owner may grant no role membership.
    await _memberships(conn, roles, may_create=may_create)
    if me.superuser or me.owns_schema:
        await _schema_privileges(conn, roles, me)
    if not me.owner_exists:
        return
    if user == roles.owner:
        await _warn_foreign_owned(conn, roles)
        return
    if not (me.superuser or me.acts_as_owner):
        logger.warning(
            "fleet-payouts migrate: %s cannot act as %s, so the schema stays %s's. "
            "Run migrate as %s, or have a DBA run: GRANT %s TO %s;",
            user,
            roles.owner,
            user,
            roles.owner,
            roles.owner,
            user,
        )
        return
    await _adopt(conn, roles)
    await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.owner)))


def _membership_pairs(roles: Roles) -> list[tuple[str, str]]:
    names = roles.params
    return [(names[member], names.get(role, role)) for member, role in MEMBERSHIPS]


async def _memberships(conn: db.Conn, roles: Roles, *, may_create: bool) -> None:
    """readonly in pg_read_all_stats, ops in readonly and pg_signal_backend: granted when
    this login may (superuser, or CREATEROLE), else said as SQL for a DBA."""
    pairs = _membership_pairs(roles)
    rows = await db.fetch_all_as(
        conn,
        Membership,
        Q["memberships"],
        members=[m for m, _ in pairs],
        roles=[r for _, r in pairs],
    )
    lacking = [(r.member, r.role) for r in rows if r.possible and not r.held]
    refused: list[str] = []
    for member, role in lacking:
        statement = sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member))
        if may_create:
            try:
                async with conn.transaction():
                    await conn.execute(statement)
                logger.info("granted role %s to %s", role, member)
                continue
            except psycopg.errors.UniqueViolation:
                continue  # another database of the cluster granted it just now
            except psycopg.errors.InsufficientPrivilege:
                pass
        refused.append(f"  GRANT {role} TO {member};")
    if refused:
        logger.warning(
            "fleet-payouts migrate: may not grant these role memberships; ask a DBA to run:\n%s",
            "\n".join(refused),
        )


async def _schema_privileges(conn: db.Conn, roles: Roles, me: Me) -> None:
    """The owner creates in the schema; the app and readonly roles use it and create
    nothing (PostgreSQL 15 no longer lets PUBLIC create in `public`; older ones did)."""
    public = sql.Identifier("public")
    if me.owner_exists:
        owner = await db.fetch_as(conn, SchemaPrivileges, Q["schema_privileges"], role=roles.owner)
        if owner and not (owner.usage and owner.create):
            await conn.execute(
                sql.SQL("GRANT CREATE, USAGE ON SCHEMA {} TO {}").format(
                    public, sql.Identifier(roles.owner)
                )
            )
    for role, exists in (
        (roles.app, me.app_exists),
        (roles.readonly, me.readonly_exists),
        (roles.ops, me.ops_exists),
    ):
        if not exists:
            continue
        have = await db.fetch_as(conn, SchemaPrivileges, Q["schema_privileges"], role=role)
        if have is None:
            raise InvariantError("have is not None")
        if not have.usage:
            await conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(public, sql.Identifier(role))
            )
        if have.create:
            await conn.execute(
                sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC, {}").format(
                    public, sql.Identifier(role)
                )
            )
        if have.create_schema:
            logger.warning(
                "fleet-payouts migrate: %s may create schemas in this database; "
                "a DBA should run: REVOKE CREATE ON DATABASE <db> FROM PUBLIC, %s;",
                role,
                role,
            )


async def _adopt(conn: db.Conn, roles: Roles) -> None:
    """Give the owner every object it does not own yet (a database that predates the
    roles, where the schema belonged to whoever ran migrate)."""
    # Each object another role owns, as the statement that hands it to the owner.
    statements = await db.fetch_values(conn, str, Q["foreign_owned"], owner=roles.owner)
    if not statements:
        return

    async def hand_over() -> None:
        for statement in statements:
            # Catalog-built text: format() quoted every identifier in it.
            await conn.execute(statement)

    await db.ddl_transaction(conn, hand_over, f"handing {len(statements)} objects to {roles.owner}")
    logger.info("handed %d objects to %s", len(statements), roles.owner)


async def _warn_foreign_owned(conn: db.Conn, roles: Roles) -> None:
    statements = await db.fetch_values(conn, str, Q["foreign_owned"], owner=roles.owner)
    if statements:
        logger.warning(
            "fleet-payouts migrate: %d objects are not %s's yet (e.g. %s); run migrate once "
            "as a superuser to hand them over.",
            len(statements),
            roles.owner,
            statements[0],
        )


async def grant(conn: db.Conn, roles: Roles = ROLES) -> None:
    """After the migrations: bring every privilege in line with the policy."""
    me = await _whoami(conn, roles)
    if me.app_acts_as_owner:
        logger.warning(
            "fleet-payouts migrate: %s is a member of %s and so may change the schema, "
            "disable audit_log's triggers and drop its partitions: a DBA should run "
            "REVOKE %s FROM %s;",
            roles.app,
            roles.owner,
            roles.owner,
            roles.app,
        )
    statements = await _relation_statements(conn, roles, me)
    statements += await _function_statements(conn, roles, me)
    statements += await _pinned_search_paths(conn)
    if me.readonly_exists:
        statements += await _default_statements(conn, roles)
    if not statements:
        return

    async def apply() -> None:
        for statement in statements:
            await conn.execute(statement)

    await db.ddl_transaction(conn, apply, "granting privileges")
    logger.info("privileges: %d grants or revokes", len(statements))


async def _relation_statements(conn: db.Conn, roles: Roles, me: Me) -> list[sql.Composed]:
    statements: list[sql.Composed] = []
    skipped: list[str] = []
    unlisted: list[str] = []
    for rel in await db.fetch_all_as(conn, Relation, Q["relations"], **roles.params):
        if rel.relkind != "S" and not rel.partition and rel.relname not in TABLES:
            unlisted.append(rel.relname)
        want = wanted(
            rel.relname,
            rel.relkind,
            rel.partition,
            columns=frozenset(rel.columns),
            sequence_of=rel.sequence_of,
        )
        grantees: list[tuple[str, sql.Composable, list[str], frozenset[str]]] = [
            ("public", sql.SQL("PUBLIC"), rel.public, NONE)
        ]
        for key, exists, have, privileges in (
            ("app", me.app_exists, rel.app, want.app),
            ("ops", me.ops_exists, rel.ops, want.ops),
            ("readonly", me.readonly_exists, rel.readonly, want.readonly),
        ):
            if exists:
                name = getattr(roles, key)
                grantees.append((key, sql.Identifier(name), have, privileges))
        # Column privileges held now, and wanted: (role key, privilege) -> columns.
        held_columns: dict[tuple[str, str], set[str]] = {}
        for entry in rel.column_privileges:
            key, privilege, column = entry.split(":", 2)
            held_columns.setdefault((key, privilege), set()).add(column)
        wanted_columns = {("app", "INSERT"): set(want.app_insert_columns)} if me.app_exists else {}
        changes = [(role, set(have) - w, w - set(have)) for _, role, have, w in grantees]
        column_changes = [
            (key, privilege, held_columns.get((key, privilege), set()), cols)
            for key, privilege in sorted(set(held_columns) | set(wanted_columns))
            for cols in [wanted_columns.get((key, privilege), set())]
        ]
        if not any(extra or lacking for _, extra, lacking in changes) and all(
            held == cols for _, _, held, cols in column_changes
        ):
            continue
        if not rel.ours:
            skipped.append(rel.name)
            continue
        target = sql.Identifier("public", rel.relname)
        for role, extra, lacking in changes:
            if extra:
                statements.append(_privileges("REVOKE", extra, target, "FROM", role))
            if lacking:
                statements.append(_privileges("GRANT", lacking, target, "TO", role))
        for key, privilege, held, cols in column_changes:
            role = sql.SQL("PUBLIC") if key == "public" else sql.Identifier(getattr(roles, key))
            if held - cols:
                statements.append(
                    _column_privilege("REVOKE", privilege, held - cols, target, "FROM", role)
                )
            if cols - held:
                statements.append(
                    _column_privilege("GRANT", privilege, cols - held, target, "TO", role)
                )
    if unlisted:
        logger.warning(
            "fleet-payouts migrate: no line of service/ops/roles.py TABLES names %s: the app "
            "and ops roles get nothing on it (readonly: SELECT)",
            ", ".join(unlisted),
        )
    if skipped:
        logger.warning(
            "fleet-payouts migrate: cannot set privileges on %s (not ours): run migrate "
            "once as a superuser",
            ", ".join(skipped),
        )
    return statements


def _column_privilege(
    verb: LiteralString,
    privilege: str,
    columns: set[str],
    target: sql.Identifier,
    preposition: LiteralString,
    role: sql.Composable,
) -> sql.Composed:
    return sql.SQL("{} {} ({}) ON {} {} {}").format(
        sql.SQL(verb),
        PRIVILEGES[privilege],
        sql.SQL(", ").join(sql.Identifier(c) for c in sorted(columns)),
        target,
        sql.SQL(preposition),
        role,
    )


def _privileges(
    verb: LiteralString,
    privileges: set[str] | frozenset[str],
    target: sql.Identifier,
    preposition: LiteralString,
    role: sql.Composable,
) -> sql.Composed:
    return sql.SQL("{} {} ON {} {} {}").format(
        sql.SQL(verb),
        sql.SQL(", ").join(PRIVILEGES[p] for p in sorted(privileges)),
        target,
        sql.SQL(preposition),
        role,
    )


async def _function_statements(conn: db.Conn, roles: Roles, me: Me) -> list[sql.Composed]:
    statements: list[sql.Composed] = []
    grantees = [
        (sql.Identifier(name), key, definer_list, everything)
        for name, key, exists, definer_list, everything in (
            (roles.app, "app", me.app_exists, APP_DEFINER_FUNCTIONS, True),
            (roles.ops, "ops", me.ops_exists, OPS_FUNCTIONS, False),
        )
        if exists
    ]
    for fn in await db.fetch_all_as(conn, Function, Q["functions"], **roles.params):
        if not fn.ours:
            continue
        # regprocedure text: the quoted name and argument types.
        target = sql.SQL(fn.signature)
        if fn.definer and fn.public:
            statements.append(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(target))
        for role, key, listed, everything in grantees:
            # procrastinate's functions and ours run with the caller's rights: the app
            # calls any of them; ops those its runbook steps name.
            want = fn.proname in listed or (everything and not fn.definer)
            held = fn.app if key == "app" else fn.ops
            if want and not held:
                statements.append(
                    sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(target, role)
                )
            elif held and not want:
                statements.append(
                    sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(target, role)
                )
    return statements


async def _pinned_search_paths(conn: db.Conn) -> list[sql.Composed]:
    """Every function of ours resolves names in pg_catalog (implicitly first), our schema,
    then pg_temp last, and creates in our schema: the app role may create temporary
    tables, and one named `events` or `parks` must never stand in for ours inside a
    definer function or a guard trigger (whatever migration made the function)."""
    return [
        sql.SQL("ALTER FUNCTION {} SET search_path = public, pg_temp").format(sql.SQL(signature))
        for signature in await db.fetch_values(conn, str, Q["unpinned_functions"])
    ]


async def _default_statements(conn: db.Conn, roles: Roles) -> list[sql.Composed]:
    """Partitions made later by the owner's function are readable by DBAs at once."""
    have = await db.fetch_as(
        conn, ReadonlyDefaults, Q["readonly_defaults"], readonly=roles.readonly
    )
    if have is None:
        raise InvariantError("have is not None")
    statements: list[sql.Composed] = []
    for kind, present in (
        (sql.SQL("TABLES"), have.tables),
        (sql.SQL("SEQUENCES"), have.sequences),
    ):
        if not present:
            statements.append(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON {} TO {}"
                ).format(kind, sql.Identifier(roles.readonly))
            )
    return statements
