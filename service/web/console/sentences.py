"""The console's words: every refusal code of the API, and every state a page names,
as a sentence a support person reads. One vocabulary: the codes are the API's
(service/web/errors.py), so a refusal reads the same whichever edge met it.
"""

from __future__ import annotations

# A test checks that every code the API can answer has a sentence here.
REFUSALS: dict[str, str] = {
    "invalid_request": "The form was not filled in correctly.",
    "unauthorized": "Unknown user id or admin token.",
    "forbidden": "This action is not allowed.",
    "instant_payouts_disabled": "Instant payouts are switched off for this park.",
    "park_on_hold": "Payouts for this park are on hold.",
    "not_found": "There is no such page.",
    "park_not_found": "There is no park with this id.",
    "payout_not_found": "There is no payout with this id.",
    "method_not_allowed": "This page does not take that kind of request.",
    "payout_in_progress": "Another payout for this park is in flight.",
    "payout_not_cancellable": "A worker has already taken this payout: it can no longer be "
    "cancelled.",
    "amount_above_limit": "The amount is above the most one payout may move.",
    "amount_below_minimum": "The amount is below the least one payout may move.",
    "idempotency_key_reused": "This form was already sent with other values.",
    "cooldown_active": "An instant payout was made recently; the park must wait.",
    "request_timeout": "The request took too long to arrive; try again.",
    "uri_too_long": "The address is too long.",
    "headers_too_large": "The request's headers are too large.",
    "cursor_expired": "This page of the list is too old to read; start from the newest.",
    "internal_error": "Something went wrong on our side; quote the request id.",
    "unavailable": "The database is unavailable right now; try again in a few seconds.",
    # Manual payouts (SPEC section 8).
    "approval_pending": "A manual payout for this park is already waiting for approval.",
    "self_approval_forbidden": "You requested this payout: another admin must approve it.",
    "payout_not_pending_approval": "This payout is no longer waiting for approval.",
    # The console's own.
    "csrf": "This form has expired or did not come from the console; reload the page and "
    "try again.",
    "too_many_sign_ins": "Too many failed sign-ins from this address; wait a few minutes.",
    "manual_unavailable": "Manual payouts are not available in this version of the service.",
}

# Why the "Pay out now" button is off (GET /v1/payouts/instant/availability's reasons).
AVAILABILITY: dict[str | None, str] = {
    None: "Instant payouts are available.",
    "instant_payouts_disabled": REFUSALS["instant_payouts_disabled"],
    "park_on_hold": REFUSALS["park_on_hold"],
    "payout_in_progress": "A payout for this park is in flight.",
    "cooldown_active": "An instant payout was made recently",
}

# instant_payouts_disabled with details.reason "subscription_ended" (SPEC section 8).
SUBSCRIPTION_ENDED = "The park's paid option for instant payouts has ended."

# What a successful action says on the page it returns to (?done=...).
DONE: dict[str, str] = {
    "hold": "The park is now on hold.",
    "release": "The hold is released.",
    "switches": "The switches are saved.",
    "paid_option": "The fee and the end date are saved.",
    "cancel": "The payout is cancelled.",
    "approve": "The payout is approved and queued.",
    "deny": "The payout is denied.",
    "request": "The manual payout is requested; another admin must approve it.",
    "signed_out": "You are signed out.",
}


def refusal(code: str) -> str:
    return REFUSALS.get(code, f"Refused ({code}).")
