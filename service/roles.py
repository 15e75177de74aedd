"""The database roles of SPEC section 7, set up by `fleet-payouts migrate`.

- `fleet_payouts_owner` owns every object, ours and procrastinate's; only migrate
  acts as it.
- `fleet_payouts_app` (serve, worker) reads and writes the service's tables and the
  queue's, but only INSERTs into and SELECTs from audit_log: UPDATE, DELETE,
  TRUNCATE, ALTER and trigger changes are refused by privileges, not only by
  triggers. It has no DDL right: audit partitions come from an owner's SECURITY
  DEFINER function.
- `fleet_payouts_readonly` SELECTs everything (DBAs, analysts: grant it to them).

Roles belong to the cluster, not to one database, so several databases (test
databases, a staging copy) may create them at the same moment: creation tolerates
losing that race. When migrate may not create roles, or not act as the owner, it
says what a DBA has to run and carries on with what it may do.

Privileges are compared with the policy below on every run and only differences
are granted or revoked: a steady-state run changes no catalog row, the tables of
later migrations get their grants from the run that creates them, and a privilege
granted by hand beyond the policy is taken back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, LiteralString, cast

from psycopg import sql

from service import db

logger = logging.getLogger(__name__)
Q = db.queries("roles")


@dataclass(frozen=True)
class Roles:
    owner: str = "fleet_payouts_owner"
    app: str = "fleet_payouts_app"
    readonly: str = "fleet_payouts_readonly"

    @property
    def params(self) -> dict[str, str]:
        return {"owner": self.owner, "app": self.app, "readonly": self.readonly}


ROLES = Roles()

SELECT = frozenset({"SELECT"})
DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
# Tables on which the app role gets less than DML. Every other table of the schema
# (payouts, parks, the queue's, those of later migrations) gets DML.
APP_TABLES: Mapping[str, frozenset[str]] = {
    "audit_log": frozenset({"SELECT", "INSERT"}),
    # Written only by the chain trigger; readable so `audit verify` runs as any role.
    "audit_chain_heads": SELECT,
    "audit_chain_legacy": SELECT,
    # Filled by DBAs when they archive a month.
    "audit_archive": SELECT,
    "schema_migrations": SELECT,
    # Written only by the outbox triggers and stamped by events_sequence(), both
    # as the owner: the app cannot forge, edit or delete an event (issue 15).
    "events": SELECT,
    "events_sequencer": SELECT,
}
# nextval() without setval(): an identity or a queue id never goes backwards.
APP_SEQUENCES = frozenset({"USAGE", "SELECT"})
# SECURITY DEFINER functions run with the owner's rights; the app may call these only.
APP_DEFINER_FUNCTIONS = frozenset(
    {"audit_log_ensure_partitions", "events_sequence", "events_expire"}
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


def wanted(relname: str, relkind: str, partition: bool) -> tuple[frozenset[str], frozenset[str]]:
    """The (app, readonly) privileges the policy gives one relation; PUBLIC gets none."""
    if relkind == "S":
        return APP_SEQUENCES, SELECT
    if partition:
        # Written and read through the parent, whose privileges apply to its rows;
        # directly, only DBAs read them.
        return frozenset(), SELECT
    if relkind in ("v", "m"):
        return SELECT, SELECT
    return APP_TABLES.get(relname, DML), SELECT


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
            f"  GRANT CREATE, USAGE ON SCHEMA public TO {roles.owner};",
            f"  GRANT {roles.owner} TO {user};  -- or run migrate as {roles.owner}",
        ]
    )


async def prepare(conn: db.Conn, roles: Roles = ROLES) -> None:
    """Before the migrations: create the roles (when allowed), hand every existing object
    to the owner, and go on as the owner, so that what the migrations create is its."""
    me = await db.fetch_one(conn, Q["whoami"], **roles.params)
    assert me is not None
    user: str = me["name"]
    may_create = bool(me["superuser"] or me["createrole"])
    missing = [
        (name, login)
        for name, login, exists in (
            (roles.owner, True, me["owner_exists"]),
            (roles.app, True, me["app_exists"]),
            (roles.readonly, False, me["readonly_exists"]),
        )
        if not exists
    ]
    if missing and may_create:
        for name, login in missing:
            await conn.execute(_create_role(name, login))
            logger.info("created role %s", name)
        if me["createrole"] and not me["superuser"] and not me["acts_as_owner"]:
            # PostgreSQL 15: CREATEROLE may grant membership in roles it did not create.
            await conn.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(roles.owner), sql.Identifier(user))
            )
        me = await db.fetch_one(conn, Q["whoami"], **roles.params)
        assert me is not None
    elif missing:
        logger.warning(
            "fleet-payouts migrate: %s may not create roles (it needs superuser or "
            "CREATEROLE); missing: %s. Ask a DBA to run:\n%s\nthen run migrate again. "
            "Continuing without them.",
            user,
            ", ".join(name for name, _ in missing),
            _dba_script(roles, user),
        )

    if me["superuser"] or me["owns_schema"]:
        await _schema_privileges(conn, roles, me)
    if not me["owner_exists"]:
        return
    if user == roles.owner:
        await _warn_foreign_owned(conn, roles)
        return
    if not (me["superuser"] or me["acts_as_owner"]):
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


async def _schema_privileges(conn: db.Conn, roles: Roles, me: dict[str, Any]) -> None:
    """The owner creates in the schema; the app and readonly roles use it and create
    nothing (PostgreSQL 15 no longer lets PUBLIC create in `public`; older ones did)."""
    public = sql.Identifier("public")
    if me["owner_exists"]:
        owner = await db.fetch_one(conn, Q["schema_privileges"], role=roles.owner)
        if owner and not (owner["usage"] and owner["create"]):
            await conn.execute(
                sql.SQL("GRANT CREATE, USAGE ON SCHEMA {} TO {}").format(
                    public, sql.Identifier(roles.owner)
                )
            )
    for role, exists in ((roles.app, me["app_exists"]), (roles.readonly, me["readonly_exists"])):
        if not exists:
            continue
        have = await db.fetch_one(conn, Q["schema_privileges"], role=role)
        assert have is not None
        if not have["usage"]:
            await conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(public, sql.Identifier(role))
            )
        if have["create"]:
            await conn.execute(
                sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC, {}").format(
                    public, sql.Identifier(role)
                )
            )
        if have["create_schema"]:
            logger.warning(
                "fleet-payouts migrate: %s may create schemas in this database; "
                "a DBA should run: REVOKE CREATE ON DATABASE <db> FROM PUBLIC, %s;",
                role,
                role,
            )


async def _adopt(conn: db.Conn, roles: Roles) -> None:
    """Give the owner every object it does not own yet (a database that predates the
    roles, where the schema belonged to whoever ran migrate)."""
    rows = await db.fetch_all(conn, Q["foreign_owned"], owner=roles.owner)
    if not rows:
        return

    async def hand_over() -> None:
        for row in rows:
            # Catalog-built text: format() quoted every identifier in it.
            await conn.execute(row["statement"])

    await db.ddl_transaction(conn, hand_over, f"handing {len(rows)} objects to {roles.owner}")
    logger.info("handed %d objects to %s", len(rows), roles.owner)


async def _warn_foreign_owned(conn: db.Conn, roles: Roles) -> None:
    rows = await db.fetch_all(conn, Q["foreign_owned"], owner=roles.owner)
    if rows:
        logger.warning(
            "fleet-payouts migrate: %d objects are not %s's yet (e.g. %s); run migrate once "
            "as a superuser to hand them over.",
            len(rows),
            roles.owner,
            rows[0]["statement"],
        )


async def grant(conn: db.Conn, roles: Roles = ROLES) -> None:
    """After the migrations: bring every privilege in line with the policy."""
    me = await db.fetch_one(conn, Q["whoami"], **roles.params)
    assert me is not None
    if me["app_acts_as_owner"]:
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
    if me["app_exists"]:
        statements += await _function_statements(conn, roles)
    if me["readonly_exists"]:
        statements += await _default_statements(conn, roles)
    if not statements:
        return

    async def apply() -> None:
        for statement in statements:
            await conn.execute(statement)

    await db.ddl_transaction(conn, apply, "granting privileges")
    logger.info("privileges: %d grants or revokes", len(statements))


async def _relation_statements(
    conn: db.Conn, roles: Roles, me: dict[str, Any]
) -> list[sql.Composed]:
    statements: list[sql.Composed] = []
    skipped: list[str] = []
    for rel in await db.fetch_all(conn, Q["relations"], **roles.params):
        app, readonly = wanted(rel["relname"], rel["relkind"], rel["partition"])
        grantees: list[tuple[sql.Composable, list[str], frozenset[str]]] = [
            (sql.SQL("PUBLIC"), rel["public"], frozenset())
        ]
        if me["app_exists"]:
            grantees.append((sql.Identifier(roles.app), rel["app"], app))
        if me["readonly_exists"]:
            grantees.append((sql.Identifier(roles.readonly), rel["readonly"], readonly))
        changes = [(role, set(have) - want, want - set(have)) for role, have, want in grantees]
        if not any(extra or lacking for _, extra, lacking in changes):
            continue
        if not rel["ours"]:
            skipped.append(rel["name"])
            continue
        target = sql.Identifier("public", rel["relname"])
        for role, extra, lacking in changes:
            if extra:
                statements.append(_privileges("REVOKE", extra, target, "FROM", role))
            if lacking:
                statements.append(_privileges("GRANT", lacking, target, "TO", role))
    if skipped:
        logger.warning(
            "fleet-payouts migrate: cannot set privileges on %s (not ours): run migrate "
            "once as a superuser",
            ", ".join(skipped),
        )
    return statements


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


async def _function_statements(conn: db.Conn, roles: Roles) -> list[sql.Composed]:
    statements: list[sql.Composed] = []
    app = sql.Identifier(roles.app)
    for fn in await db.fetch_all(conn, Q["functions"], **roles.params):
        if not fn["ours"]:
            continue
        # regprocedure text: the quoted name and argument types.
        target = sql.SQL(cast(LiteralString, fn["signature"]))
        if fn["definer"]:
            if fn["public"]:
                statements.append(
                    sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(target)
                )
            want_app = fn["proname"] in APP_DEFINER_FUNCTIONS
        else:
            # procrastinate's functions and ours: the app calls them, whatever PUBLIC may.
            want_app = True
        if want_app and not fn["app"]:
            statements.append(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(target, app))
        elif fn["app"] and not want_app:
            statements.append(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM {}").format(target, app))
    return statements


async def _default_statements(conn: db.Conn, roles: Roles) -> list[sql.Composed]:
    """Partitions made later by the owner's function are readable by DBAs at once."""
    have = await db.fetch_one(conn, Q["readonly_defaults"], readonly=roles.readonly)
    assert have is not None
    statements: list[sql.Composed] = []
    for kind, present in (
        (sql.SQL("TABLES"), have["tables"]),
        (sql.SQL("SEQUENCES"), have["sequences"]),
    ):
        if not present:
            statements.append(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON {} TO {}"
                ).format(kind, sql.Identifier(roles.readonly))
            )
    return statements
