"""Reconciliation against the emulator over HTTP and a real database: each kind of mismatch,
the `fleet-payouts reconcile` exit codes, and the workers' daily run.

Our payouts are made by the real payout job (in-process); Billing's drift comes from the
emulator's admin endpoints.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from decimal import Decimal

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import DictRow

from service.core import db
from service.ops import reconcile
from service.payouts.execution import Deps, execute_payout
from service.payouts.model import Status
from tests.conftest import service_env
from tests.helpers.api import bank_returns, outside_return, set_balance
from tests.helpers.emulator import REPO_ROOT


async def new_payout(conn: db.Conn, park: str) -> uuid.UUID:
    """A pending periodic payout for `park`, registered here if need be."""
    await conn.execute("INSERT INTO parks (park_id) VALUES (%s) ON CONFLICT DO NOTHING", (park,))
    payout_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
        (payout_id, park),
    )
    return payout_id


async def paid(deps: Deps, conn: db.Conn, billing_url: str, park: str, amount: str) -> str:
    """A payout of ours that the job drove to succeeded at Billing; returns its id (the key)."""
    set_balance(billing_url, park, amount)
    payout_id = await new_payout(conn, park)
    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    return str(payout_id)


def outside(billing_url: str, key: str, park: str, amount: str) -> None:
    """Billing makes a payout by another road, under `key`."""
    body = {"park_id": park, "amount": amount, "currency": "RUB", "idempotency_key": key}
    httpx.post(f"{billing_url}/admin/payouts", json=body).raise_for_status()


def forget(billing_url: str, key: str) -> None:
    """Billing loses the payout it made under `key`."""
    httpx.delete(f"{billing_url}/admin/payouts/{key}").raise_for_status()


def run_cli(db_url: str, billing_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "reconcile"],
        env=service_env(db_url, billing_url),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_exits_0_when_clean_and_1_naming_each_drift(
    deps: Deps, conn: db.Conn, db_url: str, billing_url: str
) -> None:
    """`fleet-payouts reconcile` exits 0 when both sides agree; after a payout made outside the
    service and one forgotten by Billing it exits 1 and names both.
    """
    keys = [await paid(deps, conn, billing_url, f"rec-{i}", "10.00") for i in range(3)]

    clean = run_cli(db_url, billing_url)
    assert 0 == clean.returncode, clean.stdout + clean.stderr
    assert "0 mismatch(es); 3 Billing payouts listed" in clean.stdout

    outside(billing_url, "paid-by-hand-1", "rec-0", "55.00")
    forget(billing_url, keys[1])
    drift = run_cli(db_url, billing_url)

    assert 1 == drift.returncode, drift.stdout + drift.stderr
    found = sorted(line.split()[:2] for line in drift.stdout.splitlines()[:-1])
    assert [
        ["missing_at_billing", f"key={keys[1]}"],
        ["unknown_at_billing", "key=paid-by-hand-1"],
    ] == found


async def test_each_kind_of_mismatch_and_nothing_for_payouts_in_flight(
    deps: Deps, conn: db.Conn, billing_url: str
) -> None:
    """A payout that failed here but was paid at Billing, and one Billing paid another amount,
    are reported as such; a payout still in flight whose key Billing has is not.
    """
    failed = await new_payout(conn, "rec-unknown-to-billing")  # Billing 404s the balance
    assert Status.FAILED == await execute_payout(deps, failed)
    outside(billing_url, str(failed), "rec-unknown-to-billing", "12.00")
    differs = await paid(deps, conn, billing_url, "rec-differs", "30.00")
    forget(billing_url, differs)
    outside(billing_url, differs, "rec-differs", "31.00")
    in_flight = await new_payout(conn, "rec-in-flight")
    outside(billing_url, str(in_flight), "rec-in-flight", "5.00")
    window = await db.fetch_one(conn, reconcile.Q["daily_window"], days=1)
    assert window is not None
    found: list[reconcile.Mismatch] = []

    summary = await reconcile.reconcile(
        conn, deps.billing, window["since"], window["until"], found.append
    )

    assert {
        ("failed_here_paid_there", str(failed), "failed", None, Decimal("12.00")),
        ("amount_differs", differs, "succeeded", Decimal("30.00"), Decimal("31.00")),
    } == {(m.kind, m.key, m.our_status, m.our_amount, m.billing_amount) for m in found}
    assert (2, 3) == (summary.mismatches, summary.billing_listed)


async def test_daily_run_records_audits_and_reports_the_count(
    deps: Deps, conn: db.Conn, billing_url: str, pg: psycopg.Connection[DictRow]
) -> None:
    """The workers' daily run writes a system audit entry and a run record with the mismatch
    count, and sets fleet_payouts_reconciliation_mismatches to it.
    """
    await paid(deps, conn, billing_url, "rec-daily", "20.00")
    outside(billing_url, "paid-by-hand-2", "rec-daily", "1.00")

    summary = await reconcile.run_daily(deps)

    assert {"unknown_at_billing": 1} == dict(summary.by_kind)
    entry = pg.execute(
        "SELECT actor_type, outcome, details FROM audit_log WHERE action = 'billing.reconcile'"
    ).fetchone()
    assert entry is not None
    assert ("system", "mismatches_found", 1, {"unknown_at_billing": 1}) == (
        entry["actor_type"],
        entry["outcome"],
        entry["details"]["mismatches"],
        entry["details"]["by_kind"],
    )
    assert ["paid-by-hand-2"] == [m["key"] for m in entry["details"]["sample"]]
    run = pg.execute("SELECT mismatches FROM billing_reconciliations").fetchall()
    assert [{"mismatches": 1}] == run
    assert 1.0 == REGISTRY.get_sample_value("fleet_payouts_reconciliation_mismatches")


@pytest.mark.parametrize("when", ["2024-13-01", "yesterday", "2024-05-01T00:00:00"])
def test_cli_refuses_a_bad_date_before_doing_anything(when: str) -> None:
    """--since must be a date or a timestamp with its zone; anything else is a usage error."""
    r = subprocess.run(
        [sys.executable, "-m", "service", "reconcile", "--since", when],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 2 == r.returncode
    assert "--since" in r.stderr


async def test_fee_and_return_mismatches(deps: Deps, conn: db.Conn, billing_url: str) -> None:
    """Billing recording another fee is fee_differs; a payout Billing says was returned but is
    not returned here, and a return for a key we do not know, are returned_at_billing."""
    from service.payouts import returns

    await conn.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled, instant_fee_percent,"
        " instant_fee_fixed) VALUES ('rec-fee', true, 1, 0)"
    )
    set_balance(billing_url, "rec-fee", "100.00")
    fee_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, idempotency_key, requested_by, max_amount,"
        " fee_percent, fee_fixed) VALUES (%s, 'rec-fee', 'instant', 'k', 'u', 1000, 1, 0)",
        (fee_id,),
    )
    assert Status.SUCCEEDED == await execute_payout(deps, fee_id)
    forget(billing_url, str(fee_id))
    outside(billing_url, str(fee_id), "rec-fee", "100.00")  # same amount, no fee
    returned = await paid(deps, conn, billing_url, "rec-returned", "20.00")
    bank_returns(billing_url, returned)
    unknown = str(uuid.uuid4())
    outside_return(billing_url, unknown)
    # As the returns reader keeps it (the known return is not read yet).
    await conn.execute(
        "INSERT INTO billing_returns_unmatched (idempotency_key, code, returned_at)"
        " VALUES (%s, 'wrong_iban', now())",
        (unknown,),
    )
    window = await db.fetch_one(conn, reconcile.Q["daily_window"], days=1)
    assert window is not None
    found: list[reconcile.Mismatch] = []

    await reconcile.reconcile(conn, deps.billing, window["since"], window["until"], found.append)

    assert {
        ("fee_differs", str(fee_id)),
        ("returned_at_billing", returned),
        ("returned_at_billing", unknown),
    } == {(m.kind, m.key) for m in found}

    # Once the reader has applied the return, ours agrees with Billing's.
    assert 1 == await returns.read(deps)
    found.clear()
    await reconcile.reconcile(conn, deps.billing, window["since"], window["until"], found.append)
    assert {("fee_differs", str(fee_id)), ("returned_at_billing", unknown)} == {
        (m.kind, m.key) for m in found
    }
