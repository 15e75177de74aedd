"""The Billing emulator honours SPEC section 4 over real HTTP, faults included."""

# House style puts the expected value first in asserts, which SIM300 calls a "Yoda condition".

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fleet_payouts_devkit.emulator import RateStats

from tests.helpers.emulator import run_emulator
from tests.helpers.procs import wait_for

DEADLINE_S = 5.0


@pytest.fixture
def client(emulator_url: str) -> Iterator[httpx.Client]:
    """A client of the session's emulator (reset before each test)."""
    with httpx.Client(base_url=emulator_url, timeout=5.0) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset(client: httpx.Client) -> None:
    client.post("/admin/reset").raise_for_status()


def set_balance(client: httpx.Client, park: str, available: str, currency: str = "RUB") -> None:
    r = client.put(f"/admin/balances/{park}", json={"available": available, "currency": currency})
    assert 200 == r.status_code, r.text


def available(client: httpx.Client, park: str) -> str:
    r = client.get(f"/admin/balances/{park}")
    assert 200 == r.status_code, r.text
    return str(r.json()["available"])


def pay(
    client: httpx.Client,
    key: str,
    park: str = "p1",
    amount: str = "100.00",
    currency: str = "RUB",
    params: dict[str, Any] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    body: dict[str, Any] = {"park_id": park, "amount": amount, "currency": currency}
    if params is not None:
        body["params"] = params
    return client.post("/v1/payouts", json=body, headers={"Idempotency-Key": key}, **kwargs)


def executed(client: httpx.Client) -> list[dict[str, Any]]:
    r = client.get("/admin/payouts")
    assert 200 == r.status_code
    payouts: list[dict[str, Any]] = r.json()["payouts"]
    return payouts


def set_faults(client: httpx.Client, **faults: float) -> None:
    r = client.put("/admin/faults", json=faults)
    assert 200 == r.status_code, r.text


# --- balances ------------------------------------------------------------------------------


def test_balance_read_and_unknown_park(client: httpx.Client) -> None:
    """GET /v1/balance returns a known park's balance with 2-decimal money and 404s others."""
    set_balance(client, "p1", "500", "KZT")

    r = client.get("/v1/balance", params={"park_id": "p1"})
    assert 200 == r.status_code
    assert {"park_id": "p1", "available": "500.00", "currency": "KZT"} == r.json()

    r = client.get("/v1/balance", params={"park_id": "nope"})
    assert 404 == r.status_code
    assert "park_not_found" == r.json()["code"]


def test_admin_balance_currency_defaults_to_rub_and_is_kept_on_update(
    client: httpx.Client,
) -> None:
    """A new balance defaults to RUB and an update without currency keeps the current one."""
    r = client.put("/admin/balances/p1", json={"available": "1.5"})
    assert {"park_id": "p1", "available": "1.50", "currency": "RUB"} == r.json()
    set_balance(client, "p2", "1.00", "USD")
    r = client.put("/admin/balances/p2", json={"available": "2.00"})
    assert "USD" == r.json()["currency"]
    assert 404 == client.get("/admin/balances/nope").status_code


def test_select_leaves_unknown_parks_out(client: httpx.Client) -> None:
    """POST /v1/balances/select returns only the parks Billing knows."""
    set_balance(client, "p1", "10.00")
    set_balance(client, "p2", "20.00")

    r = client.post("/v1/balances/select", json={"park_ids": ["p1", "ghost", "p2"]})
    assert 200 == r.status_code
    assert [
        {"park_id": "p1", "available": "10.00", "currency": "RUB"},
        {"park_id": "p2", "available": "20.00", "currency": "RUB"},
    ] == r.json()["balances"]


def test_select_accepts_1000_and_rejects_1001(client: httpx.Client) -> None:
    """POST /v1/balances/select takes at most 1,000 park ids per call."""
    ids = [f"p{i}" for i in range(1001)]
    assert 200 == client.post("/v1/balances/select", json={"park_ids": ids[:1000]}).status_code
    r = client.post("/v1/balances/select", json={"park_ids": ids})
    assert 400 == r.status_code
    assert "invalid_request" == r.json()["code"]


# --- payouts -------------------------------------------------------------------------------


def test_payout_moves_money_once_per_key(client: httpx.Client) -> None:
    """Replaying a key with the same body returns the same payout and moves no money again."""
    set_balance(client, "p1", "500.00")

    first = pay(client, "k1", amount="100.00", params={"contract": "c1"})
    assert 200 == first.status_code, first.text
    body = first.json()
    assert {"park_id": "p1", "amount": "100.00", "currency": "RUB", "status": "done"} == {
        k: body[k] for k in ("park_id", "amount", "currency", "status")
    }
    assert body["created_at"].endswith("Z")

    # Same body, amount spelled differently: still the same request.
    again = pay(client, "k1", amount="100", params={"contract": "c1"})
    assert 200 == again.status_code
    assert body == again.json()

    assert "400.00" == available(client, "p1")
    payouts = executed(client)
    assert 1 == len(payouts)
    assert ("k1", body["id"], {"contract": "c1"}) == (
        payouts[0]["idempotency_key"],
        payouts[0]["id"],
        payouts[0]["params"],
    )


def test_params_default_to_empty_object(client: httpx.Client) -> None:
    """Omitting params is the same request as sending an empty params object."""
    set_balance(client, "p1", "500.00")
    assert 200 == pay(client, "k1").status_code
    assert 200 == pay(client, "k1", params={}).status_code
    assert 1 == len(executed(client))


@pytest.mark.parametrize(
    "change",
    [{"amount": "99.99"}, {"park": "p2"}, {"params": {"x": 1}}, {"currency": "USD"}],
)
def test_same_key_different_body_is_refused(client: httpx.Client, change: dict[str, Any]) -> None:
    """A bound key reused with any different field gets 422 idempotency_key_reused."""
    set_balance(client, "p1", "500.00")
    set_balance(client, "p2", "500.00")
    assert 200 == pay(client, "k1").status_code

    r = pay(client, "k1", **change)
    assert 422 == r.status_code
    assert "idempotency_key_reused" == r.json()["code"]
    assert "400.00" == available(client, "p1")
    assert "500.00" == available(client, "p2")


def test_a_refusal_decides_the_key_for_good(client: httpx.Client) -> None:
    """A 409 moves nothing and is remembered: the same body gets it again, even once funded."""
    set_balance(client, "p1", "50.00")

    r = pay(client, "k1", amount="100.00")
    assert (409, "insufficient_funds") == (r.status_code, r.json()["code"])
    assert 404 == client.get("/v1/payouts/k1").status_code

    # A delayed copy of the refused order, after the park was topped up.
    set_balance(client, "p1", "500.00")
    r = pay(client, "k1", amount="100.00")
    assert (409, "insufficient_funds") == (r.status_code, r.json()["code"])
    assert "500.00" == available(client, "p1")
    assert [] == executed(client)


def test_a_refused_key_never_carries_another_body(client: httpx.Client) -> None:
    """Another body under a refused key is 422 idempotency_key_reused, and moves nothing."""
    set_balance(client, "p1", "50.00")
    assert 409 == pay(client, "k1", amount="100.00").status_code

    r = pay(client, "k1", amount="50.00")
    assert (422, "idempotency_key_reused") == (r.status_code, r.json()["code"])
    assert "50.00" == available(client, "p1")


def test_unknown_park_and_currency_mismatch(client: httpx.Client) -> None:
    """Unknown parks get 404 park_not_found and a foreign currency gets 422 currency_mismatch."""
    set_balance(client, "p1", "500.00", "RUB")

    r = pay(client, "k1", park="ghost")
    assert (404, "park_not_found") == (r.status_code, r.json()["code"])
    r = pay(client, "k2", currency="USD")
    assert (422, "currency_mismatch") == (r.status_code, r.json()["code"])
    assert [] == executed(client)


def test_an_overdrawn_balance_can_be_set(client: httpx.Client) -> None:
    """PUT /admin/balances takes a negative balance (an overdrawn park) and reports it as is."""
    set_balance(client, "p1", "-25.50")
    assert "-25.50" == available(client, "p1")


def test_get_payout_by_key(client: httpx.Client) -> None:
    """GET /v1/payouts/{K} returns the payout made with key K, else 404 payout_not_found."""
    set_balance(client, "p1", "500.00")
    made = pay(client, "k1").json()

    r = client.get("/v1/payouts/k1")
    assert 200 == r.status_code
    assert made == r.json()

    r = client.get("/v1/payouts/k2")
    assert 404 == r.status_code
    assert "payout_not_found" == r.json()["code"]


def test_missing_idempotency_key_is_refused(client: httpx.Client) -> None:
    """POST /v1/payouts without Idempotency-Key is a 400 and moves nothing."""
    set_balance(client, "p1", "500.00")
    body = {"park_id": "p1", "amount": "1.00", "currency": "RUB"}
    r = client.post("/v1/payouts", json=body)
    assert (400, "invalid_request") == (r.status_code, r.json()["code"])
    assert [] == executed(client)


def test_concurrent_orders_never_overdraw_or_duplicate(client: httpx.Client) -> None:
    """Concurrent orders are applied atomically: no overdraft, one payout per key."""
    set_balance(client, "p1", "100.00")

    def order(key: str) -> int:
        with httpx.Client(base_url=str(client.base_url), timeout=5.0) as c:
            return pay(c, key, amount="10.00").status_code

    keys = [f"k{i}" for i in range(15)] + ["same"] * 10
    with ThreadPoolExecutor(max_workers=25) as pool:
        codes = list(pool.map(order, keys))

    assert "0.00" == available(client, "p1")
    payouts = executed(client)
    assert 10 == len(payouts)
    assert len(payouts) == len({p["idempotency_key"] for p in payouts})
    assert {200, 409} >= set(codes)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/payouts"),
        ("POST", "/v1/balances/select"),
        ("PUT", "/admin/balances/p1"),
        ("PUT", "/admin/faults"),
    ],
)
@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b"[" * 100_000])
def test_malformed_json_is_400(
    client: httpx.Client, method: str, path: str, content: bytes
) -> None:
    """Bodies that are not a JSON object get 400 invalid_request, never a 500."""
    r = client.request(method, path, content=content, headers={"Idempotency-Key": "k1"})
    assert 400 == r.status_code
    assert "invalid_request" == r.json()["code"]


