"""Payout rules and the state machine of service/payouts/model.py: plain values, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from service.core.codes import Code
from service.core.values import is_park_id, is_visible_ascii, parse_money
from service.payouts.model import (
    Availability,
    Status,
    can_change,
    instant_availability,
    next_periodic_payout_at,
    payout_amount,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
K = timedelta(hours=24)
N = timedelta(days=7)


# --- parse_money ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", "1.00"),
        ("1.5", "1.50"),
        ("1.50", "1.50"),
        ("0.01", "0.01"),
        ("100000.00", "100000.00"),
    ],
)
def test_parse_money_accepts_decimal_strings(raw: str, expected: str) -> None:
    """A positive decimal string with at most two fractional digits parses to cents."""
    value = parse_money(raw)
    assert Decimal(expected) == value
    assert expected == str(value)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "0",
        "0.00",
        "-1",
        "1.234",
        "1e3",
        " 1",
        "1 ",
        "1\n",
        "\uff11",  # FULLWIDTH DIGIT ONE
        "NaN",
        "Infinity",
        "+1",
        "01",
        "1.",
        ".5",
        "1,5",
    ],
)
def test_parse_money_rejects_malformed_strings(raw: str) -> None:
    """Anything but a plain positive decimal with at most two fractional digits is a ValueError."""
    with pytest.raises(ValueError):
        parse_money(raw)


@pytest.mark.parametrize("raw", [1, 1.5, Decimal("1.00"), None, b"1"])
def test_parse_money_rejects_non_strings(raw: object) -> None:
    """Money must arrive as a string: numbers, bytes and None are ValueError."""
    with pytest.raises(ValueError):
        parse_money(raw)  # type: ignore[arg-type]


# --- payout_amount ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "max_amount", "requested", "expected"),
    [
        ("500.00", "1000.00", None, "500.00"),  # everything available
        ("5000.00", "1000.00", None, "1000.00"),  # capped by the limit
        ("5000.00", "1000.00", "100.00", "100.00"),  # capped by the request
        ("50.00", "1000.00", "100.00", "50.00"),  # the balance is below the request
        ("5000.00", "100.00", "1000.00", "100.00"),  # the limit is below the request
    ],
)
def test_payout_amount_is_the_smallest_of_balance_limit_and_request(
    available: str, max_amount: str, requested: str | None, expected: str
) -> None:
    """One payout moves min(available, limit, requested amount if given)."""
    req = Decimal(requested) if requested is not None else None
    assert Decimal(expected) == payout_amount(Decimal(available), Decimal(max_amount), req)


def test_payout_amount_rounds_down_to_the_cent() -> None:
    """A balance with fractions of a cent is paid out rounded down, never up."""
    amount = payout_amount(Decimal("10.999"), Decimal("1000.00"), None)
    assert Decimal("10.99") == amount
    assert "10.99" == str(amount)


@pytest.mark.parametrize("available", ["0", "-0.01", "-250.00", "0.009"])
def test_payout_amount_is_never_negative(available: str) -> None:
    """A zero, negative or sub-cent balance yields a zero amount, never a negative one."""
    assert Decimal("0.00") == payout_amount(Decimal(available), Decimal("1000.00"), None)


# --- instant_availability ---------------------------------------------------------


# One row per case: the park's state (enabled, on hold, in flight, last counted instant
# payout), the time of the question, and the answer expected.
AVAILABILITY_CASES = {
    "disabled-before-every-other-reason": (
        (False, True, True, T0, T0 + timedelta(minutes=1)),
        Availability(False, Code.INSTANT_PAYOUTS_DISABLED, None),
    ),
    "hold-before-in-flight-and-cooldown": (
        (True, True, True, T0, T0 + timedelta(minutes=1)),
        Availability(False, Code.PARK_ON_HOLD, None),
    ),
    "in-flight-before-cooldown": (
        (True, False, True, T0, T0 + timedelta(minutes=1)),
        Availability(False, Code.PAYOUT_IN_PROGRESS, None),
    ),
    "cooldown-says-when-the-button-comes-back": (
        (True, False, False, T0, T0 + K - timedelta(seconds=1)),
        Availability(False, Code.COOLDOWN_ACTIVE, T0 + K),
    ),
    "cooldown-over-at-k": ((True, False, False, T0, T0 + K), Availability(True, None, None)),
    "cooldown-over-after-k": (
        (True, False, False, T0, T0 + K + timedelta(seconds=1)),
        Availability(True, None, None),
    ),
    "cooldown-over-long-ago": (
        (True, False, False, T0, T0 + timedelta(days=30)),
        Availability(True, None, None),
    ),
    "never-paid-instantly": ((True, False, False, None, T0), Availability(True, None, None)),
}


@pytest.mark.parametrize(
    ("state", "expected"), AVAILABILITY_CASES.values(), ids=AVAILABILITY_CASES.keys()
)
def test_instant_availability_answers_the_first_reason_that_applies(
    state: tuple[bool, bool, bool, datetime | None, datetime], expected: Availability
) -> None:
    """The button's answer is the first of: disabled, on hold, in flight, cooling down (with
    when it comes back, the last counted instant payout plus K); otherwise available."""
    enabled, on_hold, in_flight, last_counted_instant_at, now = state
    result = instant_availability(
        enabled=enabled,
        on_hold=on_hold,
        in_flight=in_flight,
        last_counted_instant_at=last_counted_instant_at,
        cooldown=K,
        now=now,
    )
    assert expected == result


# --- next_periodic_payout_at ------------------------------------------------------


@pytest.mark.parametrize(
    ("registered_at", "last_succeeded_at", "last_attempt_at", "anchor"),
    [
        (T0, None, None, T0),
        (T0, T0 + timedelta(days=3), None, T0 + timedelta(days=3)),
        (T0, None, T0 + timedelta(days=2), T0 + timedelta(days=2)),
        (T0, T0 + timedelta(days=3), T0 + timedelta(days=5), T0 + timedelta(days=5)),
        (T0, T0 + timedelta(days=6), T0 + timedelta(days=5), T0 + timedelta(days=6)),
        (
            T0 + timedelta(days=9),
            T0 + timedelta(days=6),
            T0 + timedelta(days=5),
            T0 + timedelta(days=9),
        ),
    ],
)
def test_next_periodic_payout_is_the_latest_anchor_plus_the_period(
    registered_at: datetime,
    last_succeeded_at: datetime | None,
    last_attempt_at: datetime | None,
    anchor: datetime,
) -> None:
    """A park is due N after the latest of registration, last success and last periodic attempt."""
    result = next_periodic_payout_at(
        enabled=True,
        registered_at=registered_at,
        last_succeeded_at=last_succeeded_at,
        last_periodic_attempt_at=last_attempt_at,
        period=N,
    )
    assert anchor + N == result


def test_next_periodic_payout_is_none_when_disabled() -> None:
    """A park with periodic payouts switched off is never due."""
    result = next_periodic_payout_at(
        enabled=False,
        registered_at=T0,
        last_succeeded_at=T0,
        last_periodic_attempt_at=T0,
        period=N,
    )
    assert result is None


# --- can_change -------------------------------------------------------------------

ALLOWED = {
    (Status.PENDING, Status.PROCESSING),
    (Status.PENDING, Status.CANCELLED),
    (Status.PROCESSING, Status.SUCCEEDED),
    (Status.PROCESSING, Status.FAILED),
    (Status.PROCESSING, Status.SKIPPED),
    # Manual payouts: a second admin decides, or the approval time runs out.
    (Status.PENDING_APPROVAL, Status.PENDING),
    (Status.PENDING_APPROVAL, Status.DENIED),
    (Status.PENDING_APPROVAL, Status.EXPIRED),
    # The bank sends a succeeded payout back.
    (Status.SUCCEEDED, Status.RETURNED),
    # Not moves: a live payout is rewritten in place (job id, a crashed run taken again).
    (Status.PENDING, Status.PENDING),
    (Status.PROCESSING, Status.PROCESSING),
    (Status.PENDING_APPROVAL, Status.PENDING_APPROVAL),
}


@pytest.mark.parametrize("old", list(Status))
@pytest.mark.parametrize("new", list(Status))
def test_can_change_follows_the_lifecycle(old: Status, new: Status) -> None:
    """pending->processing|cancelled, processing->final, live rows rewritable; finals frozen."""
    assert ((old, new) in ALLOWED) == can_change(old, new)


# --- identifiers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("park-alpha_1", True),
        ("p" * 64, True),
        ("", False),
        ("p" * 65, False),
        ("park alpha", False),
        ("park\n", False),
        ("park/1", False),
    ],
)
def test_is_park_id(value: str, expected: bool) -> None:
    """A park id is 1-64 letters, digits, '_' or '-', with nothing (not even a newline) after."""
    assert expected == is_park_id(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user-1", True),
        ("u" * 128, True),
        ("", False),
        ("u" * 129, False),
        ("a b", False),
        ("user\n", False),
        ("us\u00e9r", False),
    ],
)
def test_is_visible_ascii(value: str, expected: bool) -> None:
    """User ids and Idempotency-Keys are 1-128 visible ASCII characters and nothing else."""
    assert expected == is_visible_ascii(value, 128)


def test_the_cooldown_query_exempts_exactly_the_domain_s_statuses() -> None:
    """sql/payouts.sql park_state skips the statuses domain.COOLDOWN_EXEMPT names, no more, no
    fewer (returned included: the bank sent the money back)."""
    import re

    from service.core import db
    from service.payouts.model import COOLDOWN_EXEMPT

    query = db.queries("payouts")["park_state"]
    found = re.search(r"x\.kind = 'instant'\s+AND x\.status NOT IN \(([^)]*)\)", query)
    assert found is not None, query
    listed = {s.strip().strip("'") for s in found.group(1).split(",")}
    assert {str(s) for s in COOLDOWN_EXEMPT} == listed
