"""Read endpoints, the admin API and operations endpoints against SPEC section 3."""

from __future__ import annotations

import json
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
from tests.helpers.api import (
    ADMIN,
    ADMIN_AUTH,
    app_client,
    assert_error,
    cursor_of,
    finish,
    park_headers,
    parse_ts,
    press_headers,
    register,
)

# --- helpers -----------------------------------------------------------------------


def press(client: TestClient, park: str = "p1", key: str = "k1") -> httpx.Response:
    headers = press_headers(park, key=key)
    r: httpx.Response = client.post("/v1/payouts/instant", json={}, headers=headers)
    return r


def availability(client: TestClient, park: str = "p1") -> dict[str, Any]:
    r = client.get("/v1/payouts/instant/availability", headers=park_headers(park))
    assert 200 == r.status_code, r.text
    body: dict[str, Any] = r.json()
    return body


def insert_finished_payouts(
    sql: psycopg.Connection[DictRow], park: str, count: int, *, same_time: bool = False
) -> list[str]:
    """`count` skipped periodic payouts for `park`; their ids newest first by created_at.

    Each is born pending and moved to skipped as the schema's trigger demands,
    one at a time (at most one payout per park is in flight).
    """
    for i in range(count):
        row = sql.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount, created_at)"
            " VALUES (gen_random_uuid(), %s, 'periodic', 100000,"
            "         now() - interval '1 hour' - %s * interval '1 minute')"
            " RETURNING id",
            (park, 0 if same_time else i),
        ).fetchone()
        assert row is not None
        sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (row["id"],))
        sql.execute(
            "UPDATE payouts SET status = 'skipped', available = 0, completed_at = now()"
            " WHERE id = %s",
            (row["id"],),
        )
    ordered = sql.execute(
        "SELECT id FROM payouts WHERE park_id = %s ORDER BY created_at DESC, id DESC", (park,)
    ).fetchall()
    assert count == len(ordered)
    return [str(r["id"]) for r in ordered]


