"""The instant fee (SPEC section 8): Decimal, half-up to the cent, never more than the amount."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.values import CENT
from service.parks.fees import Fee, parse_fee_fixed, parse_fee_percent
from service.payouts.model import quote

AMOUNTS = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("9999999999999999.99"), places=2)
PERCENTS = st.decimals(min_value=Decimal(0), max_value=Decimal(100), places=2)
FIXED = st.decimals(min_value=Decimal(0), max_value=Decimal("9999999999999999.99"), places=2)


@given(amount=AMOUNTS, percent=PERCENTS, fixed=FIXED)
def test_the_fee_never_exceeds_the_amount_and_the_split_adds_up(
    amount: Decimal, percent: Decimal, fixed: Decimal
) -> None:
    """For any amount, percent and fixed part: 0 <= fee <= amount, net + fee = amount exactly."""
    split = quote(amount, Fee(percent, fixed))
    assert split.fee_amount is not None and split.net_amount is not None
    assert Decimal(0) <= split.fee_amount <= amount
    assert amount == split.net_amount + split.fee_amount
    assert split.fee_amount == split.fee_amount.quantize(CENT)
    assert split.net_amount >= 0


@given(amount=AMOUNTS, percent=PERCENTS)
def test_the_percent_part_is_rounded_half_up_to_the_cent(amount: Decimal, percent: Decimal) -> None:
    """Without a fixed part the fee is amount x percent / 100 rounded half-up: a half cent
    goes up, anything less goes down."""
    fee = Fee(percent, Decimal(0)).of(amount)
    exact = amount * percent / 100
    assert Decimal("-0.005") < fee - exact <= Decimal("0.005")


@pytest.mark.parametrize(
    ("amount", "percent", "fixed", "fee"),
    [
        ("100.00", "1.00", "0.00", "1.00"),
        ("0.50", "1.00", "0.00", "0.01"),  # 0.005 rounds up, not to even
        ("0.49", "1.00", "0.00", "0.00"),  # 0.0049 rounds down
        ("2.50", "1.00", "0.00", "0.03"),  # 0.025 rounds up (banker's rounding gives 0.02)
        ("10.00", "1.50", "0.30", "0.45"),
        ("1.00", "0.00", "5.00", "1.00"),  # capped at the amount
        ("100.00", "100.00", "0.00", "100.00"),
    ],
)
def test_worked_examples(amount: str, percent: str, fixed: str, fee: str) -> None:
    """Worked examples of min(amount, round_half_up(amount x percent / 100, 2) + fixed)."""
    assert Decimal(fee) == Fee(Decimal(percent), Decimal(fixed)).of(Decimal(amount))


def test_no_fee_terms_no_split() -> None:
    """A park without fee terms orders its amount with no fee and no net (null on the wire)."""
    split = quote(Decimal("10.00"), None)
    assert (Decimal("10.00"), None, None) == (split.amount, split.fee_amount, split.net_amount)


@pytest.mark.parametrize("raw", ["100.01", "-1", "1e2", "abc", "1.001", ""])
def test_a_percent_outside_0_to_100_or_malformed_is_refused(raw: str) -> None:
    """A fee percent is a decimal string from 0 to 100 with at most two fractional digits."""
    with pytest.raises(ValueError):
        parse_fee_percent(raw)


def test_zero_parts_are_accepted() -> None:
    """A zero percent or zero fixed part is a valid term ("0.00")."""
    assert (Decimal(0), Decimal(0)) == (parse_fee_percent("0.00"), parse_fee_fixed("0"))
