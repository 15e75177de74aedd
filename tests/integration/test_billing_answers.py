"""SPEC section 4, "Only these answers decide an order": each answer an intermediary can
invent, driven through a proxy in front of the emulator over HTTP, against the payout job
(in-process, real database), `find_payout` and reconciliation.

An ordered payout ends only on Billing's payout object or Billing's own refusal; anything
else leaves it in flight and the same order is sent again, so Billing's books and ours agree.
"""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from service.billing.client import Undecided
from service.core import db
from service.ops import reconcile
from service.payouts.execution import Deps, RetryLater, execute_payout
from service.payouts.model import Status
from tests.helpers.proxy import BillingProxy, Canned

PARK = "answers-park"


def _json(status: int, body: Any) -> Canned:
    return Canned(status, json.dumps(body).encode(), "application/json")


def _html(status: int, title: str) -> Canned:
    page = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
    return Canned(status, page.encode(), "text/html")


# Answers that say nothing about an order (SPEC section 4), each as a proxy or gateway
# would send it. Where it matters most, the order did reach Billing first: the money
# moved, and all the client hears is this.
NOT_BILLINGS: dict[str, Canned] = {
    "408 from a proxy": Canned(408, b"Request Timeout"),
    "413 HTML page": _html(413, "413 Request Entity Too Large"),
    "404 without Billing's body": _html(404, "404 Not Found"),
    "404 empty": Canned(404),
    "400 without Billing's body": Canned(400, b"Bad Request"),
    "400 JSON that is not Billing's": _json(400, {"error": "bad header"}),
    "404 JSON with an order code under the wrong status": _json(
        404, {"code": "insufficient_funds"}
    ),
    "409 with a code Billing does not decide with": _json(409, {"code": "conflict"}),
    "422 our key with another body": _json(422, {"code": "idempotency_key_reused"}),
    "401 our token": _json(401, {"code": "unauthorized"}),
    "403 a WAF": _html(403, "403 Forbidden"),
    "502 HTML from a gateway": _html(502, "502 Bad Gateway"),
    "302 redirect": Canned(302, b"", headers={"Location": "https://login.example/"}),
    "302 redirect with JSON": _json(302, {"park_id": PARK, "available": "1.00"}),
    "200 HTML": _html(200, "Welcome to nginx!"),
    "200 JSON that is no payout": _json(200, {"ok": True}),
    "200 another park's payout": _json(
        200,
        {
            "id": "po-cached",
            "park_id": "someone-else",
            "amount": "70.00",
            "currency": "RUB",
            "status": "done",
            "created_at": "2026-01-01T00:00:00Z",
        },
    ),
}


def emulator(billing_url: str, method: str, path: str, body: Any = None) -> Any:
    r = httpx.request(method, f"{billing_url}{path}", json=body)
    r.raise_for_status()
    return r.json()


def transfers(billing_url: str) -> list[str]:
    """Keys of every payout Billing made."""
    return [p["idempotency_key"] for p in emulator(billing_url, "GET", "/admin/payouts")["payouts"]]


async def new_payout(conn: db.Conn, *, snapshot: str | None) -> uuid.UUID:
    """A pending periodic payout of PARK, with the scan's balance snapshot if given."""
    await conn.execute("INSERT INTO parks (park_id) VALUES (%s) ON CONFLICT DO NOTHING", (PARK,))
    payout_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount, available, currency) "
        "VALUES (%s, %s, 'periodic', 1000, %s, %s)",
        (payout_id, PARK, snapshot, "RUB" if snapshot else None),
    )
    return payout_id


async def row(conn: db.Conn, payout_id: uuid.UUID) -> dict[str, Any]:
    found = await db.fetch_one(conn, "SELECT * FROM payouts WHERE id = %(id)s", id=payout_id)
    assert found is not None
    return found


