"""The payout object and its parts as SPEC section 3 puts them on the wire.

PAYOUT_FIELDS is the one definition of the payout's wire shape: the API renders it
(service/web/views.py), the event feed and its webhooks render it from the outbox
trigger's snapshot (service/events/outbox.py, which re-types the snapshot's columns by
it), and OpenAPI's `Payout` schema is built from it (service/web/openapi.py).
tests/integration/test_wire_shape.py compares all of them, field by field, with the
live trigger's snapshot (payout_event_snapshot, migrations/0012) for every kind.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from service.core.values import format_money, format_timestamp


class Type(enum.StrEnum):
    """What a field's value is on the wire (each a JSON string, or an object)."""

    UUID = "uuid"
    PARK_ID = "park_id"
    KIND = "kind"
    STATUS = "status"
    MONEY = "money"
    TEXT = "text"
    TIMESTAMP = "timestamp"
    APPROVAL = "approval"


@dataclass(frozen=True)
class Field:
    """One field of the payout object: its wire name and type, whether it may be null, and
    the column of `payouts` (and key of the event's snapshot) it comes from."""

    name: str
    type: Type
    nullable: bool
    column: str = ""
    description: str = ""

    @property
    def source(self) -> str:
        return self.column or self.name


APPROVAL_FIELDS: tuple[Field, ...] = (
    Field("reason", Type.TEXT, True, column="approval_reason"),
    Field("approved_by", Type.TEXT, True),
    Field("approved_at", Type.TIMESTAMP, True),
    Field("denied_by", Type.TEXT, True),
    Field("denied_reason", Type.TEXT, True),
)

PAYOUT_FIELDS: tuple[Field, ...] = (
    Field("id", Type.UUID, False),
    Field("park_id", Type.PARK_ID, False),
    Field("kind", Type.KIND, False),
    Field("status", Type.STATUS, False),
    Field("requested_amount", Type.MONEY, True),
    Field("amount", Type.MONEY, True),
    Field("currency", Type.TEXT, True),
    Field(
        "fee_amount",
        Type.MONEY,
        True,
        description="Instant payouts of a park with a fee: our revenue out of amount.",
    ),
    Field(
        "net_amount", Type.MONEY, True, description="What reaches the park: amount - fee_amount."
    ),
    Field("return_code", Type.TEXT, True),
    Field("returned_at", Type.TIMESTAMP, True),
    Field(
        "approval", Type.APPROVAL, True, description="Manual payouts only: the four-eyes record."
    ),
    Field("billing_payout_id", Type.TEXT, True),
    Field("failure_code", Type.TEXT, True),
    Field("failure_message", Type.TEXT, True),
    Field("requested_by", Type.TEXT, True),
    Field("created_at", Type.TIMESTAMP, False),
    Field("updated_at", Type.TIMESTAMP, False),
    Field("completed_at", Type.TIMESTAMP, True),
)

# The columns a payout's wire object is made of: what the outbox trigger's snapshot holds.
SNAPSHOT_COLUMNS: tuple[Field, ...] = (
    tuple(f for f in PAYOUT_FIELDS if f.type is not Type.APPROVAL) + APPROVAL_FIELDS
)


def timestamp(value: datetime | None) -> str | None:
    return format_timestamp(value) if value is not None else None


def money(value: Decimal | None) -> str | None:
    return format_money(value) if value is not None else None


def _value(field: Field, value: Any) -> Any:
    if value is None:
        return None
    if field.type is Type.MONEY:
        return format_money(value)
    if field.type is Type.TIMESTAMP:
        return format_timestamp(value)
    if field.type is Type.UUID:
        return str(value)
    return value


def payout_json(row: dict[str, Any]) -> dict[str, Any]:
    """The payout object of a `payouts` row, or of an event's snapshot (outbox.snapshot).

    Events written before migration 0012 lack its columns: those fields are null.
    """
    found = {
        f.name: approval_json(row) if f.type is Type.APPROVAL else _value(f, row.get(f.source))
        for f in PAYOUT_FIELDS
    }
    # While retries go on, the column holds the last transient problem for support;
    # the client sees a failure message only on a failure.
    if row["status"] != "failed":
        found["failure_message"] = None
    return found


def approval_json(row: dict[str, Any]) -> dict[str, Any] | None:
    """A manual payout's four-eyes record; None for the other kinds."""
    if row["kind"] != "manual":
        return None
    return {f.name: _value(f, row.get(f.source)) for f in APPROVAL_FIELDS}


def from_snapshot(payout: dict[str, Any]) -> dict[str, Any]:
    """An event's snapshot (JSON as the trigger wrote it) with its times and amounts typed as
    the `payouts` row types them (the id stays text: payout_json renders either)."""
    typed = dict(payout)
    for f in SNAPSHOT_COLUMNS:
        value = typed.get(f.source)
        if value is None:
            continue
        if f.type is Type.TIMESTAMP:
            typed[f.source] = datetime.fromisoformat(value)
        elif f.type is Type.MONEY:
            typed[f.source] = Decimal(str(value))
    return typed
