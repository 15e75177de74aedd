"""The payout object and its parts as SPEC section 3 puts them on the wire.

Rendered by the API (service/web/views.py) and by the event feed and its
webhooks (service/events/outbox.py), so it belongs to neither edge.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from service.core.values import format_money, format_timestamp


def timestamp(value: datetime | None) -> str | None:
    return format_timestamp(value) if value is not None else None


def money(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None


def payout_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "park_id": row["park_id"],
        "kind": row["kind"],
        "status": row["status"],
        "requested_amount": money(row["requested_amount"]),
        "amount": money(row["amount"]),
        "currency": row["currency"],
        # Events written before migration 0012 have none of the fields below.
        "fee_amount": money(row.get("fee_amount")),
        "net_amount": money(row.get("net_amount")),
        "return_code": row.get("return_code"),
        "returned_at": timestamp(_time(row.get("returned_at"))),
        "approval": approval_json(row),
        "billing_payout_id": row["billing_payout_id"],
        "failure_code": row["failure_code"],
        # While retries go on, the column holds the last transient problem
        # for support; the client sees a failure message only on a failure.
        "failure_message": row["failure_message"] if row["status"] == "failed" else None,
        "requested_by": row["requested_by"],
        "created_at": timestamp(row["created_at"]),
        "updated_at": timestamp(row["updated_at"]),
        "completed_at": timestamp(row["completed_at"]),
    }


def _time(value: datetime | str | None) -> datetime | None:
    """A timestamp column, or its text as an event's snapshot keeps it."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def approval_json(row: dict[str, Any]) -> dict[str, Any] | None:
    """A manual payout's four-eyes record; None for the other kinds."""
    if row["kind"] != "manual":
        return None
    return {
        "reason": row.get("approval_reason"),
        "approved_by": row.get("approved_by"),
        "approved_at": timestamp(_time(row.get("approved_at"))),
        "denied_by": row.get("denied_by"),
        "denied_reason": row.get("denied_reason"),
    }