@pytest.mark.parametrize(
    "amount", ["0", "0.00", "-1.00", "1.234", "1e3", "NaN", "12.", ".5", "١٢", 100, None]
)
def test_bad_amount_is_400(client: httpx.Client, amount: Any) -> None:
    """The amount must be a positive decimal string with at most 2 fractional digits."""
    set_balance(client, "p1", "500.00")
    body = {"park_id": "p1", "amount": amount, "currency": "RUB"}
    r = client.post("/v1/payouts", json=body, headers={"Idempotency-Key": "k1"})
    assert (400, "invalid_request") == (r.status_code, r.json()["code"])
    assert [] == executed(client)


@pytest.mark.parametrize(
    "faults", [{"error_rate": 1.5}, {"timeout_rate": -0.1}, {"latency_ms": "5"}, {"bogus": 1}]
)
def test_bad_faults_are_400_and_change_nothing(client: httpx.Client, faults: Any) -> None:
    """Out-of-range or unknown fault settings are refused without a partial update."""
    r = client.put("/admin/faults", json={"latency_ms": 5, **faults})
    assert 400 == r.status_code
    assert 0 == client.get("/admin/faults").json()["latency_ms"]


# --- faults --------------------------------------------------------------------------------


def test_error_rate_answers_503_and_does_nothing(client: httpx.Client) -> None:
    """With error_rate=1 every contract call is a 503 unavailable and no money moves."""
    set_balance(client, "p1", "500.00")
    set_faults(client, error_rate=1.0)

    r = pay(client, "k1")
    assert (503, "unavailable") == (r.status_code, r.json()["code"])
    assert 503 == client.get("/v1/balance", params={"park_id": "p1"}).status_code
    assert [] == executed(client)
    assert "500.00" == available(client, "p1")


