"""The web edge itself: route groups, request ids in logs, the access line, HTTP metrics."""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Iterator

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from service.core import observability
from service.payouts import store as payouts
from service.web.app import create_app, routes
from service.web.auth import Access, access_of
from tests.conftest import ADMIN_TOKEN, API_TOKEN, make_settings
from tests.helpers.api import (
    ADMIN,
    app_client,
    assert_error,
    park_headers,
    press_headers,
    register,
)

NOWHERE = "postgresql://postgres@127.0.0.1:9/nowhere?connect_timeout=1"


def concrete(path: str) -> str:
    """A request path for a route template, with a plausible value in each parameter."""
    return path.replace("{payout_id}", str(uuid.uuid4())).replace("{park_id}", "p1")


def every_route() -> list[tuple[Route, str]]:
    found = []
    for route in routes():
        assert isinstance(route, Route)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            found.append((route, method))
    return found


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog with the production context filter, so records carry the request's fields."""
    context = observability.ContextFilter()
    caplog.handler.addFilter(context)
    with caplog.at_level(logging.INFO):
        yield caplog
    caplog.handler.removeFilter(context)


def test_every_route_comes_from_an_access_group() -> None:
    """No route was made by hand: each was built by PARK, ADMIN or OPEN, so none lacks auth."""
    assert [] == [r for r in routes() if not isinstance(r, Route) or access_of(r) is None]


@pytest.mark.parametrize(
    ("route", "method"), every_route(), ids=[f"{m} {r.path}" for r, m in every_route()]
)
def test_each_group_demands_its_token(route: Route, method: str) -> None:
    """Park routes refuse a missing token (401) and an admin token (403); admin routes refuse
    the API token (403); open routes need none. Checked before anything touches the database."""
    access = access_of(route)
    path = concrete(route.path)
    with app_client(NOWHERE, api_pool_timeout_seconds=0.2) as client:
        anonymous = client.request(method, path)
        if access is Access.OPEN:
            assert 401 != anonymous.status_code
            return
        assert_error(anonymous, 401, "unauthorized")
        wrong = ADMIN_TOKEN if access is Access.API else API_TOKEN
        r = client.request(method, path, headers={"Authorization": f"Bearer {wrong}"})
        assert_error(r, 403, "forbidden")


def test_unexpected_error_is_logged_with_the_request_id_the_server_made(
    db_url: str, logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500's error log line carries the X-Request-Id the response carries, even one the
    server generated because the client sent none."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(payouts, "get", broken)
    with app_client(db_url) as client:
        r = client.get(f"/v1/payouts/{uuid.uuid4()}", headers=park_headers())
    assert_error(r, 500, "internal_error")
    errors = [rec for rec in logs.records if rec.levelno >= logging.ERROR]
    assert [r.headers["X-Request-Id"]] == [rec.__dict__.get("request_id") for rec in errors]


def test_one_access_line_per_request_with_template_park_and_no_token(
    client: TestClient, logs: pytest.LogCaptureFixture
) -> None:
    """Each request logs one access line: method, route template, status, duration, request
    id and park id; never the token."""
    register(client)
    logs.clear()
    payout_id = uuid.uuid4()
    r = client.get(
        f"/v1/payouts/{payout_id}", headers={**park_headers(), "X-Request-Id": "rid-access"}
    )
    assert 404 == r.status_code
    lines = [rec for rec in logs.records if rec.name == "service.web.access"]
    assert [("GET", "/v1/payouts/{payout_id}", 404, "rid-access", "p1", str(payout_id))] == [
        (
            rec.__dict__["method"],
            rec.__dict__["route"],
            rec.__dict__["status"],
            rec.__dict__["request_id"],
            rec.__dict__["park_id"],
            rec.__dict__["payout_id"],
        )
        for rec in lines
    ]
    assert lines[0].__dict__["duration_ms"] >= 0
    formatted = "\n".join(observability.JsonFormatter().format(rec) for rec in logs.records)
    assert API_TOKEN not in formatted
    assert "rid-access" in formatted


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} ([0-9.e+]+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def test_http_metrics_are_labelled_by_route_template_never_the_raw_path(
    client: TestClient,
) -> None:
    """Requests count under their route template; unknown paths share one label."""
    register(client)
    before = client.get("/metrics").text
    raw = f"/v1/payouts/{uuid.uuid4()}"
    client.get(raw, headers=park_headers())
    client.get(f"/v1/no-such-{uuid.uuid4()}")
    after = client.get("/metrics").text
    name = "fleet_payouts_http_requests_total"
    template = {"route": "/v1/payouts/{payout_id}", "method": "GET", "status": "404"}
    assert 1 == _sample(after, name, **template) - _sample(before, name, **template)
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert 1 == _sample(after, name, **unmatched) - _sample(before, name, **unmatched)
    assert raw not in after
    assert _sample(after, "fleet_payouts_http_request_seconds_count", route=template["route"])


def test_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient) -> None:
    """ "/v1/payouts/" is an unknown route answered in the error shape, not a 307."""
    assert_error(client.get("/v1/payouts/", headers=park_headers()), 404, "not_found")


