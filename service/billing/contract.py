"""Billing's HTTP contract (SPEC section 4), once: the client speaks it, the emulator
(devkit/) answers it, and neither writes its own copy of a limit, a path or a code.

Only what the two sides must agree on lives here; how each reads or writes JSON is
its own business (the client distrusts every answer, the emulator every request).
"""

from __future__ import annotations

import enum
import re
from typing import Final


class Path(enum.StrEnum):
    BALANCE = "/v1/balance"
    BALANCES_SELECT = "/v1/balances/select"
    PAYOUTS = "/v1/payouts"  # POST orders one; GET lists those made (reconciliation)
    PAYOUT = "/v1/payouts/{key}"  # GET: the payout made under an Idempotency-Key
    RETURNS = "/v1/returns"


def payout_path(key: str) -> str:
    return Path.PAYOUT.format(key=key)


class BillingCode(enum.StrEnum):
    """The codes of Billing's error body, `{"code": ..., "message": ...}`."""

    INVALID_REQUEST = "invalid_request"
    PARK_NOT_FOUND = "park_not_found"
    PAYOUT_NOT_FOUND = "payout_not_found"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    CURRENCY_MISMATCH = "currency_mismatch"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"


# The bulk endpoint takes at most this many parks per call, and the list of
# payouts (and of returns) gives at most this many per page.
MAX_SELECT_PARK_IDS: Final = 1000
MAX_LIST_LIMIT: Final = 1000

# Idempotency-Key (and a return's code): visible ASCII, 1 to 255 characters, the
# service's own Idempotency-Key rule.
KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")

# "Only these answers decide": per endpoint, the (status, code) pairs of Billing's own
# error body that are its final word. Anything else -- another status (408, 413,
# 401/403, a 3xx), a 404 or 400 without Billing's body, a gateway's HTML page, our key
# reused with another body (a person must look) -- is Undecided, and an order stays in
# flight. Status and code must agree: a proxy's 404 page that happens to be JSON with
# some "code" decides nothing.
DECISIVE: Final[dict[str, frozenset[tuple[int, str]]]] = {
    "payout": frozenset(
        {
            (409, BillingCode.INSUFFICIENT_FUNDS),
            (422, BillingCode.CURRENCY_MISMATCH),
            (404, BillingCode.PARK_NOT_FOUND),
            (400, BillingCode.INVALID_REQUEST),
        }
    ),
    "balance": frozenset({(404, BillingCode.PARK_NOT_FOUND), (400, BillingCode.INVALID_REQUEST)}),
    "balances_select": frozenset({(400, BillingCode.INVALID_REQUEST)}),
    # GET /v1/payouts/{K}: only Billing's own 404 means "no payout under K".
    "payout_status": frozenset({(404, BillingCode.PAYOUT_NOT_FOUND)}),
    "payouts_list": frozenset({(400, BillingCode.INVALID_REQUEST)}),
}
