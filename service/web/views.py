"""JSON views: how rows look on the wire (SPEC section 3's objects)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from service.core.settings import Settings
from service.core.values import format_money
from service.parks.fees import Fee
from service.payouts.model import next_periodic_payout_at
from service.payouts.wire import money, payout_json, timestamp

__all__ = ["audit_json", "availability_json", "money", "park_json", "payout_json", "timestamp"]


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
        "instant_fee": fee_json(row["instant_fee_percent"], row["instant_fee_fixed"]),
        "instant_payouts_until": timestamp(row["instant_payouts_until"]),
        "registered_at": timestamp(row["registered_at"]),
        "last_payout_at": timestamp(row["last_payout_at"]),
        "next_periodic_payout_at": timestamp(
            next_periodic_payout_at(
                enabled=row["periodic_payouts_enabled"],
                on_hold=row["hold_reason"] is not None,
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


def fee_json(percent: Decimal | None, fixed: Decimal | None) -> dict[str, str] | None:
    if percent is None or fixed is None:
        return None
    return {"percent": format_money(percent), "fixed": format_money(fixed)}


def availability_json(
    available: bool,
    reason: str | None,
    next_available_at: datetime | None,
    settings: Settings,
    *,
    fee: Fee | None = None,
    subscription_ended: bool = False,
    instant_payouts_until: datetime | None = None,
) -> dict[str, Any]:
    hours = settings.instant_cooldown.total_seconds() / 3600
    return {
        "available": available,
        "reason": reason,
        "next_available_at": timestamp(next_available_at),
        "max_amount": money(settings.payout_max_amount),
        "min_amount": money(settings.payout_min_amount),
        "cooldown_hours": int(hours) if hours.is_integer() else hours,
        "fee": fee_json(fee.percent, fee.fixed) if fee else None,
        # Why instant payouts are off, when it is the end of the subscription
        # (the press is refused with the same details.reason).
        "details": {"reason": "subscription_ended"} if subscription_ended else None,
        "instant_payouts_until": timestamp(instant_payouts_until),
    }