def test_admin_audit_entry_records_who_and_from_where(db_url: str) -> None:
    """An admin action's audit entry keeps the client's IP and user agent, never a token."""
    app = create_app(make_settings(db_url))
    with TestClient(app, client=("192.0.2.7", 40000)) as client:
        r = client.put(
            "/v1/parks/p1",
            json={"instant_payouts_enabled": True},
            headers={**ADMIN, "User-Agent": "ops-console/2.1"},
        )
        assert 201 == r.status_code, r.text
        audit = client.get("/v1/audit", params={"park_id": "p1"}, headers=ADMIN).json()
    assert [{"ip": "192.0.2.7", "user_agent": "ops-console/2.1"}] == [
        e["details"]["client"] for e in audit["entries"]
    ]
    assert ADMIN_TOKEN not in str(audit)


def test_press_audit_entry_records_who_and_from_where(db_url: str) -> None:
    """A press's audit entry keeps the client (through a trusted proxy) and the user agent."""
    app = create_app(make_settings(db_url, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)))
    with TestClient(app, client=("10.1.2.3", 40000)) as client:
        register(client)
        headers = press_headers(**{"X-Forwarded-For": "198.51.100.9", "User-Agent": "opteum/7"})
        assert 202 == client.post("/v1/payouts/instant", json={}, headers=headers).status_code
        entries = client.get(
            "/v1/audit", params={"action": "payout.instant.request"}, headers=ADMIN
        ).json()["entries"]
    assert [{"ip": "198.51.100.9", "user_agent": "opteum/7"}] == [
        e["details"]["client"] for e in entries
    ]


HOSTILE = {
    "audit-park-nul": ("GET", "/v1/audit?park_id=p%001", None),
    "audit-actor-nul": ("GET", "/v1/audit?actor_id=a%00b", None),
    "audit-action-control": ("GET", "/v1/audit?action=%01x", None),
    "audit-limit-superscript": ("GET", "/v1/audit?limit=%C2%B2", None),
    "audit-cursor-huge-id": (
        "GET",
        "/v1/audit?cursor=WyIyMDI0LTAxLTAxVDAwOjAwOjAwWiIsMWUzMDBd",
        None,
    ),
    "audit-since-garbage": ("GET", "/v1/audit?since=2024-13-99", None),
    "park-params-nul": ("PUT", "/v1/parks/p1", b'{"params": {"a": "x\\u0000y"}}'),
    "park-params-key-nul": ("PUT", "/v1/parks/p1", b'{"params": {"\\u0000": 1}}'),
    "park-params-surrogate": ("PUT", "/v1/parks/p1", b'{"params": {"a": ["\\ud800"]}}'),
    "park-body-invalid-utf8": ("PUT", "/v1/parks/p1", b'{"params": {"a": "\xff"}}'),
}


@pytest.mark.parametrize(("method", "path", "body"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_text_is_a_400_not_a_500(
    client: TestClient, method: str, path: str, body: bytes | None
) -> None:
    """Text PostgreSQL cannot store or compare (NUL, lone surrogates, bad numbers) is refused
    at the edge with 400 invalid_request."""
    r = client.request(method, path, content=body, headers=ADMIN)
    assert_error(r, 400, "invalid_request")


def test_forwarded_for_is_one_list_over_every_header_line(db_url: str) -> None:
    """Behind a proxy that appends its own X-Forwarded-For line, the audit keeps the address
    that proxy saw, not the one the client wrote in its own line (issue 17 item 3)."""
    app = create_app(make_settings(db_url, trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),)))
    with TestClient(app, client=("10.1.2.3", 40000)) as client:
        register(client)
        headers = [*press_headers().items(), ("X-Forwarded-For", "6.6.6.6")]
        headers.append(("X-Forwarded-For", "198.51.100.9"))
        assert 202 == client.post("/v1/payouts/instant", json={}, headers=headers).status_code
        entries = client.get(
            "/v1/audit", params={"action": "payout.instant.request"}, headers=ADMIN
        ).json()["entries"]
    assert ["198.51.100.9"] == [e["details"]["client"]["ip"] for e in entries]


