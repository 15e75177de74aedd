"""The one lease (service/core/lease.py): its rule against the real database, and that it
stays the only one."""

from __future__ import annotations

import ast
from datetime import timedelta

from service.core import db
from service.core.lease import Lease
from service.payouts import periodic, returns
from tests.helpers.emulator import REPO_ROOT

MINUTE = timedelta(minutes=1)


async def test_one_holder_at_a_time_until_release(conn: db.Conn) -> None:
    """A holds and renews; B is refused while A holds, and takes it once A releases."""
    a, b = Lease("chore", MINUTE, "a"), Lease("chore", MINUTE, "b")
    assert True is await a.take(conn)
    assert False is await b.take(conn)
    assert True is await a.take(conn)
    await b.release(conn)  # not B's to free
    assert False is await b.take(conn)
    await a.release(conn)
    assert True is await b.take(conn)
    assert False is await a.take(conn)


async def test_an_expired_lease_goes_to_the_next_taker(conn: db.Conn) -> None:
    """A holder whose deadline passed (by the database's clock) loses the lease to the next."""
    frozen = Lease("chore", timedelta(seconds=-1), "frozen")
    assert True is await frozen.take(conn)
    assert True is await Lease("chore", MINUTE, "next").take(conn)
    assert False is await Lease("chore", MINUTE, "frozen").take(conn)


async def test_leases_of_other_names_are_independent(conn: db.Conn) -> None:
    """The scan's lease does not keep the returns reader out."""
    assert True is await Lease(periodic.LEASE_NAME, MINUTE, "a").take(conn)
    assert True is await Lease(returns.LEASE_NAME, MINUTE, "b").take(conn)


def test_scan_leases_is_written_by_one_query_file_and_one_module() -> None:
    """Only sql/leases.sql writes scan_leases, and only service/core/lease.py loads it."""
    sql_files = sorted((REPO_ROOT / "sql").glob("*.sql"))
    assert ["leases.sql"] == [p.name for p in sql_files if "scan_leases" in p.read_text()]
    loaders = []
    for path in sorted((REPO_ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "queries"
                and [ast.Constant] == [type(a) for a in node.args]
                and "leases" == node.args[0].value  # type: ignore[attr-defined]
            ):
                loaders.append(str(path.relative_to(REPO_ROOT)))
    assert ["service/core/lease.py"] == loaders