@pytest.mark.parametrize("answer", NOT_BILLINGS.values(), ids=NOT_BILLINGS.keys())
async def test_an_order_answered_by_anyone_but_billing_stays_in_flight_and_is_paid_once(
    via_proxy: Deps, proxy: BillingProxy, conn: db.Conn, billing_url: str, answer: Canned
) -> None:
    """An order that reached Billing but whose answer came from someone else leaves the payout
    processing with its order; the same order sent again ends it succeeded, one transfer."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "70.00"})
    payout_id = await new_payout(conn, snapshot="70.00")
    proxy.answer_order = lambda n: Canned(**{**vars(answer), "forward": True}) if n == 0 else None

    with pytest.raises(RetryLater):
        await execute_payout(via_proxy, payout_id)
    waiting = await row(conn, payout_id)
    assert ("processing", None, Decimal("70.00")) == (
        waiting["status"],
        waiting["failure_code"],
        waiting["amount"],
    )

    assert Status.SUCCEEDED == await execute_payout(via_proxy, payout_id)
    assert [str(payout_id)] == transfers(billing_url)
    assert [str(payout_id)] * 2 == [o.key for o in proxy.orders]


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (
            _json(409, {"code": "insufficient_funds", "message": "available 1.00"}),
            "insufficient_funds",
        ),
        (_json(422, {"code": "currency_mismatch"}), "currency_mismatch"),
        (_json(404, {"code": "park_not_found", "message": "unknown park"}), "park_not_found"),
        (_json(400, {"code": "invalid_request", "message": "bad amount"}), "invalid_request"),
    ],
    ids=["insufficient_funds", "currency_mismatch", "park_not_found", "invalid_request"],
)
async def test_billings_own_refusal_ends_the_order(
    via_proxy: Deps, proxy: BillingProxy, conn: db.Conn, billing_url: str, answer: Canned, code: str
) -> None:
    """Billing's error body with one of its order codes, under its status, ends the payout
    failed with that code, and the order is not sent again."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "70.00"})
    payout_id = await new_payout(conn, snapshot="70.00")
    proxy.answer_order = lambda n: answer

    assert Status.FAILED == await execute_payout(via_proxy, payout_id)
    assert code == (await row(conn, payout_id))["failure_code"]
    assert Status.FAILED == await execute_payout(via_proxy, payout_id)
    assert 1 == len(proxy.orders)


@pytest.mark.parametrize(
    "answer",
    [a for name, a in NOT_BILLINGS.items() if "our key" not in name],
    ids=[name for name in NOT_BILLINGS if "our key" not in name],
)
async def test_a_balance_read_answered_by_anyone_but_billing_is_asked_again(
    via_proxy: Deps, proxy: BillingProxy, conn: db.Conn, billing_url: str, answer: Canned
) -> None:
    """A balance read answered by an intermediary neither fails the payout nor orders anything;
    the next run reads the balance again and pays."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "25.00"})
    payout_id = await new_payout(conn, snapshot=None)
    proxy.answer_path = {"/v1/balance": [answer]}

    try:
        first = await execute_payout(via_proxy, payout_id)
    except RetryLater:
        first = None
    # A 200 balance that is junk is Billing's malformed data (the balance read's own rule,
    # before any order): that one payout fails invalid_balance, no money moves.
    if first is not None:
        assert (Status.FAILED, "invalid_balance") == (
            first,
            (await row(conn, payout_id))["failure_code"],
        )
        assert [] == transfers(billing_url)
        return
    waiting = await row(conn, payout_id)
    assert ("processing", None, None) == (
        waiting["status"],
        waiting["failure_code"],
        waiting["ordered_at"],
    )
    assert Status.SUCCEEDED == await execute_payout(via_proxy, payout_id)
    assert [str(payout_id)] == transfers(billing_url)


async def test_only_billings_own_404_means_no_payout_under_a_key(
    via_proxy: Deps, proxy: BillingProxy
) -> None:
    """GET /v1/payouts/{K}: a 404 page from a gateway is Undecided; Billing's 404 is None."""
    key = str(uuid.uuid4())
    proxy.answer_path = {f"/v1/payouts/{key}": [NOT_BILLINGS["404 without Billing's body"]]}

    with pytest.raises(Undecided):
        await via_proxy.billing.find_payout(key)
    assert None is await via_proxy.billing.find_payout(key)


async def test_reconciliation_does_not_take_a_gateways_404_for_a_missing_payout(
    deps: Deps, via_proxy: Deps, proxy: BillingProxy, conn: db.Conn, billing_url: str
) -> None:
    """A succeeded payout that Billing's list leaves out is looked up by key; a bare 404 on
    that lookup is asked again, not reported missing_at_billing."""
    emulator(billing_url, "PUT", f"/admin/balances/{PARK}", {"available": "15.00"})
    payout_id = await new_payout(conn, snapshot=None)
    assert Status.SUCCEEDED == await execute_payout(deps, payout_id)
    key = str(payout_id)

    def hide(path: str, answer: Any) -> Any:
        if path == "/v1/payouts":
            answer["payouts"] = [p for p in answer["payouts"] if p["idempotency_key"] != key]
        return answer

    proxy.rewrite = hide
    proxy.answer_path = {f"/v1/payouts/{key}": [Canned(404)]}
    window = await db.fetch_one(conn, reconcile.Q["daily_window"], days=1)
    assert window is not None
    found: list[reconcile.Mismatch] = []

    summary = await reconcile.reconcile(
        conn, via_proxy.billing, window["since"], window["until"], found.append
    )

    assert [] == found
    assert (0, 1) == (summary.mismatches, summary.looked_up)
    assert 2 == proxy.seen.count(f"/v1/payouts/{key}")
