"""POST /v1/payouts/instant against SPEC section 3, through the real app and database."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from tests.conftest import API_TOKEN
from tests.helpers.api import ADMIN, app_client, finish, parse_ts, press_headers, register
from tests.helpers.api import assert_error as assert_error_envelope
from tests.helpers.procs import wait_for

PAYOUT_FIELDS = {
    "id",
    "park_id",
    "kind",
    "status",
    "requested_amount",
    "amount",
    "currency",
    "billing_payout_id",
    "failure_code",
    "failure_message",
    "requested_by",
    "created_at",
    "updated_at",
    "completed_at",
    "fee_amount",
    "net_amount",
    "return_code",
    "returned_at",
    "approval",
}
ACTION = "payout.instant.request"
MAX_BODY = 16 * 1024


# --- helpers -----------------------------------------------------------------------


def press(
    client: TestClient, park: str = "p1", key: str = "k1", body: Any = None, **extra: str
) -> httpx.Response:
    headers = press_headers(park=park, key=key, **extra)
    r: httpx.Response
    if isinstance(body, bytes):
        r = client.post("/v1/payouts/instant", content=body, headers=headers)
    else:
        r = client.post("/v1/payouts/instant", json=body, headers=headers)
    return r


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body = assert_error_envelope(r, status, code)
    assert isinstance(body["message"], str)
    assert isinstance(body["details"], dict)
    return body


def payout_ids(sql: psycopg.Connection[DictRow], park: str | None = None) -> list[str]:
    rows = sql.execute(
        "SELECT id FROM payouts WHERE %(park)s::text IS NULL OR park_id = %(park)s ORDER BY id",
        {"park": park},
    ).fetchall()
    return [str(r["id"]) for r in rows]


def press_outcomes(sql: psycopg.Connection[DictRow], park: str) -> list[str]:
    rows = sql.execute(
        "SELECT outcome FROM audit_log WHERE park_id = %s AND action = %s ORDER BY at, id",
        (park, ACTION),
    ).fetchall()
    return [r["outcome"] for r in rows]


# --- accepted presses ------------------------------------------------------------------


def test_accepted_press_returns_the_whole_payout_object(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """An accepted press answers 202 with every field of SPEC's payout object, as stored."""
    register(client)
    r = press(client, body={"amount": "10.50"})
    assert 202 == r.status_code, r.text
    body = r.json()
    assert PAYOUT_FIELDS == set(body)
    assert [body["id"]] == payout_ids(sql)
    assert body["id"] == str(uuid.UUID(body["id"]))
    expected = {
        "park_id": "p1",
        "kind": "instant",
        "status": "pending",
        "requested_amount": "10.50",
        "amount": None,
        "currency": None,
        "billing_payout_id": None,
        "failure_code": None,
        "failure_message": None,
        "requested_by": "u1",
        "completed_at": None,
    }
    assert expected == {k: body[k] for k in expected}
    created = parse_ts(body["created_at"])
    parse_ts(body["updated_at"])
    assert timedelta(minutes=1) > abs(datetime.now(UTC) - created)


def test_press_without_amount_requests_everything(client: TestClient) -> None:
    """A press with an empty body is accepted with no requested amount (pay all available)."""
    register(client)
    r = press(client, body=b"")
    assert 202 == r.status_code, r.text
    assert r.json()["requested_amount"] is None


def test_amount_equal_to_the_limit_is_accepted(db_url: str) -> None:
    """An amount of exactly PAYOUT_MAX_AMOUNT is within the limit."""
    with app_client(db_url, payout_max_amount=Decimal("500.00")) as client:
        register(client)
        r = press(client, body={"amount": "500.00"})
    assert 202 == r.status_code, r.text
    assert "500.00" == r.json()["requested_amount"]


def test_body_of_exactly_16_kib_is_accepted(client: TestClient) -> None:
    """A body of exactly 16 KiB is not "over 16 KiB" and is accepted."""
    register(client)
    raw = b'{"amount": "10.00"}'
    r = press(client, body=raw + b" " * (MAX_BODY - len(raw)))
    assert 202 == r.status_code, r.text