def test_apply_then_fail_executes_then_answers_500(client: httpx.Client) -> None:
    """apply_then_fail moves the money, answers 500, and a same-key retry replays it with 200."""
    set_balance(client, "p1", "500.00")
    set_faults(client, apply_then_fail_rate=1.0)

    r = pay(client, "k1")
    assert (500, "internal_error") == (r.status_code, r.json()["code"])
    payouts = executed(client)
    assert 1 == len(payouts)

    retry = pay(client, "k1")
    assert 200 == retry.status_code
    assert payouts[0]["id"] == retry.json()["id"]
    assert 1 == len(executed(client))
    assert "400.00" == available(client, "p1")


def test_timeout_still_applies_the_payout_later(client: httpx.Client) -> None:
    """A timed-out call is still handled after the hang: the outcome is unknown, not failed."""
    set_balance(client, "p1", "500.00")
    set_faults(client, timeout_rate=1.0, timeout_hang_ms=300)

    with pytest.raises(httpx.TimeoutException):
        pay(client, "k1", timeout=0.1)

    wait_for(lambda: len(executed(client)) == 1, timeout=DEADLINE_S, interval=0.02)
    assert "k1" == executed(client)[0]["idempotency_key"]
    assert "400.00" == available(client, "p1")


def test_throttle_rate_answers_429_with_retry_after(client: httpx.Client) -> None:
    """With throttle_rate=1 contract calls get 429 with Retry-After and nothing happens."""
    set_balance(client, "p1", "500.00")
    set_faults(client, throttle_rate=1.0)

    r = pay(client, "k1")
    assert 429 == r.status_code
    assert "1" == r.headers["Retry-After"]
    assert [] == executed(client)


