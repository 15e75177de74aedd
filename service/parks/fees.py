"""A park's instant-payout fee terms (SPEC section 8): a percent plus a fixed part.

Parks keep the terms (the registry, the CSV import, support's settings); the
payout model applies them to an amount (service/payouts/model.py `quote`).
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Decimal

from service.core.values import CENT, parse_money


@dataclasses.dataclass(frozen=True)
class Fee:
    """A park's instant payout fee: a percent of the amount plus a fixed part."""

    percent: Decimal
    fixed: Decimal

    def of(self, amount: Decimal) -> Decimal:
        """The fee on `amount`: percent half-up to the cent, plus the fixed part, at most
        the amount itself (so the park never receives less than nothing)."""
        share = (amount * self.percent / 100).quantize(CENT, rounding=ROUND_HALF_UP)
        return min(amount, share + self.fixed)


def terms(percent: Decimal | None, fixed: Decimal | None) -> Fee | None:
    """The fee terms a row's two columns hold (both or neither, by a CHECK); None: free."""
    if percent is None or fixed is None:
        return None
    return Fee(percent, fixed)


MAX_FEE_PERCENT = Decimal(100)


def parse_fee_percent(raw: str) -> Decimal:
    """A percent from 0 to 100 with at most 2 fractional digits, or ValueError."""
    value = Decimal(0) if raw in ("0", "0.0", "0.00") else parse_money(raw)
    if value > MAX_FEE_PERCENT:
        raise ValueError("percent must be at most 100")
    return value


def parse_fee_fixed(raw: str) -> Decimal:
    """A non-negative money string, or ValueError."""
    return Decimal(0) if raw in ("0", "0.0", "0.00") else parse_money(raw)
