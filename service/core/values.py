"""Plain values every layer reads and writes: money, timestamps, park ids.

No I/O and no payout rules (those are service/payouts/model.py): the settings,
the wire formats and the stores all parse and print these the same way.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal, InvalidOperation

CENT = Decimal("0.01")

# At most sixteen integer digits: numeric(18,2) in the schema.
_MONEY_RE = re.compile(r"^(0|[1-9][0-9]{0,15})(\.[0-9]{1,2})?$")
_PARK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VISIBLE_ASCII_RE = re.compile(r"^[\x21-\x7e]+$")


def parse_money(raw: str) -> Decimal:
    """A positive decimal string with at most 2 fractional digits, or ValueError."""
    if not isinstance(raw, str) or not _MONEY_RE.fullmatch(raw):
        raise ValueError("amount must be a decimal string with at most 2 fractional digits")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueError("amount is not a decimal") from None
    if value <= 0:
        raise ValueError("amount must be positive")
    return value.quantize(CENT)


def format_money(value: Decimal) -> str:
    return str(value.quantize(CENT))


def parse_timestamp(raw: object) -> datetime:
    """An RFC 3339 timestamp that names its time zone; ValueError for anything else."""
    if not isinstance(raw, str):
        raise ValueError("a timestamp is a string")
    value = datetime.fromisoformat(raw)
    if value.tzinfo is None:
        raise ValueError("a timestamp must name its time zone")
    return value


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC, as the API and Billing write timestamps."""
    if value.tzinfo is None:
        raise ValueError("a timestamp must name its time zone")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def is_park_id(value: str) -> bool:
    return bool(_PARK_ID_RE.fullmatch(value))


def is_visible_ascii(value: str, max_len: int) -> bool:
    return 0 < len(value) <= max_len and bool(_VISIBLE_ASCII_RE.fullmatch(value))


# The largest balance numeric(18,2) stores: sixteen integer digits.
MAX_BALANCE = Decimal("9999999999999999.99")


def is_storable_balance(available: Decimal) -> bool:
    """A balance the payouts table can keep as reported: not negative, cents, in range.

    Anything else (an overdrawn park, a sub-cent figure) is recorded only in
    the audit entry of that park's own payout, never as a snapshot that a
    whole batch's INSERT could trip over.
    """
    return (
        available.is_finite()
        and Decimal(0) <= available <= MAX_BALANCE
        and available == available.quantize(CENT, rounding=ROUND_DOWN)
    )