def test_longest_park_id_and_key_are_accepted(client: TestClient) -> None:
    """A 64-character park id and a 128-character Idempotency-Key are valid."""
    park = "P_-9" * 16
    key = "!~" * 64
    register(client, park)
    r = press(client, park=park, key=key)
    assert 202 == r.status_code, r.text
    assert park == r.json()["park_id"]


# --- idempotency ---------------------------------------------------------------------


def test_replay_with_same_key_and_body_returns_the_same_payout(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """The same key and body again answers the same payout and creates no second row."""
    register(client)
    first = press(client, body={"amount": "10.00"})
    assert 202 == first.status_code, first.text
    again = press(client, body={"amount": "10.00"})
    assert again.status_code in (200, 202), again.text
    assert first.json() == again.json()
    assert [first.json()["id"]] == payout_ids(sql)


def test_replay_after_the_payout_finished_returns_its_current_state(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A replay after success answers the payout as it is now, not a cooldown refusal."""
    register(client)
    first = press(client, body={"amount": "10.00"})
    assert 202 == first.status_code, first.text
    finish(sql, first.json()["id"], "succeeded")
    again = press(client, body={"amount": "10.00"})
    assert again.status_code in (200, 202), again.text
    assert (first.json()["id"], "succeeded", "10.00", "RUB", "bp-1") == (
        again.json()["id"],
        again.json()["status"],
        again.json()["amount"],
        again.json()["currency"],
        again.json()["billing_payout_id"],
    )
    assert [first.json()["id"]] == payout_ids(sql)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"amount": "10.00"}, {"amount": "20.00"}),
        (None, {"amount": "10.00"}),
        ({"amount": "10.00"}, {}),
    ],
    ids=["other-amount", "amount-added", "amount-dropped"],
)
def test_same_key_with_another_body_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow], first: Any, second: Any
) -> None:
    """Reusing an Idempotency-Key with a different body is 422 idempotency_key_reused."""
    register(client)
    r = press(client, body=first)
    assert 202 == r.status_code, r.text
    assert_error(press(client, body=second), 422, "idempotency_key_reused")
    assert [r.json()["id"]] == payout_ids(sql)
    assert ["ok", "idempotency_key_reused"] == press_outcomes(sql, "p1")


@pytest.mark.parametrize(
    ("first", "second"), [(b"", {}), ({}, b"")], ids=["empty-then-{}", "{}-then-empty"]
)
def test_empty_body_and_empty_object_are_the_same_body(
    client: TestClient, sql: psycopg.Connection[DictRow], first: Any, second: Any
) -> None:
    """An empty body and `{}` are one and the same request for idempotency."""
    register(client)
    r1 = press(client, body=first)
    assert 202 == r1.status_code, r1.text
    r2 = press(client, body=second)
    assert r2.status_code in (200, 202), r2.text
    assert r1.json()["id"] == r2.json()["id"]
    assert [r1.json()["id"]] == payout_ids(sql)


# --- rule refusals ---------------------------------------------------------------------


def test_unregistered_park_is_refused(client: TestClient, sql: psycopg.Connection[DictRow]) -> None:
    """A press for a park that was never registered is 404 park_not_found, audited."""
    assert_error(press(client, park="ghost"), 404, "park_not_found")
    assert [] == payout_ids(sql)
    assert ["park_not_found"] == press_outcomes(sql, "ghost")


def test_disabled_park_is_refused(client: TestClient, sql: psycopg.Connection[DictRow]) -> None:
    """A press for a park with instant payouts off is 403 instant_payouts_disabled, audited."""
    register(client, instant=False)
    assert_error(press(client), 403, "instant_payouts_disabled")
    assert [] == payout_ids(sql)
    assert ["instant_payouts_disabled"] == press_outcomes(sql, "p1")


@pytest.mark.parametrize("in_flight", ["pending", "processing"])
def test_press_while_a_payout_is_in_flight_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow], in_flight: str
) -> None:
    """A new press while the park's payout is pending or processing is 409 payout_in_progress."""
    register(client)
    first = press(client, key="k1")
    assert 202 == first.status_code, first.text
    if in_flight == "processing":
        sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (first.json()["id"],))
    assert_error(press(client, key="k2"), 409, "payout_in_progress")
    assert [first.json()["id"]] == payout_ids(sql)
    assert ["ok", "payout_in_progress"] == press_outcomes(sql, "p1")


def test_press_within_cooldown_after_success_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """Within K of a succeeded instant payout a press is 429, Retry-After, next_available_at."""
    register(client)
    first = press(client, key="k1", body={"amount": "10.00"})
    assert 202 == first.status_code, first.text
    finish(sql, first.json()["id"], "succeeded")
    r = press(client, key="k2")
    body = assert_error(r, 429, "cooldown_active")
    created = sql.execute(
        "SELECT created_at FROM payouts WHERE id = %s", (first.json()["id"],)
    ).fetchone()
    assert created is not None
    next_at = created["created_at"] + timedelta(hours=24)
    assert next_at == parse_ts(body["details"]["next_available_at"])
    assert re.fullmatch(r"[1-9][0-9]*", r.headers["Retry-After"]), r.headers["Retry-After"]
    wait = (next_at - datetime.now(UTC)).total_seconds()
    assert wait - 60 <= int(r.headers["Retry-After"]) <= wait + 60
    assert [first.json()["id"]] == payout_ids(sql)
    assert ["ok", "cooldown_active"] == press_outcomes(sql, "p1")


@pytest.mark.parametrize("final", ["failed", "skipped"])
def test_failed_or_skipped_payout_starts_no_cooldown(
    client: TestClient, sql: psycopg.Connection[DictRow], final: str
) -> None:
    """A payout that ended failed or skipped does not hold the park in cooldown."""
    register(client)
    first = press(client, key="k1")
    assert 202 == first.status_code, first.text
    finish(sql, first.json()["id"], final)
    second = press(client, key="k2")
    assert 202 == second.status_code, second.text
    assert 2 == len(payout_ids(sql))


def test_press_is_accepted_again_once_cooldown_ends(
    db_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """Once K has passed since the last counted instant payout, a press is accepted again."""
    headers = press_headers()
    with app_client(db_url, instant_cooldown=timedelta(seconds=1)) as client:
        register(client)
        first = press(client, key="k1")
        assert 202 == first.status_code, first.text
        finish(sql, first.json()["id"], "succeeded")
        wait_for(
            lambda: client.get("/v1/payouts/instant/availability", headers=headers).json()[
                "available"
            ],
            timeout=10,
            what="cooldown to end",
        )
        second = press(client, key="k2")
    assert 202 == second.status_code, second.text
    assert 2 == len(payout_ids(sql))


def test_longest_cooldown_refuses_and_draws_the_button_without_error(
    db_url: str, sql: psycopg.Connection[DictRow]
) -> None:
    """At the largest cooldown settings accept (366 days) a second press is an audited 429
    and availability answers 200: no time arithmetic overflows into a 500."""
    with app_client(db_url, instant_cooldown=timedelta(days=366)) as client:
        register(client)
        first = press(client, key="k1")
        finish(sql, first.json()["id"], "succeeded")
        r = press(client, key="k2")
        shown = client.get("/v1/payouts/instant/availability", headers=press_headers())
    assert_error(r, 429, "cooldown_active")
    assert 366 * 86400 - 120 < int(r.headers["Retry-After"]) <= 366 * 86400
    assert (200, "cooldown_active") == (shown.status_code, shown.json()["reason"])
    assert ["ok", "cooldown_active"] == press_outcomes(sql, "p1")


def test_amount_below_the_minimum_is_refused(db_url: str, sql: psycopg.Connection[DictRow]) -> None:
    """An amount under PAYOUT_MIN_AMOUNT is 422 amount_below_minimum, audited, nothing created."""
    with app_client(db_url, payout_min_amount=Decimal("5.00")) as client:
        register(client)
        r = press(client, body={"amount": "4.99"})
    body = assert_error(r, 422, "amount_below_minimum")
    assert {"min_amount": "5.00"} == body["details"]
    assert [] == payout_ids(sql)
    assert ["amount_below_minimum"] == press_outcomes(sql, "p1")


def test_amount_above_the_limit_is_refused(db_url: str, sql: psycopg.Connection[DictRow]) -> None:
    """An amount above PAYOUT_MAX_AMOUNT is 422 amount_above_limit, audited, nothing created."""
    with app_client(db_url, payout_max_amount=Decimal("500.00")) as client:
        register(client)
        r = press(client, body={"amount": "500.01"})
    assert_error(r, 422, "amount_above_limit")
    assert [] == payout_ids(sql)
    assert ["amount_above_limit"] == press_outcomes(sql, "p1")


# --- malformed requests ------------------------------------------------------------------

BAD_BODIES = {
    "malformed-json": b'{"amount": ',
    "not-utf8": b'{"amount": "\xff"}',
    "array": b"[]",
    "string": b'"10.00"',
    "null": b"null",
    "unknown-field": b'{"amount": "10.00", "note": "x"}',
    "amount-number": b'{"amount": 10}',
    "amount-float": b'{"amount": 10.5}',
    "amount-zero": b'{"amount": "0"}',
    "amount-zero-cents": b'{"amount": "0.00"}',
    "amount-negative": b'{"amount": "-1"}',
    "amount-3-decimals": b'{"amount": "1.234"}',
    "amount-text": b'{"amount": "abc"}',
    "amount-exponent": b'{"amount": "1e3"}',
    "amount-padded": b'{"amount": " 10"}',
    "amount-empty": b'{"amount": ""}',
    "amount-true": b'{"amount": true}',
    "over-16-kib": b'{"amount": "10.00"}' + b" " * MAX_BODY,
}


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_body_is_refused_and_audited(
    client: TestClient, sql: psycopg.Connection[DictRow], raw: bytes
) -> None:
    """A body other than `{}` or `{"amount": "<positive, ≤2 decimals>"}` is an audited 400."""
    register(client)
    assert_error(press(client, body=raw), 400, "invalid_request")
    assert [] == payout_ids(sql)
    assert ["invalid_request"] == press_outcomes(sql, "p1")


def test_oversized_body_without_content_length_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A streamed (chunked) body over 16 KiB is 400 even though no Content-Length announces it."""
    register(client)
    chunks = [b'{"amount": "10.00"', *([b" " * 1024] * 17), b"}"]
    r = client.post("/v1/payouts/instant", content=iter(chunks), headers=press_headers())
    assert "content-length" not in r.request.headers
    assert_error(r, 400, "invalid_request")
    assert [] == payout_ids(sql)


def _without(name: str) -> dict[str, str]:
    headers = press_headers()
    del headers[name]
    return headers


BAD_HEADERS: dict[str, dict[str, Any]] = {
    "no-park": _without("X-Park-Id"),
    "park-empty": press_headers(park=""),
    "park-space": press_headers(park="p 1"),
    "park-65-chars": press_headers(park="p" * 65),
    "park-dot": press_headers(park="p.1"),
    "no-user": _without("X-User-Id"),
    "user-space": press_headers(user="u 1"),
    "user-129-chars": press_headers(user="u" * 129),
    "no-key": _without("Idempotency-Key"),
    "key-empty": press_headers(key=""),
    "key-129-chars": press_headers(key="k" * 129),
    "key-space": press_headers(key="k 1"),
    "key-non-ascii": {**press_headers(), "Idempotency-Key": "ключ".encode()},
}


@pytest.mark.parametrize("headers", list(BAD_HEADERS.values()), ids=list(BAD_HEADERS))
def test_missing_or_malformed_header_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow], headers: dict[str, Any]
) -> None:
    """A missing or malformed X-Park-Id, X-User-Id or Idempotency-Key is 400 and creates nothing."""
    register(client)
    r = client.post("/v1/payouts/instant", json={"amount": "10.00"}, headers=headers)
    assert_error(r, 400, "invalid_request")
    assert [] == payout_ids(sql)


AUDITABLE_BAD_HEADERS = ["no-user", "no-key", "key-129-chars", "key-space", "key-non-ascii"]


@pytest.mark.parametrize(
    "headers", [BAD_HEADERS[k] for k in AUDITABLE_BAD_HEADERS], ids=AUDITABLE_BAD_HEADERS
)
def test_header_refusal_for_a_valid_park_is_audited(
    client: TestClient, sql: psycopg.Connection[DictRow], headers: dict[str, Any]
) -> None:
    """A 400 for a press that names a valid park is still written to the audit log."""
    register(client)
    r = client.post("/v1/payouts/instant", json={"amount": "10.00"}, headers=headers)
    assert_error(r, 400, "invalid_request")
    assert ["invalid_request"] == press_outcomes(sql, "p1")


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {API_TOKEN}x", "Bearer ", f"Basic {API_TOKEN}", API_TOKEN],
    ids=["none", "wrong-token", "empty-token", "basic-scheme", "no-scheme"],
)
def test_missing_or_wrong_token_is_unauthorized(
    client: TestClient, sql: psycopg.Connection[DictRow], authorization: str | None
) -> None:
    """Without a valid Bearer API token the press is 401 unauthorized and creates nothing."""
    register(client)
    headers = press_headers()
    del headers["Authorization"]
    if authorization is not None:
        headers["Authorization"] = authorization
    r = client.post("/v1/payouts/instant", json={}, headers=headers)
    assert_error(r, 401, "unauthorized")
    assert [] == payout_ids(sql)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/parks/p1"), ("GET", "/v1/parks/p1"), ("GET", "/v1/audit")],
)
def test_api_token_on_an_admin_endpoint_is_forbidden(
    client: TestClient, method: str, path: str
) -> None:
    """An API (Opteum) token on an admin endpoint is 403 forbidden."""
    register(client)
    headers = {"Authorization": f"Bearer {API_TOKEN}", "X-User-Id": "u1"}
    r = client.request(method, path, json={}, headers=headers)
    assert_error(r, 403, "forbidden")


def test_api_token_works_on_park_endpoints(client: TestClient) -> None:
    """The API token is accepted by every park-scoped endpoint."""
    register(client)
    created = press(client)
    assert 202 == created.status_code, created.text
    headers = {"Authorization": f"Bearer {API_TOKEN}", "X-Park-Id": "p1"}
    for path in (
        f"/v1/payouts/{created.json()['id']}",
        "/v1/payouts",
        "/v1/payouts/instant/availability",
    ):
        r = client.get(path, headers=headers)
        assert 200 == r.status_code, (path, r.text)


# --- request ids -------------------------------------------------------------------------


def test_request_id_is_echoed_and_stored_with_the_accepted_press(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A given X-Request-Id comes back on the response and is the audit entry's request_id."""
    register(client)
    r = press(client, **{"X-Request-Id": "req-accepted-1"})
    assert 202 == r.status_code, r.text
    assert "req-accepted-1" == r.headers["X-Request-Id"]
    rows = sql.execute(
        "SELECT request_id, outcome, payout_id FROM audit_log WHERE action = %s", (ACTION,)
    ).fetchall()
    assert [("req-accepted-1", "ok", r.json()["id"])] == [
        (row["request_id"], row["outcome"], str(row["payout_id"])) for row in rows
    ]


def test_request_id_is_echoed_and_stored_with_a_refusal(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A refused press echoes X-Request-Id and its audit entry carries the same request_id."""
    register(client, instant=False)
    r = press(client, **{"X-Request-Id": "req-refused-1"})
    assert_error(r, 403, "instant_payouts_disabled")
    assert "req-refused-1" == r.headers["X-Request-Id"]
    audit = client.get("/v1/audit", params={"park_id": "p1", "action": ACTION}, headers=ADMIN)
    assert 200 == audit.status_code, audit.text
    assert [("req-refused-1", "instant_payouts_disabled", "user", "u1")] == [
        (e["request_id"], e["outcome"], e["actor_type"], e["actor_id"])
        for e in audit.json()["entries"]
    ]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/v1/payouts/instant", press_headers(), 202),
        ("POST", "/v1/payouts/instant", {}, 401),
        ("POST", "/v1/payouts/instant", _without("Idempotency-Key"), 400),
        ("GET", "/v1/no-such-route", {}, 404),
        ("GET", "/ping", {}, 200),
    ],
    ids=["accepted", "unauthorized", "bad-request", "unknown-route", "ping"],
)
def test_every_response_carries_a_request_id(
    client: TestClient, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    """Every response has an X-Request-Id: generated when none is given, echoed when one is."""
    register(client)
    generated = client.request(method, path, headers=headers)
    assert status == generated.status_code, generated.text
    assert generated.headers.get("X-Request-Id")
    echoed = client.request(method, path, headers={**headers, "X-Request-Id": "rid-42"})
    assert "rid-42" == echoed.headers.get("X-Request-Id")
