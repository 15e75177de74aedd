"""The scheduled checks' last verdicts (`ops_checks`): `audit verify` and the daily reconciliation.

A check records its verdict where every worker can read it, so that the alerts see a
failed or missing run whichever host, timer or person ran it (service/ops/gauges.py exports
the rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from service.core import db

logger = logging.getLogger(__name__)

Q = db.queries("checks")

AUDIT_VERIFY = "audit_verify"
RECONCILE = "reconcile"


@dataclass(frozen=True, slots=True)
class CheckState:
    """One check as the gauges export it: Unix times, 0 for never."""

    check_name: str
    expected_since: float
    last_run: float
    last_ok: bool | None


async def record(conn: db.Conn, check: str, *, ok: bool, detail: str | None = None) -> None:
    """Record one run's verdict in the caller's transaction."""
    await db.execute(conn, Q["record"], check=check, ok=ok, detail=detail)


async def record_run(url: str, check: str, *, ok: bool, detail: str | None) -> bool:
    """Record a CLI run's verdict on a connection of its own. A login that may not
    write it (a DBA's readonly role) keeps its verdict and exit code, with a warning."""
    try:
        conn = await db.connect(url, name=f"{check}-record")
        async with conn:
            await record(conn, check, ok=ok, detail=detail)
    except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable) as exc:
        logger.warning("%s: verdict not recorded in ops_checks (%s)", check, exc)
        return False
    return True


async def states(conn: db.Conn) -> list[CheckState]:
    return await db.fetch_all_as(conn, CheckState, Q["all"])