def walk_payouts(client: TestClient, park: str, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = client.get("/v1/payouts", params=params, headers=park_headers(park))
        assert 200 == r.status_code, r.text
        body = r.json()
        assert {"payouts", "next_cursor"} == set(body)
        pages.append([p["id"] for p in body["payouts"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("pagination did not end")


# --- GET /v1/payouts/{id} ----------------------------------------------------------------


def test_get_payout_returns_the_park_s_payout(client: TestClient) -> None:
    """GET /v1/payouts/{id} answers 200 with the same payout object the press returned."""
    register(client)
    created = press(client)
    assert 202 == created.status_code, created.text
    r = client.get(f"/v1/payouts/{created.json()['id']}", headers=park_headers())
    assert 200 == r.status_code, r.text
    assert created.json() == r.json()


@pytest.mark.parametrize(
    "payout_id", ["of-other-park", "not-a-uuid", str(uuid.UUID(int=1))], ids=str
)
def test_get_payout_that_is_not_the_park_s_is_not_found(client: TestClient, payout_id: str) -> None:
    """Another park's payout, an unknown uuid and a non-uuid id are all 404 payout_not_found."""
    register(client, "p1")
    register(client, "p2")
    created = press(client, "p1")
    assert 202 == created.status_code, created.text
    if payout_id == "of-other-park":
        payout_id = created.json()["id"]
    r = client.get(f"/v1/payouts/{payout_id}", headers=park_headers("p2"))
    assert_error(r, 404, "payout_not_found")


# --- GET /v1/payouts ---------------------------------------------------------------------


def test_list_pages_are_newest_first_disjoint_and_complete(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """limit=10 over 25 payouts gives pages of 10, 10, 5, newest first, covering each once."""
    register(client, "p1")
    register(client, "p2")
    expected = insert_finished_payouts(sql, "p1", 25)
    insert_finished_payouts(sql, "p2", 3)
    pages = walk_payouts(client, "p1", 10)
    assert [10, 10, 5] == [len(p) for p in pages]
    assert expected == [i for page in pages for i in page]


def test_list_pages_through_payouts_created_at_the_same_moment(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """Payouts sharing one created_at are still each listed exactly once across pages."""
    register(client)
    expected = insert_finished_payouts(sql, "p1", 7, same_time=True)
    pages = walk_payouts(client, "p1", 3)
    assert expected == [i for page in pages for i in page]


def test_list_shows_payout_objects(client: TestClient) -> None:
    """The list holds full payout objects and no cursor when everything fits."""
    register(client)
    created = press(client)
    r = client.get("/v1/payouts", headers=park_headers())
    assert 200 == r.status_code, r.text
    assert {"payouts": [created.json()], "next_cursor": None} == r.json()


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "", "1.5"])
def test_list_limit_outside_1_to_100_is_refused(client: TestClient, limit: str) -> None:
    """A limit that is not an integer from 1 to 100 is 400 invalid_request."""
    register(client)
    r = client.get("/v1/payouts", params={"limit": limit}, headers=park_headers())
    assert_error(r, 400, "invalid_request")


FORGED_PAYOUT_CURSORS = {
    "not-base64-json": "abc",
    "garbage": "!!!",
    "object": cursor_of({"created_at": "2020-01-01T00:00:00Z"}),
    "numbers": cursor_of([1, 2]),
    "id-not-a-string": cursor_of(["2020-01-01T00:00:00Z", 123]),
    "naive-time": cursor_of(["2020-01-01T00:00:00", str(uuid.UUID(int=1))]),
    "too-long": cursor_of(["2020-01-01T00:00:00Z", str(uuid.UUID(int=1)), 3]),
}


@pytest.mark.parametrize(
    "cursor", list(FORGED_PAYOUT_CURSORS.values()), ids=list(FORGED_PAYOUT_CURSORS)
)
def test_list_cursor_not_issued_by_the_api_is_refused(client: TestClient, cursor: str) -> None:
    """A cursor the API did not issue is 400 invalid_request, never a 500."""
    register(client)
    r = client.get("/v1/payouts", params={"cursor": cursor}, headers=park_headers())
    assert_error(r, 400, "invalid_request")


# --- GET /v1/payouts/instant/availability ----------------------------------------------


def test_availability_of_a_fresh_enabled_park(client: TestClient) -> None:
    """A registered park with instant payouts on and no history may press the button."""
    register(client)
    assert {
        "available": True,
        "reason": None,
        "next_available_at": None,
        "max_amount": "100000.00",
        "min_amount": "1.00",
        "cooldown_hours": 24,
        "fee": None,
        "details": None,
        "instant_payouts_until": None,
    } == availability(client)


def test_availability_when_instant_payouts_are_disabled(client: TestClient) -> None:
    """A park with instant payouts off sees reason instant_payouts_disabled."""
    register(client, instant=False)
    body = availability(client)
    assert (False, "instant_payouts_disabled", None) == (
        body["available"],
        body["reason"],
        body["next_available_at"],
    )


def test_availability_while_a_payout_is_in_flight(client: TestClient) -> None:
    """While a payout is pending the button is off with reason payout_in_progress."""
    register(client)
    assert 202 == press(client).status_code
    body = availability(client)
    assert (False, "payout_in_progress", None) == (
        body["available"],
        body["reason"],
        body["next_available_at"],
    )


def test_availability_during_cooldown_names_the_moment_it_ends(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """After a succeeded instant payout the button is off until created_at + K, and says so."""
    register(client)
    created = press(client)
    finish(sql, created.json()["id"], "succeeded")
    body = availability(client)
    assert (False, "cooldown_active") == (body["available"], body["reason"])
    expected = parse_ts(created.json()["created_at"]) + timedelta(hours=24)
    assert expected == parse_ts(body["next_available_at"])
    refused = press(client, key="k2")
    assert 429 == refused.status_code, refused.text
    assert body["next_available_at"] == refused.json()["details"]["next_available_at"]


def test_availability_of_an_unregistered_park_is_not_found(client: TestClient) -> None:
    """Availability for a park that was never registered is 404 park_not_found."""
    r = client.get("/v1/payouts/instant/availability", headers=park_headers("ghost"))
    assert_error(r, 404, "park_not_found")


@pytest.mark.parametrize(
    ("cooldown", "hours", "max_amount", "shown"),
    [
        (timedelta(hours=24), 24, Decimal("100000.00"), "100000.00"),
        (timedelta(hours=1), 1, Decimal("2500"), "2500.00"),
        (timedelta(minutes=90), 1.5, Decimal("0.5"), "0.50"),
        (timedelta(seconds=36), 0.01, Decimal("12.34"), "12.34"),
    ],
    ids=["24h", "1h", "90min", "36s"],
)
def test_availability_reports_limit_and_cooldown_from_settings(
    db_url: str, cooldown: timedelta, hours: float, max_amount: Decimal, shown: str
) -> None:
    """max_amount is PAYOUT_MAX_AMOUNT as money and cooldown_hours is K, fractions included."""
    with app_client(db_url, instant_cooldown=cooldown, payout_max_amount=max_amount) as client:
        register(client)
        body = availability(client)
    assert (shown, hours) == (body["max_amount"], body["cooldown_hours"])
    if hours == int(hours):
        assert isinstance(body["cooldown_hours"], int)


# --- PUT /v1/parks/{id} -----------------------------------------------------------------


def test_put_park_creates_then_updates(client: TestClient) -> None:
    """The first PUT answers 201 with defaults, the next one 200."""
    r = client.put("/v1/parks/p1", json={}, headers=ADMIN)
    assert 201 == r.status_code, r.text
    body = r.json()
    assert {
        "park_id": "p1",
        "instant_payouts_enabled": False,
        "periodic_payouts_enabled": True,
        "params": {},
        "hold": None,
        "last_payout_at": None,
    } == {
        k: body[k]
        for k in (
            "park_id",
            "instant_payouts_enabled",
            "periodic_payouts_enabled",
            "params",
            "hold",
            "last_payout_at",
        )
    }
    assert {
        "hold",
        "park_id",
        "instant_payouts_enabled",
        "periodic_payouts_enabled",
        "params",
        "registered_at",
        "last_payout_at",
        "next_periodic_payout_at",
        "instant_fee",
        "instant_payouts_until",
    } == set(body)
    again = client.put("/v1/parks/p1", json={}, headers=ADMIN)
    assert 200 == again.status_code, again.text
    assert body["registered_at"] == again.json()["registered_at"]


def test_empty_put_body_registers_with_defaults(client: TestClient) -> None:
    """A PUT with no body at all registers the park with the defaults."""
    r = client.put("/v1/parks/p1", headers=ADMIN)
    assert 201 == r.status_code, r.text
    assert (False, True, {}) == (
        r.json()["instant_payouts_enabled"],
        r.json()["periodic_payouts_enabled"],
        r.json()["params"],
    )


def test_partial_update_keeps_other_fields(client: TestClient) -> None:
    """A PUT naming one field changes that field only."""
    r = client.put(
        "/v1/parks/p1",
        json={
            "instant_payouts_enabled": True,
            "periodic_payouts_enabled": False,
            "params": {"bank": "b1"},
        },
        headers=ADMIN,
    )
    assert 201 == r.status_code, r.text
    r = client.put("/v1/parks/p1", json={"instant_payouts_enabled": False}, headers=ADMIN)
    assert 200 == r.status_code, r.text
    assert (False, False, {"bank": "b1"}) == (
        r.json()["instant_payouts_enabled"],
        r.json()["periodic_payouts_enabled"],
        r.json()["params"],
    )
    r = client.put("/v1/parks/p1", json={"params": {"bank": "b2"}}, headers=ADMIN)
    assert (False, False, {"bank": "b2"}) == (
        r.json()["instant_payouts_enabled"],
        r.json()["periodic_payouts_enabled"],
        r.json()["params"],
    )
    assert r.json() == client.get("/v1/parks/p1", headers=ADMIN_AUTH).json()


def test_params_are_passed_through_unchanged(client: TestClient) -> None:
    """params come back exactly as sent, JSON numbers staying numbers."""
    params = {"bank": "b1", "rate": 1.5, "count": 3, "nested": {"share": 0.25, "ok": True}}
    r = client.put("/v1/parks/p1", json={"params": params}, headers=ADMIN)
    assert 201 == r.status_code, r.text
    assert params == r.json()["params"]
    assert params == client.get("/v1/parks/p1", headers=ADMIN_AUTH).json()["params"]


@pytest.mark.parametrize(
    "body",
    [
        {"params": []},
        {"params": "x"},
        {"params": 1},
        {"params": None},
        {"instant_payouts_enabled": "true"},
        {"instant_payouts_enabled": 1},
        {"instant_payouts_enabled": None},
        {"periodic_payouts_enabled": "false"},
        {"periodic_payouts_enabled": 0},
        {"unknown": True},
    ],
    ids=json.dumps,
)
def test_put_park_with_bad_body_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow], body: dict[str, Any]
) -> None:
    """Non-object params, non-boolean flags and unknown fields are 400 and register nothing."""
    r = client.put("/v1/parks/p1", json=body, headers=ADMIN)
    assert_error(r, 400, "invalid_request")
    assert [] == sql.execute("SELECT park_id FROM parks").fetchall()


@pytest.mark.parametrize("park", ["p%201", "p" * 65, "p.1", "p%C3%A9"], ids=str)
def test_put_park_with_invalid_park_id_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow], park: str
) -> None:
    """A park id in the path that is not 1-64 letters, digits, _ or - is 400."""
    r = client.put(f"/v1/parks/{park}", json={}, headers=ADMIN)
    assert_error(r, 400, "invalid_request")
    assert [] == sql.execute("SELECT park_id FROM parks").fetchall()


def test_put_park_without_user_id_is_refused(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """A PUT without X-User-Id is 400: every admin change needs an actor for the audit log."""
    r = client.put("/v1/parks/p1", json={}, headers=ADMIN_AUTH)
    assert_error(r, 400, "invalid_request")
    assert [] == sql.execute("SELECT park_id FROM parks").fetchall()


def test_put_park_with_api_token_is_forbidden(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """The API token cannot register parks: 403 forbidden."""
    headers = {"Authorization": f"Bearer {API_TOKEN}", "X-User-Id": "u1"}
    r = client.put("/v1/parks/p1", json={"instant_payouts_enabled": True}, headers=headers)
    assert_error(r, 403, "forbidden")
    assert [] == sql.execute("SELECT park_id FROM parks").fetchall()


def test_put_park_is_audited_as_admin(client: TestClient) -> None:
    """Registering and updating a park leave admin audit entries with the acting user."""
    client.put(
        "/v1/parks/p1",
        json={"instant_payouts_enabled": True},
        headers={**ADMIN, "X-Request-Id": "rq-1"},
    )
    client.put(
        "/v1/parks/p1", json={"params": {"a": "b"}}, headers={**ADMIN_AUTH, "X-User-Id": "admin-2"}
    )
    r = client.get("/v1/audit", params={"park_id": "p1"}, headers=ADMIN_AUTH)
    assert 200 == r.status_code, r.text
    assert [
        ("admin", "admin-2", "park.update", "ok"),
        ("admin", "admin-1", "park.register", "ok"),
    ] == [(e["actor_type"], e["actor_id"], e["action"], e["outcome"]) for e in r.json()["entries"]]
    assert "rq-1" == r.json()["entries"][1]["request_id"]


# --- GET /v1/parks/{id} ------------------------------------------------------------------


@pytest.mark.parametrize("period", [timedelta(days=7), timedelta(hours=36)], ids=["7d", "36h"])
def test_never_paid_park_is_due_n_days_after_registration(db_url: str, period: timedelta) -> None:
    """A park never paid is next due at registered_at + N."""
    with app_client(db_url, payout_period=period) as client:
        register(client)
        r = client.get("/v1/parks/p1", headers=ADMIN_AUTH)
    assert 200 == r.status_code, r.text
    body = r.json()
    assert body["last_payout_at"] is None
    expected = parse_ts(body["registered_at"]) + period
    assert expected == parse_ts(body["next_periodic_payout_at"])


def test_paid_park_is_due_n_days_after_its_last_payout(
    client: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """After a succeeded payout the next periodic payout is last_payout_at + N."""
    register(client)
    paid_at = datetime.now(UTC) + timedelta(hours=1)
    sql.execute("UPDATE parks SET last_payout_at = %s WHERE park_id = 'p1'", (paid_at,))
    body = client.get("/v1/parks/p1", headers=ADMIN_AUTH).json()
    assert paid_at == parse_ts(body["last_payout_at"])
    assert paid_at + timedelta(days=7) == parse_ts(body["next_periodic_payout_at"])


def test_park_with_periodic_payouts_off_has_no_next_payout(client: TestClient) -> None:
    """With periodic payouts disabled, next_periodic_payout_at is null."""
    register(client, periodic=False)
    body = client.get("/v1/parks/p1", headers=ADMIN_AUTH).json()
    assert body["next_periodic_payout_at"] is None


def test_get_unknown_park_is_not_found(client: TestClient) -> None:
    """GET of a park that was never registered is 404 park_not_found."""
    assert_error(client.get("/v1/parks/ghost", headers=ADMIN_AUTH), 404, "park_not_found")


# --- GET /v1/audit --------------------------------------------------------------------------


@pytest.fixture
def history(client: TestClient) -> list[dict[str, Any]]:
    """Six audit entries from two admins and one user over two parks; newest first."""
    register(client, "p1", user="admin-1")
    register(client, "p2", user="admin-2")
    register(client, "p1", user="admin-2", params={"x": "y"})
    assert 202 == press(client, "p1").status_code
    assert 409 == press(client, "p1", key="k2").status_code
    register(client, "p2", user="admin-1", periodic=False)
    r = client.get("/v1/audit", headers=ADMIN_AUTH)
    assert 200 == r.status_code, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    assert 6 == len(entries)
    return entries


def _audit(client: TestClient, **params: Any) -> list[tuple[str, str, str, str]]:
    r = client.get("/v1/audit", params=params, headers=ADMIN_AUTH)
    assert 200 == r.status_code, r.text
    return [(e["park_id"], e["actor_id"], e["action"], e["outcome"]) for e in r.json()["entries"]]


def test_audit_entries_have_the_spec_shape(history: list[dict[str, Any]]) -> None:
    """Each audit entry carries SPEC's fields, newest first."""
    required = {
        "id",
        "at",
        "actor_type",
        "actor_id",
        "park_id",
        "action",
        "outcome",
        "request_id",
        "details",
    }
    for entry in history:
        assert required <= set(entry), entry
        parse_ts(entry["at"])
        assert isinstance(entry["details"], dict)
    times = [parse_ts(e["at"]) for e in history]
    assert sorted(times, reverse=True) == times


def test_audit_filters_by_park_actor_and_action(
    client: TestClient, history: list[dict[str, Any]]
) -> None:
    """park_id, actor_id and action each narrow the entries, and they combine."""
    assert [
        ("p1", "u1", "payout.instant.request", "payout_in_progress"),
        ("p1", "u1", "payout.instant.request", "ok"),
        ("p1", "admin-2", "park.update", "ok"),
        ("p1", "admin-1", "park.register", "ok"),
    ] == _audit(client, park_id="p1")
    assert [
        ("p1", "admin-2", "park.update", "ok"),
        ("p2", "admin-2", "park.register", "ok"),
    ] == _audit(client, actor_id="admin-2")
    assert [
        ("p2", "admin-1", "park.update", "ok"),
        ("p1", "admin-2", "park.update", "ok"),
    ] == _audit(client, action="park.update")
    assert [("p2", "admin-1", "park.update", "ok")] == _audit(
        client, park_id="p2", actor_id="admin-1", action="park.update"
    )


def test_audit_filters_by_time_range(client: TestClient, history: list[dict[str, Any]]) -> None:
    """since is inclusive and until exclusive, both as RFC 3339 timestamps."""
    middle = history[2]["at"]
    since = client.get("/v1/audit", params={"since": middle}, headers=ADMIN_AUTH).json()
    assert [e["id"] for e in history[:3]] == [e["id"] for e in since["entries"]]
    until = client.get("/v1/audit", params={"until": middle}, headers=ADMIN_AUTH).json()
    assert [e["id"] for e in history[3:]] == [e["id"] for e in until["entries"]]
    both = client.get(
        "/v1/audit", params={"since": history[4]["at"], "until": middle}, headers=ADMIN_AUTH
    ).json()
    assert [e["id"] for e in history[3:5]] == [e["id"] for e in both["entries"]]


def test_audit_pages_are_disjoint_and_complete(
    client: TestClient, history: list[dict[str, Any]]
) -> None:
    """limit=4 walks all six entries in two pages, newest first, each entry once."""
    first = client.get("/v1/audit", params={"limit": 4}, headers=ADMIN_AUTH).json()
    assert first["next_cursor"]
    second = client.get(
        "/v1/audit", params={"limit": 4, "cursor": first["next_cursor"]}, headers=ADMIN_AUTH
    ).json()
    assert second["next_cursor"] is None
    assert [e["id"] for e in history] == [e["id"] for e in first["entries"] + second["entries"]]


@pytest.mark.parametrize(
    "params",
    [
        {"since": "yesterday"},
        {"since": "2024-01-01T00:00:00"},
        {"until": "2024-13-01T00:00:00Z"},
        {"limit": "0"},
        {"limit": "101"},
        {"cursor": "abc"},
        {"cursor": cursor_of(["2020-01-01T00:00:00Z", "x"])},
    ],
    ids=json.dumps,
)
def test_audit_with_bad_query_is_refused(client: TestClient, params: dict[str, str]) -> None:
    """Malformed since/until, an out-of-range limit or a foreign cursor is 400 invalid_request."""
    r = client.get("/v1/audit", params=params, headers=ADMIN_AUTH)
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log"]
)
def test_audit_log_refuses_changes_in_the_database(
    client: TestClient, sql: psycopg.Connection[DictRow], statement: str
) -> None:
    """The database itself refuses UPDATE and DELETE on audit_log."""
    register(client)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql.execute(statement)
    assert [("ok",)] == [
        (r["outcome"],) for r in sql.execute("SELECT outcome FROM audit_log").fetchall()
    ]


# --- operations and unknown routes -------------------------------------------------


def test_ping_and_ready_answer_200(client: TestClient) -> None:
    """/ping and /ready answer 200 without a token while the database is up."""
    assert 200 == client.get("/ping").status_code
    assert 200 == client.get("/ready").status_code


def test_ready_is_503_while_the_database_is_down() -> None:
    """/ready answers 503 when the database does not answer, while /ping still says 200."""
    with app_client("postgresql://postgres@127.0.0.1:9/nowhere?connect_timeout=1") as client:
        assert 200 == client.get("/ping").status_code
        assert_error(client.get("/ready"), 503, "unavailable")


def test_metrics_expose_db_query_counter(client: TestClient) -> None:
    """/metrics is Prometheus text and includes fleet_payouts_db_queries_total."""
    register(client)
    r = client.get("/metrics")
    assert 200 == r.status_code
    assert r.headers["content-type"].startswith("text/plain")
    assert re.search(r"^fleet_payouts_db_queries_total\{.*\} [0-9.e+]+$", r.text, re.M), r.text


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/nothing"), ("GET", "/"), ("POST", "/v1/parks")]
)
def test_unknown_route_is_a_json_404(client: TestClient, method: str, path: str) -> None:
    """A path no route serves answers 404 in the one error shape."""
    r = client.request(method, path, headers=ADMIN)
    assert_error(r, 404, "not_found")
    assert r.headers.get("X-Request-Id")
