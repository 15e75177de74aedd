"""Issue 15, break 1, against real API and worker processes: an intermediary's answer to a
resent order is not Billing's, so the payout stays in flight until Billing itself answers.

The Billing emulator sits behind the programmable proxy (tests/helpers/proxy.py): it holds
the first copy of an order past the client's timeout and answers the resends itself, as a
gateway would, until that first copy has landed at Billing. Each test ends with the books:
per park, Billing's transfers are exactly our succeeded payouts.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers.api import (
    assert_books_agree,
    assert_error,
    press,
    press_headers,
    register,
    set_balance,
    transfers,
    wait_final,
)
from tests.helpers.procs import Cluster
from tests.helpers.proxy import BillingProxy, Canned

pytestmark = pytest.mark.e2e

Pg = psycopg.Connection[dict[str, Any]]
GATEWAY_ANSWERS = {
    "408": Canned(408, b"Request Timeout"),
    "502 HTML": Canned(
        502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
    ),
    "bare 404": Canned(404, b"Not Found"),
    "302": Canned(302, headers={"Location": "https://login.example/"}),
    "200 junk": Canned(200, b'{"ok": true}', content_type="application/json"),
}


@pytest.mark.parametrize("answer", GATEWAY_ANSWERS.values(), ids=GATEWAY_ANSWERS.keys())
def test_a_resend_answered_by_a_gateway_while_the_first_copy_is_late_pays_once(
    system: Cluster, proxy: BillingProxy, billing_url: str, pg: Pg, answer: Canned
) -> None:
    """First copy held past our timeout, resends answered by the "proxy", then the first copy
    lands at Billing: the payout ends succeeded (not failed http_408), a second press is
    refused by the cooldown, and Billing's one transfer is our one succeeded payout."""
    api = system.api()
    system.worker()
    park = "story-" + uuid.uuid4().hex[:8]
    register(api, park)
    set_balance(billing_url, park, "100.00")
    proxy.hold = {0: 3.0}
    proxy.answer_order = lambda n: answer if n >= 1 and not proxy.landed.is_set() else None

    payout = press(api, park)
    final = wait_final(api, park, payout["id"])

    assert ("succeeded", None, "100.00") == (
        final["status"],
        final.get("failure_code"),
        final["amount"],
    )
    assert proxy.landed.wait(timeout=15), "the held first copy never landed"
    assert len(proxy.orders) >= 3, "the gateway never answered a resend"
    assert [payout["id"]] == sorted({o.key for o in proxy.orders})
    again = httpx.post(
        f"{api}/v1/payouts/instant",
        json={},
        headers=press_headers(park, key="second-press"),
        timeout=10,
    )
    assert_error(again, 429, "cooldown_active")
    assert [payout["id"]] == [t["idempotency_key"] for t in transfers(billing_url)]
    assert_books_agree(pg, billing_url, park)
