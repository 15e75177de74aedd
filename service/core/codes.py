"""The API's error codes (SPEC section 3): the one list, as an enum.

The domain names its refusals with these (service/payouts/model.py's availability,
service/payouts/instant.py's Refused), the web edge maps each to its HTTP status
(service/web/errors.py's STATUS) and OpenAPI lists them per operation from it
(service/web/openapi.py). tests/unit/test_codes.py fails if a code is answered
anywhere in service/ that is not here, or one here is in none of those places.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """A stable error code: the `code` of the JSON error shape and a refusal's audit outcome."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INSTANT_PAYOUTS_DISABLED = "instant_payouts_disabled"
    PARK_ON_HOLD = "park_on_hold"
    SELF_APPROVAL_FORBIDDEN = "self_approval_forbidden"
    NOT_FOUND = "not_found"
    PARK_NOT_FOUND = "park_not_found"
    PAYOUT_NOT_FOUND = "payout_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    PAYOUT_IN_PROGRESS = "payout_in_progress"
    PAYOUT_NOT_CANCELLABLE = "payout_not_cancellable"
    PAYOUT_NOT_PENDING_APPROVAL = "payout_not_pending_approval"
    APPROVAL_PENDING = "approval_pending"
    AMOUNT_ABOVE_LIMIT = "amount_above_limit"
    AMOUNT_BELOW_MINIMUM = "amount_below_minimum"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    CURSOR_EXPIRED = "cursor_expired"
    COOLDOWN_ACTIVE = "cooldown_active"
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