def test_deeply_nested_body_is_a_400_before_parsing(client: TestClient) -> None:
    """`params` nested 490 levels deep (1 kB) is refused 400 invalid_request, not a 500 from
    the audit write (issue 17 item 5); 32 levels still pass."""
    deep = b'{"params": {"a": ' + b"[" * 490 + b"]" * 490 + b"}}"
    assert_error(client.put("/v1/parks/p1", content=deep, headers=ADMIN), 400, "invalid_request")
    fine = b'{"params": {"a": ' + b"[" * 30 + b"]" * 30 + b"}}"
    assert 201 == client.put("/v1/parks/p1", content=fine, headers=ADMIN).status_code


@pytest.mark.parametrize(
    "cursor",
    [
        "WyIyMDk5LTAxLTAxVDAwOjAwOjAwWiIsIjAwMDAwMDAwLTAwMDAtMDAwMC0wMDAwLTAwMDAwMDAwMDAwMCJd",
        "WyIyMDk5LTAxLTAxVDAwOjAwOjAwWiIsMV0",
        "WyIyMDk5LTAxLTAxVDAwOjAwOjAwWiIsMV0.AAAAAAAAAAAAAAAAAAAAAA",
    ],
    ids=["payouts-shape", "audit-shape", "with-a-made-up-tag"],
)
def test_made_up_cursors_are_refused(client: TestClient, cursor: str) -> None:
    """A cursor the API did not issue (well-formed position, no or a wrong signature) is a
    400 on /v1/payouts and /v1/audit, not a page of entries (issue 17 item 6)."""
    register(client)
    r = client.get("/v1/payouts", params={"cursor": cursor}, headers=park_headers())
    assert_error(r, 400, "invalid_request")
    r = client.get("/v1/audit", params={"cursor": cursor}, headers=ADMIN)
    assert_error(r, 400, "invalid_request")


def test_issued_cursors_page_through_and_stay_with_their_list(client: TestClient) -> None:
    """The cursors the API issues page on; an audit cursor is refused on /v1/payouts and a
    park's payouts cursor on another park's list."""
    for park in ("p1", "p2", "p3"):
        register(client, park)
    first = client.get("/v1/audit", params={"limit": 1}, headers=ADMIN).json()
    second = client.get(
        "/v1/audit", params={"limit": 1, "cursor": first["next_cursor"]}, headers=ADMIN
    )
    assert 200 == second.status_code
    assert first["entries"][0]["id"] != second.json()["entries"][0]["id"]
    r = client.get("/v1/payouts", params={"cursor": first["next_cursor"]}, headers=park_headers())
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/payouts/instant", "POST"),
        ("DELETE", "/v1/parks/p1", "GET, HEAD, PUT"),
        ("POST", "/v1/payouts", "GET, HEAD"),
        ("GET", f"/v1/payouts/{uuid.UUID(int=1)}/cancel", "POST"),  # one id on every worker
    ],
)
def test_wrong_method_is_405_with_allow(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    """A known path with the wrong method answers 405 method_not_allowed with every method the
    path does take in Allow, `GET /v1/payouts/instant` included (issue 17 item 7)."""
    r = client.request(method, path, headers=park_headers())
    assert_error(r, 405, "method_not_allowed")
    assert allow == r.headers["Allow"]


def test_a_payout_id_segment_never_shadows_a_literal_route(client: TestClient) -> None:
    """`/v1/payouts/instant/cancel` is an unknown route (404 not_found), not the payout
    "instant"; a non-UUID payout id is still payout_not_found."""
    r = client.post("/v1/payouts/instant/cancel", headers=press_headers())
    assert_error(r, 404, "not_found")
    assert_error(client.get("/v1/payouts/abc", headers=park_headers()), 404, "payout_not_found")