def test_throttle_sends_the_configured_retry_after(client: httpx.Client) -> None:
    """retry_after_s sets the Retry-After header of the injected 429s."""
    set_faults(client, throttle_rate=1.0, retry_after_s=3)

    r = client.get("/v1/balance", params={"park_id": "p1"})
    assert (429, "3") == (r.status_code, r.headers["Retry-After"])


def test_latency_delays_contract_requests_only(client: httpx.Client) -> None:
    """latency_ms delays every contract request by at least that long, admin ones not at all."""
    set_balance(client, "p1", "500.00")
    set_faults(client, latency_ms=250)

    started = time.monotonic()
    assert 200 == client.get("/v1/balance", params={"park_id": "p1"}).status_code
    assert 0.25 <= time.monotonic() - started

    started = time.monotonic()
    client.get("/admin/stats")
    assert time.monotonic() - started < 0.25


def test_faults_do_not_touch_admin_and_reset_clears_them(client: httpx.Client) -> None:
    """Admin endpoints ignore faults, and /admin/reset restores the defaults."""
    set_faults(client, error_rate=1.0)
    assert 200 == client.get("/admin/payouts").status_code
    assert 1.0 == client.get("/admin/faults").json()["error_rate"]

    client.post("/admin/reset").raise_for_status()
    assert {
        "error_rate": 0.0,
        "throttle_rate": 0.0,
        "timeout_rate": 0.0,
        "apply_then_fail_rate": 0.0,
        "latency_ms": 0,
        "timeout_hang_ms": 10000,
        "retry_after_s": 1,
    } == client.get("/admin/faults").json()


# --- stats ---------------------------------------------------------------------------------


def test_stats_count_contract_requests_and_burst(client: httpx.Client) -> None:
    """Stats count only /v1 requests, whatever their outcome, and see a burst's peak rate."""
    for _ in range(20):
        client.get("/v1/balance", params={"park_id": "ghost"})  # 404s count too
        client.get("/admin/payouts")  # admin requests do not

    assert {"requests": 20, "max_rps_1s": 20} == client.get("/admin/stats").json()

    client.post("/admin/reset").raise_for_status()
    assert {"requests": 0, "max_rps_1s": 0} == client.get("/admin/stats").json()


def test_rate_stats_sliding_window() -> None:
    """max_rps_1s is the peak count inside any one-second window, not per calendar second."""
    stats = RateStats()
    # 3 arrivals in [0.6, 1.4) straddle a second boundary; 0.0 and 2.5 are alone.
    for t in (0.0, 0.6, 0.9, 1.3, 2.5):
        stats.record(t)
    assert (5, 3) == (stats.requests, stats.max_rps_1s)
    # An arrival exactly one second after another is in a new window.
    stats.record(3.5)
    assert 3 == stats.max_rps_1s


def test_request_log_lists_contract_arrivals_with_their_status(client: httpx.Client) -> None:
    """/admin/requests lists each contract request in arrival order with its answer's status."""
    set_balance(client, "p1", "1.00")
    client.get("/v1/balance", params={"park_id": "p1"})
    client.get("/admin/stats")  # admin requests are not logged
    client.get("/v1/balance", params={"park_id": "ghost"})

    logged = client.get("/admin/requests").json()["requests"]
    assert [("GET", "/v1/balance", 200), ("GET", "/v1/balance", 404)] == [
        (r["method"], r["path"], r["status"]) for r in logged
    ]
    assert logged[0]["at"] <= logged[1]["at"]


