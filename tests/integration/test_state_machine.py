"""One truth for the payout state machine: domain.can_change and the database agree."""

from __future__ import annotations

import uuid
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg.rows import DictRow

from service.payouts.model import Status, can_change

PARK = "park-sm"

# What each status needs besides itself, so that only the transition rule can refuse.
COLUMNS: dict[Status, LiteralString] = {
    # A manual payout leaves pending_approval only approved by a second admin.
    Status.PENDING: (
        "completed_at = NULL, approved_by = CASE WHEN kind = 'manual' THEN 'admin-2' END, "
        "approved_at = CASE WHEN kind = 'manual' THEN now() END"
    ),
    Status.PROCESSING: "completed_at = NULL",
    Status.SUCCEEDED: (
        "available = 500, amount = 100, currency = 'RUB', billing_params = '{}', "
        "ordered_at = now(), billing_payout_id = 'b-1', completed_at = now()"
    ),
    Status.FAILED: "failure_code = 'insufficient_funds', completed_at = now()",
    Status.SKIPPED: "completed_at = now()",
    Status.CANCELLED: "completed_at = now()",
    Status.PENDING_APPROVAL: "completed_at = NULL",
    Status.DENIED: "denied_by = 'admin-2', completed_at = now()",
    # The approval deadline is in the past for these payouts (see payout_in).
    Status.EXPIRED: "completed_at = now()",
    Status.RETURNED: "return_code = 'account_closed', returned_at = now()",
}
# How to reach each status from pending, one legal step at a time.
PATH: dict[Status, list[Status]] = {
    Status.PENDING: [],
    Status.PROCESSING: [Status.PROCESSING],
    Status.SUCCEEDED: [Status.PROCESSING, Status.SUCCEEDED],
    Status.FAILED: [Status.PROCESSING, Status.FAILED],
    Status.SKIPPED: [Status.PROCESSING, Status.SKIPPED],
    Status.CANCELLED: [Status.CANCELLED],
    Status.PENDING_APPROVAL: [],
    Status.DENIED: [Status.DENIED],
    Status.EXPIRED: [Status.EXPIRED],
    Status.RETURNED: [Status.PROCESSING, Status.SUCCEEDED, Status.RETURNED],
}
# Born awaiting approval (a manual payout), and so reached only from there.
APPROVAL_TREE = {Status.PENDING_APPROVAL, Status.DENIED, Status.EXPIRED}


def move(pg: psycopg.Connection[DictRow], payout_id: uuid.UUID, status: Status) -> None:
    query = "UPDATE payouts SET status = %(status)s, " + COLUMNS[status] + " WHERE id = %(id)s"
    pg.execute(query, {"status": str(status), "id": payout_id})


def payout_in(
    pg: psycopg.Connection[DictRow], status: Status, *, deadline_passed: bool = False
) -> uuid.UUID:
    payout_id = uuid.uuid4()
    if status in APPROVAL_TREE:
        # Approval time runs out (the trigger checks it by the database's clock)
        # only for a payout on its way to expired.
        passed = deadline_passed or status is Status.EXPIRED
        deadline = "now() - interval '1 second'" if passed else "now() + interval '1 day'"
        pg.execute(
            "INSERT INTO payouts (id, park_id, kind, status, max_amount, requested_amount,"
            " idempotency_key, requested_by, approval_reason, approval_expires_at)"
            " VALUES (%s, %s, 'manual', 'pending_approval', 1000, 100, %s, 'admin-1', 'why', "
            + deadline
            + ")",
            (payout_id, PARK, str(payout_id)),
        )
    else:
        pg.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, 'periodic', 1000)",
            (payout_id, PARK),
        )
    for step in PATH[status]:
        move(pg, payout_id, step)
    return payout_id


@pytest.mark.parametrize("old", list(Status))
@pytest.mark.parametrize("new", list(Status))
def test_database_and_domain_agree_on_every_change(
    pg: psycopg.Connection[DictRow], old: Status, new: Status
) -> None:
    """The trigger accepts a status change exactly when domain.can_change says it may happen."""
    pg.execute("INSERT INTO parks (park_id) VALUES (%s) ON CONFLICT DO NOTHING", (PARK,))
    payout_id = payout_in(pg, old, deadline_passed=new is Status.EXPIRED)
    accepted: Any
    try:
        with pg.transaction():
            move(pg, payout_id, new)
        accepted = True
    except psycopg.errors.IntegrityConstraintViolation as exc:
        assert "transition" in str(exc) or "final" in str(exc), exc
        accepted = False
    assert can_change(old, new) == accepted
