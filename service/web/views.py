"""JSON views: how rows look on the wire (SPEC section 3's objects)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from service.domain import format_money, next_periodic_payout_at
from service.settings import Settings


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


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


def park_json(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    return {
        "park_id": row["park_id"],
        "instant_payouts_enabled": row["instant_payouts_enabled"],
        "periodic_payouts_enabled": row["periodic_payouts_enabled"],
        "params": row["params"],
        "hold": (
            {
                "reason": row["hold_reason"],
                "since": timestamp(row["hold_since"]),
                "by": row["hold_by"],
            }
            if row["hold_reason"] is not None
            else None
        ),
        "registered_at": timestamp(row["registered_at"]),
        "last_payout_at": timestamp(row["last_payout_at"]),
        "next_periodic_payout_at": timestamp(
            next_periodic_payout_at(
                # A park on hold is left alone by the scan until released.
                enabled=row["periodic_payouts_enabled"] and row["hold_reason"] is None,
                registered_at=row["registered_at"],
                last_succeeded_at=row["last_payout_at"],
                last_periodic_attempt_at=row["last_periodic_attempt_at"],
                period=settings.payout_period,
            )
        ),
    }


def audit_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": timestamp(row["at"]),
        "actor_type": row["actor_type"],
        "actor_id": row["actor_id"],
        "park_id": row["park_id"],
        "action": row["action"],
        "outcome": row["outcome"],
        "request_id": row["request_id"],
        "payout_id": str(row["payout_id"]) if row["payout_id"] else None,
        "details": row["details"],
    }


def availability_json(
    available: bool, reason: str | None, next_available_at: datetime | None, settings: Settings
) -> dict[str, Any]:
    hours = settings.instant_cooldown.total_seconds() / 3600
    return {
        "available": available,
        "reason": reason,
        "next_available_at": timestamp(next_available_at),
        "max_amount": money(settings.payout_max_amount),
        "min_amount": money(settings.payout_min_amount),
        "cooldown_hours": int(hours) if hours.is_integer() else hours,
    }