# --- reconciliation: the list of payouts made and the drift ------------------------------


def made(client: httpx.Client, **params: Any) -> httpx.Response:
    return client.get("/v1/payouts", params=params)


def test_list_pages_through_payouts_made_in_the_window(client: httpx.Client) -> None:
    """GET /v1/payouts lists every payout made in [since, until), oldest first, with its key,
    page by page without loss or repetition.
    """
    set_balance(client, "p1", "500.00")
    created = [pay(client, f"k{i}", amount="1.00").json()["created_at"] for i in range(5)]

    keys: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        body = made(client, **params).json()
        keys += [p["idempotency_key"] for p in body["payouts"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert ([f"k{i}" for i in range(5)], 3) == (keys, pages)
    window = made(client, since=created[1], until=created[4]).json()
    assert (["k1", "k2", "k3"], None) == (
        [p["idempotency_key"] for p in window["payouts"]],
        window["next_cursor"],
    )


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": "ten"},
        {"since": "yesterday"},
        {"since": "2024-05-01T00:00:00"},  # no time zone
        {"cursor": "not-ours"},
    ],
)
def test_list_refuses_bad_parameters(client: httpx.Client, params: dict[str, Any]) -> None:
    """A bad limit, timestamp or cursor is a 400 invalid_request."""
    r = made(client, **params)
    assert (400, "invalid_request") == (r.status_code, r.json()["code"])


def test_payout_made_outside_is_listed_and_leaves_balances(client: httpx.Client) -> None:
    """POST /admin/payouts records a payout Billing made by another road: listed and found by
    its key, no balance touched; its key cannot be used twice.
    """
    set_balance(client, "p1", "50.00")
    body = {"park_id": "p1", "amount": "70.00", "currency": "RUB", "idempotency_key": "ext-1"}

    r = client.post("/admin/payouts", json=body)
    assert 201 == r.status_code, r.text
    assert ["ext-1"] == [p["idempotency_key"] for p in made(client).json()["payouts"]]
    assert "70.00" == client.get("/v1/payouts/ext-1").json()["amount"]
    assert "50.00" == available(client, "p1")
    assert 409 == client.post("/admin/payouts", json=body).status_code


def test_forgotten_payout_is_gone_from_billing(client: httpx.Client) -> None:
    """DELETE /admin/payouts/{K} makes Billing forget that payout: not listed, 404 by key."""
    set_balance(client, "p1", "50.00")
    pay(client, "k1", amount="10.00")
    pay(client, "k2", amount="10.00")

    assert "k1" == client.delete("/admin/payouts/k1").json()["idempotency_key"]
    assert 404 == client.get("/v1/payouts/k1").status_code
    assert ["k2"] == [p["idempotency_key"] for p in made(client).json()["payouts"]]
    assert 404 == client.delete("/admin/payouts/k1").status_code


# --- auth ----------------------------------------------------------------------------------


def test_bearer_token_is_enforced_when_configured() -> None:
    """With BILLING_TOKEN set, contract calls need the bearer token; admin calls do not."""
    with (
        run_emulator(env={"BILLING_TOKEN": "s3cret"}) as url,
        httpx.Client(base_url=url, timeout=5.0) as c,
    ):
        set_balance(c, "p1", "500.00")  # admin: no token needed
        query = {"park_id": "p1"}

        for authorization in (
            None,
            b"Bearer wrong",
            b"Basic s3cret",
            b"Bearer s3cret-but-longer",
            "Bearer sécret".encode("latin-1"),  # not ASCII: must be a 401, not a 500
        ):
            headers = [] if authorization is None else [(b"Authorization", authorization)]
            r = c.get("/v1/balance", params=query, headers=headers)
            assert (401, "unauthorized") == (r.status_code, r.json()["code"]), headers

        r = c.get("/v1/balance", params=query, headers={"Authorization": "Bearer s3cret"})
        assert 200 == r.status_code
        assert 6 == c.get("/admin/stats").json()["requests"]


def test_no_token_configured_means_no_auth(client: httpx.Client) -> None:
    """Without BILLING_TOKEN the emulator accepts contract calls with or without a token."""
    set_balance(client, "p1", "1.00")
    r = client.get("/v1/balance", params={"park_id": "p1"}, headers={"Authorization": "Bearer x"})
    assert 200 == r.status_code
