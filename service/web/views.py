"""JSON views: how rows look on the wire (SPEC section 3's objects)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from service.audit.store import Logged
from service.core.settings import Settings
from service.core.values import format_money
from service.parks.fees import Fee
from service.parks.store import Park
from service.payouts import wire
from service.payouts.model import next_periodic_payout_at
from service.payouts.store import Record
from service.payouts.wire import money, timestamp

__all__ = ["audit_json", "availability_json", "money", "park_json", "payout_json", "timestamp"]


def payout_json(payout: Record) -> dict[str, Any]:
    """SPEC section 3's payout."""
    return wire.payout_json(payout.wire_row())


def park_json(park: Park, settings: Settings) -> dict[str, Any]:
    return {
        "park_id": park.park_id,
        "instant_payouts_enabled": park.instant_payouts_enabled,
        "periodic_payouts_enabled": park.periodic_payouts_enabled,
        "params": park.params,
        "hold": (
            {
                "reason": park.hold_reason,
                "since": timestamp(park.hold_since),
                "by": park.hold_by,
            }
            if park.hold_reason is not None
            else None
        ),
        "instant_fee": fee_json(park.fee),
        "instant_payouts_until": timestamp(park.instant_payouts_until),
        "registered_at": timestamp(park.registered_at),
        "last_payout_at": timestamp(park.last_payout_at),
        "next_periodic_payout_at": timestamp(
            next_periodic_payout_at(
                enabled=park.periodic_payouts_enabled,
                on_hold=park.hold_reason is not None,
                registered_at=park.registered_at,
                last_succeeded_at=park.last_payout_at,
                last_periodic_attempt_at=park.last_periodic_attempt_at,
                period=settings.payout_period,
            )
        ),
    }


def audit_json(entry: Logged) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": timestamp(entry.at),
        "actor_type": entry.actor_type,
        "actor_id": entry.actor_id,
        "park_id": entry.park_id,
        "action": entry.action,
        "outcome": entry.outcome,
        "request_id": entry.request_id,
        "payout_id": str(entry.payout_id) if entry.payout_id else None,
        "details": entry.details,
    }


def fee_json(fee: Fee | None) -> dict[str, str] | None:
    if fee is None:
        return None
    return {"percent": format_money(fee.percent), "fixed": format_money(fee.fixed)}


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
        "fee": fee_json(fee),
        # Why instant payouts are off, when it is the end of the subscription
        # (the press is refused with the same details.reason).
        "details": {"reason": "subscription_ended"} if subscription_ended else None,
        "instant_payouts_until": timestamp(instant_payouts_until),
    }
