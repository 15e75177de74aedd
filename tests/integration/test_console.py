"""The support console over HTTP, in-process (issue 20, SPEC section 9): sessions, CSRF,
headers, the actions' audit entries, the timeline's pages and hostile stored text.
The browser drives the same pages in tests/e2e/test_console_browser.py."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import settings as settings_module
from service.web import openapi
from service.web.app import create_app
from service.web.console import pages, sentences
from service.web.errors import STATUS
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.helpers.api import press_headers, register, rows
from tests.helpers.console import SECRET, csrf_of, forged_cookie, sign_in

SQL = psycopg.Connection[DictRow]


@pytest.fixture
def console(db_url: str) -> Iterator[TestClient]:
    """The app with the console on, from a client at 127.0.0.1."""
    with console_client(db_url) as c:
        yield c


def console_client(db_url: str, **overrides: Any) -> TestClient:
    """The app with the console on, its client at 127.0.0.1 (an address, as in production)."""
    settings = make_settings(db_url, console_secret=SECRET, **overrides)
    return TestClient(create_app(settings), client=("127.0.0.1", 50000))


@pytest.fixture
def signed_in(console: TestClient) -> TestClient:
    r = sign_in(console)
    assert 303 == r.status_code, r.text
    return console


def test_console_is_off_without_a_secret(client: TestClient) -> None:
    """Without CONSOLE_SECRET /console is an unknown route (the API's JSON 404)."""
    r = client.get("/console/sign-in")
    assert 404 == r.status_code
    assert "not_found" == r.json()["code"]


def test_openapi_leaves_the_console_out() -> None:
    """The OpenAPI description names no /console path: the console is not API."""
    assert [] == [p for p in openapi.PATHS if p.startswith("/console")]


def test_every_api_refusal_code_reads_as_a_sentence() -> None:
    """Each error code the API answers with has a sentence in the console's vocabulary."""
    assert set() == set(STATUS) - set(sentences.REFUSALS)


def test_console_secret_shorter_than_32_characters_stops_the_process() -> None:
    """A guessable CONSOLE_SECRET is a configuration error naming the variable."""
    env = {"DATABASE_URL": "postgresql://x/y", "BILLING_URL": "http://b", "CONSOLE_SECRET": "short"}
    with pytest.raises(settings_module.ConfigError) as err:
        settings_module.load(env)
    assert "CONSOLE_SECRET" == err.value.variable
    env["CONSOLE_SECRET"] = "x" * 32
    env["CONSOLE_SESSION_HOURS"] = "0.5"
    assert 0.5 == settings_module.load(env).console_session_hours


def test_every_page_without_a_session_goes_to_sign_in(console: TestClient) -> None:
    """Pages and actions answer 303 to the sign-in page, remembering where to return."""
    for method, path in [
        ("GET", "/console/parks"),
        ("GET", "/console/parks/p1"),
        ("GET", f"/console/payouts/{uuid.uuid4()}"),
        ("GET", "/console/approvals"),
        ("GET", "/console/audit?park_id=p1"),
        ("POST", "/console/parks/p1/hold"),
    ]:
        r = console.request(method, path, follow_redirects=False)
        assert 303 == r.status_code, path
        assert r.headers["location"].startswith("/console/sign-in?next=%2Fconsole"), path


def test_sign_in_sets_a_strict_http_only_cookie_scoped_to_the_console(
    console: TestClient,
) -> None:
    """The session cookie is HttpOnly, SameSite=Strict, Path=/console, lasts the session's hours."""
    r = sign_in(console)
    assert 303 == r.status_code, r.text
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("fp_console="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "path=/console" in cookie.lower()
    assert f"max-age={8 * 3600}" in cookie.lower()
    assert "secure" not in attributes  # plain HTTP here


def test_cookie_is_secure_behind_a_trusted_https_proxy(db_url: str) -> None:
    """With X-Forwarded-Proto: https from one of TRUSTED_PROXIES the cookie is also Secure."""
    import ipaddress

    proxies = (ipaddress.ip_network("127.0.0.0/8"),)
    with console_client(db_url, trusted_proxies=proxies) as c:
        plain = c.get("/console/sign-in").headers["set-cookie"]
        c.cookies.clear()
        r = c.get("/console/sign-in", headers={"X-Forwarded-Proto": "https"})
    assert "secure" not in {part.strip().lower() for part in plain.split(";")}
    assert "secure" in {part.strip().lower() for part in r.headers["set-cookie"].split(";")}


def test_pages_carry_a_strict_csp_and_refuse_framing(signed_in: TestClient) -> None:
    """Every page has a CSP without inline scripts, frame-ancestors 'none' and X-Frame-Options."""
    for path in ("/console/sign-in", "/console/parks", "/console/audit"):
        r = signed_in.get(path)
        assert 200 == r.status_code, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert "DENY" == r.headers["x-frame-options"]
        assert "<script>" not in r.text  # no inline script at all


def test_an_action_without_the_csrf_token_is_refused_and_changes_nothing(
    signed_in: TestClient, sql: SQL
) -> None:
    """A signed-in POST without the form's token answers 403 and the park stays as it was."""
    register(signed_in, "p1")
    r = signed_in.post("/console/parks/p1/hold", data={"reason": "forged"})
    assert 403 == r.status_code
    r = signed_in.post("/console/parks/p1/hold", data={"reason": "forged", "csrf": "wrong"})
    assert 403 == r.status_code
    assert [None] == [x["hold_reason"] for x in rows(sql, "SELECT hold_reason FROM parks")]


def test_an_action_from_another_origin_is_refused_even_with_the_token(
    signed_in: TestClient, sql: SQL
) -> None:
    """A POST whose Origin is another site is refused, whatever token it carries."""
    register(signed_in, "p1")
    token = csrf_of(signed_in.get("/console/parks/p1").text)
    r = signed_in.post(
        "/console/parks/p1/hold",
        data={"reason": "forged", "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert 403 == r.status_code
    assert [None] == [x["hold_reason"] for x in rows(sql, "SELECT hold_reason FROM parks")]


def test_an_expired_session_goes_back_to_sign_in(console: TestClient) -> None:
    """A session past its end, by the database's clock, is sent to sign in again."""
    past = datetime.now(UTC) - timedelta(minutes=1)
    console.cookies.set("fp_console", forged_cookie(user="support-1", expires_at=past))
    r = console.get("/console/parks", follow_redirects=False)
    assert 303 == r.status_code
    future = datetime.now(UTC) + timedelta(hours=1)
    console.cookies.set("fp_console", forged_cookie(user="support-1", expires_at=future))
    assert 200 == console.get("/console/parks", follow_redirects=False).status_code


def test_a_session_of_a_withdrawn_admin_token_goes_back_to_sign_in(console: TestClient) -> None:
    """A session signed in with a token no longer in ADMIN_TOKENS is no session."""
    future = datetime.now(UTC) + timedelta(hours=1)
    cookie = forged_cookie(user="support-1", expires_at=future, token="withdrawn-token-0123456789")
    console.cookies.set("fp_console", cookie)
    assert 303 == console.get("/console/parks", follow_redirects=False).status_code


def test_a_tampered_session_goes_back_to_sign_in(console: TestClient) -> None:
    """A cookie whose signature does not match is no session."""
    future = datetime.now(UTC) + timedelta(hours=1)
    cookie = forged_cookie(user="support-1", expires_at=future)
    console.cookies.set("fp_console", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert 303 == console.get("/console/parks", follow_redirects=False).status_code


def test_failed_sign_in_is_audited_and_slowed(console: TestClient, sql: SQL) -> None:
    """A wrong token answers 401 after the delay, and the attempt is on record."""
    started = time.monotonic()
    r = sign_in(console, user="mallory", token="not-the-token-0123456789")
    assert 401 == r.status_code
    assert pages.FAILED_SIGN_IN_DELAY_SECONDS <= time.monotonic() - started
    entries = rows(
        sql,
        "SELECT actor_id, outcome, details FROM audit_log WHERE action = %(a)s",
        a="console.sign_in",
    )
    assert [("mallory", "unauthorized", "console")] == [
        (e["actor_id"], e["outcome"], e["details"]["via"]) for e in entries
    ]
    assert "127.0.0.1" == entries[0]["details"]["client"]["ip"]


def test_an_address_with_too_many_failures_is_refused_even_the_right_token(
    console: TestClient, sql: SQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_FAILED_SIGN_INS failures in the window, the address is refused, audited."""
    monkeypatch.setattr(pages, "FAILED_SIGN_IN_DELAY_SECONDS", 0.0)
    for _ in range(pages.MAX_FAILED_SIGN_INS):
        assert 401 == sign_in(console, token="not-the-token-0123456789").status_code
    assert 429 == sign_in(console).status_code
    outcomes = [e["outcome"] for e in rows(sql, "SELECT outcome FROM audit_log ORDER BY id")]
    assert ["too_many_sign_ins"] == outcomes[-1:]


def test_a_refused_address_is_on_record_once_per_window(
    console: TestClient, sql: SQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five more attempts from an address already refused write one too_many_sign_ins
    entry, not five (each attempt of a flood wrote a chained entry, without limit)."""
    monkeypatch.setattr(pages, "FAILED_SIGN_IN_DELAY_SECONDS", 0.0)
    for _ in range(pages.MAX_FAILED_SIGN_INS):
        assert 401 == sign_in(console, token="not-the-token-0123456789").status_code
    assert [429] * 5 == [sign_in(console).status_code for _ in range(5)]
    outcomes = [e["outcome"] for e in rows(sql, "SELECT outcome FROM audit_log ORDER BY id")]
    assert ["unauthorized"] * pages.MAX_FAILED_SIGN_INS + ["too_many_sign_ins"] == outcomes


def test_sign_in_and_out_are_audited(console: TestClient, sql: SQL) -> None:
    """Signing in and out each write an admin entry naming the user, via console."""
    sign_in(console, user="support-7")
    token = csrf_of(console.get("/console/parks").text)
    r = console.post("/console/sign-out", data={"csrf": token}, follow_redirects=False)
    assert 303 == r.status_code
    assert 303 == console.get("/console/parks", follow_redirects=False).status_code
    entries = rows(sql, "SELECT actor_type, actor_id, action, outcome FROM audit_log ORDER BY id")
    assert [
        ("admin", "support-7", "console.sign_in", "ok"),
        ("admin", "support-7", "console.sign_out", "ok"),
    ] == [(e["actor_type"], e["actor_id"], e["action"], e["outcome"]) for e in entries]


def test_a_copy_of_the_cookie_is_no_session_after_sign_out(console: TestClient, sql: SQL) -> None:
    """A copy of the session cookie taken before sign-out (stolen, or in another browser)
    is sent to sign in afterwards, and its forms change nothing (it kept working, actions
    audited as the signed-out user, until the session's end 8 h later)."""
    register(console, "p1")
    sign_in(console, user="support-7")
    stolen = console.cookies.get("fp_console")
    page = console.get("/console/parks/p1")
    token = csrf_of(page.text)
    console.post("/console/sign-out", data={"csrf": token}, follow_redirects=False)
    console.cookies.set("fp_console", stolen, path="/console")
    assert 303 == console.get("/console/parks", follow_redirects=False).status_code
    r = console.post(
        "/console/parks/p1/hold", data={"csrf": token, "reason": "x"}, follow_redirects=False
    )
    assert "/console/sign-in" == r.headers["location"].split("?")[0]
    assert [{"hold_reason": None}] == rows(sql, "SELECT hold_reason FROM parks")


def test_sign_in_returns_only_to_a_console_page(console: TestClient) -> None:
    """`next` pointing to another site is replaced by the console's own start page."""
    form = console.get("/console/sign-in")
    r = console.post(
        "/console/sign-in",
        data={
            "csrf": csrf_of(form.text),
            "user_id": "support-1",
            "token": ADMIN_TOKEN,
            "next": "//evil.example/console",
        },
        follow_redirects=False,
    )
    assert "/console/parks" == r.headers["location"]


def test_hold_and_release_are_audited_as_the_signed_in_admin_via_console(
    signed_in: TestClient, sql: SQL
) -> None:
    """The console's hold goes through the API's use case: same columns, admin entry, via."""
    register(signed_in, "p1")
    token = csrf_of(signed_in.get("/console/parks/p1").text)
    r = signed_in.post("/console/parks/p1/hold", data={"reason": " dispute #42 ", "csrf": token})
    assert 200 == r.status_code  # after the redirect to the park page
    park = rows(sql, "SELECT hold_reason, hold_by FROM parks")[0]
    assert ("dispute #42", "support-1") == (park["hold_reason"], park["hold_by"])
    assert 403 == signed_in.post("/v1/payouts/instant", headers=press_headers("p1")).status_code
    r = signed_in.post("/console/parks/p1/release", data={"csrf": token})
    assert 200 == r.status_code
    entry = rows(
        sql,
        "SELECT actor_type, actor_id, details FROM audit_log WHERE action = 'park.update'"
        " AND actor_id = 'support-1' ORDER BY id",
    )
    assert [{"hold": {"reason": "dispute #42"}}, {"hold": None}] == [
        e["details"]["changes"] for e in entry
    ]
    assert {("admin", "console")} == {(e["actor_type"], e["details"]["via"]) for e in entry}


def test_a_hold_on_an_unknown_park_registers_nothing(signed_in: TestClient, sql: SQL) -> None:
    """The console changes parks that exist: an unknown one is 404 and stays unknown."""
    token = csrf_of(signed_in.get("/console/parks").text)
    r = signed_in.post("/console/parks/ghost/hold", data={"reason": "x", "csrf": token})
    assert 404 == r.status_code
    assert [] == rows(sql, "SELECT park_id FROM parks")


def test_an_empty_or_unprintable_hold_reason_is_refused(signed_in: TestClient, sql: SQL) -> None:
    """The hold reason follows the API's rule: 1-500 printable characters."""
    register(signed_in, "p1")
    token = csrf_of(signed_in.get("/console/parks/p1").text)
    for reason in ("   ", "bad\x00nul", "x" * 501):
        r = signed_in.post("/console/parks/p1/hold", data={"reason": reason, "csrf": token})
        assert 400 == r.status_code, reason
    assert [None] == [x["hold_reason"] for x in rows(sql, "SELECT hold_reason FROM parks")]


def test_cancel_from_the_console_is_audited_as_the_admin_via_console(
    signed_in: TestClient, sql: SQL
) -> None:
    """Cancelling a pending payout runs the API's cancel: status cancelled, entry via console."""
    register(signed_in, "p1")
    payout = signed_in.post("/v1/payouts/instant", headers=press_headers("p1")).json()
    token = csrf_of(signed_in.get(f"/console/payouts/{payout['id']}").text)
    r = signed_in.post(f"/console/payouts/{payout['id']}/cancel", data={"csrf": token})
    assert 200 == r.status_code
    assert "The payout is cancelled." in r.text
    entry = rows(
        sql, "SELECT actor_type, actor_id, details FROM audit_log WHERE action = 'payout.cancel'"
    )
    assert [("admin", "support-1", "console")] == [
        (e["actor_type"], e["actor_id"], e["details"]["via"]) for e in entry
    ]


def test_cancel_of_a_taken_payout_is_refused_as_a_sentence(signed_in: TestClient, sql: SQL) -> None:
    """A payout a worker took answers 409 with the refusal's sentence, audited."""
    register(signed_in, "p1")
    payout = signed_in.post("/v1/payouts/instant", headers=press_headers("p1")).json()
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout["id"],))
    token = csrf_of(signed_in.get(f"/console/payouts/{payout['id']}").text)
    r = signed_in.post(f"/console/payouts/{payout['id']}/cancel", data={"csrf": token})
    assert 409 == r.status_code
    assert sentences.REFUSALS["payout_not_cancellable"] in r.text
    outcomes = rows(sql, "SELECT outcome FROM audit_log WHERE action = 'payout.cancel'")
    assert ["payout_not_cancellable"] == [e["outcome"] for e in outcomes]


def test_park_search_finds_by_prefix_and_takes_underscore_literally(
    signed_in: TestClient,
) -> None:
    """The search lists parks whose id starts with the text; `_` is not a wildcard."""
    for park in ("fleet_1", "fleetX1", "fleet_2", "other"):
        register(signed_in, park)
    page = signed_in.get("/console/parks", params={"q": "fleet_"}).text
    assert "fleet_1" in page and "fleet_2" in page
    assert "fleetX1" not in page and "other" not in page
    r = signed_in.get("/console/parks", params={"q": "other"}, follow_redirects=False)
    assert (303, "/console/parks/other") == (r.status_code, r.headers["location"])


def test_timeline_pages_are_newest_first_disjoint_and_complete(
    signed_in: TestClient, sql: SQL
) -> None:
    """Paging the park's timeline by its links visits every payout, event and entry once."""
    register(signed_in, "p1")
    for i in range(3):
        payout = signed_in.post("/v1/payouts/instant", headers=press_headers("p1", key=f"k{i}"))
        sql.execute(
            "UPDATE payouts SET status = 'cancelled', completed_at = now() WHERE id = %s",
            (payout.json()["id"],),
        )
    for i in range(60):
        register(signed_in, "p1", params={"i": i})
    expected = (
        rows(sql, "SELECT count(*) AS n FROM payouts")[0]["n"]
        + rows(sql, "SELECT count(*) AS n FROM events")[0]["n"]
        + rows(sql, "SELECT count(*) AS n FROM audit_log WHERE park_id = 'p1'")[0]["n"]
    )
    seen: list[str] = []
    url: str | None = "/console/parks/p1"
    pages_read = 0
    while url:
        html = signed_in.get(url).text
        pages_read += 1
        seen += re.findall(r'<time datetime="([^"]+)"', html.split('id="timeline"')[1])
        nxt = re.search(r'href="(/console/parks/p1\?cursor=[^"]+)" rel="next"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert expected == len(seen)
    assert sorted(seen, reverse=True) == seen
    assert 2 == pages_read


def test_hostile_stored_text_renders_as_text_on_every_page(signed_in: TestClient, sql: SQL) -> None:
    """Markup, quotes and odd characters stored anywhere are escaped; no page answers 500."""
    hostile = "\"'><script>alert(1)</script><img src=x onerror=alert(2)> ‮ \u00a0 ☃"
    register(signed_in, "p1")
    # A user id is any visible ASCII: markup and quotes included.
    user = "\"'><script>alert(3)</script>"
    payout = signed_in.post("/v1/payouts/instant", headers=press_headers("p1", user=user)).json()
    sql.execute(
        "UPDATE parks SET hold_reason = %(h)s, hold_by = %(h)s, hold_since = now()",
        {"h": hostile},
    )
    sql.execute(
        "UPDATE payouts SET failure_message = %(h)s WHERE id = %(id)s",
        {"h": hostile, "id": payout["id"]},
    )
    sql.execute(
        "INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)"
        " VALUES ('admin', %(h)s, 'p1', %(h)s, %(h)s, %(id)s,"
        " jsonb_build_object(%(h)s::text, %(h)s::text))",
        {"h": hostile, "id": payout["id"]},
    )
    for path in (
        "/console/parks/p1",
        f"/console/payouts/{payout['id']}",
        "/console/audit?park_id=p1",
        "/console/parks?q=p",
        "/console/parks?q=" + hostile,
    ):
        r = signed_in.get(path)
        assert r.status_code in (200, 400), (path, r.status_code)
        assert "<script>alert" not in r.text, path
        assert "<img src=x" not in r.text, path


def test_pages_answer_503_not_500_while_the_database_is_unreachable() -> None:
    """With no database a signed-in page says so as a 503 page with Retry-After."""
    down = "postgresql://postgres@127.0.0.1:9/nowhere"
    with console_client(down, api_pool_timeout_seconds=0.5) as c:
        future = datetime.now(UTC) + timedelta(hours=1)
        c.cookies.set("fp_console", forged_cookie(user="support-1", expires_at=future))
        r = c.get("/console/parks")
        assert 503 == r.status_code
        assert "2" == r.headers["retry-after"]
        assert sentences.REFUSALS["unavailable"] in r.text
        assert 200 == c.get("/console/sign-in").status_code


def test_audit_search_pages_through_every_matching_entry(signed_in: TestClient, sql: SQL) -> None:
    """The audit page's Older links visit each entry of the filter once, newest first."""
    for i in range(70):
        register(signed_in, "p1", params={"i": i})
    expected = rows(sql, "SELECT count(*) AS n FROM audit_log WHERE park_id = 'p1'")[0]["n"]
    seen: list[str] = []
    url: str | None = "/console/audit?park_id=p1"
    while url:
        r = signed_in.get(url)
        assert 200 == r.status_code, r.text
        seen += re.findall(r'<time datetime="([^"]+)"', r.text)
        nxt = re.search(r'<a href="([^"]+)" rel="next">', r.text)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert expected == len(seen)
    assert sorted(seen, reverse=True) == seen
    assert 400 == signed_in.get("/console/audit?park_id=p1&cursor=WyJ4Il0").status_code


def request_manual(c: TestClient, park: str, amount: str = "250.00") -> str:
    """The console's request form, filled in and sent; the new payout's id."""
    page = c.get("/console/approvals").text
    key = re.search(r'name="key" value="([^"]+)"', page)
    assert key is not None
    r: httpx.Response = c.post(
        "/console/approvals",
        data={
            "csrf": csrf_of(page),
            "key": key.group(1),
            "park_id": park,
            "amount": amount,
            "reason": "goodwill",
        },
        follow_redirects=False,
    )
    assert 303 == r.status_code, r.text
    return r.headers["location"].split("/console/payouts/")[1].split("?")[0]


def test_manual_payout_four_eyes_through_the_console_is_audited_via_console(
    db_url: str, sql: SQL
) -> None:
    """Requested by one admin, approval refused to them (403 with the sentence), approved by
    another: each step runs the API's use case and is audited as that admin, via console."""
    with console_client(db_url) as first, console_client(db_url) as second:
        register(first, "p1")
        sign_in(first, user="support-1")
        sign_in(second, user="support-2")
        payout_id = request_manual(first, "p1")
        page = first.get(f"/console/payouts/{payout_id}").text
        assert "pending_approval" in page
        r = first.post(f"/console/payouts/{payout_id}/approve", data={"csrf": csrf_of(page)})
        assert 403 == r.status_code
        assert sentences.REFUSALS["self_approval_forbidden"] in r.text
        page = second.get(f"/console/payouts/{payout_id}").text
        r = second.post(f"/console/payouts/{payout_id}/approve", data={"csrf": csrf_of(page)})
        assert 200 == r.status_code
        assert sentences.DONE["approve"] in r.text
    entries = rows(
        sql,
        "SELECT actor_id, action, outcome, details->>'via' AS via FROM audit_log"
        " WHERE action LIKE 'payout.manual.%%' ORDER BY id",
    )
    assert [
        ("support-1", "payout.manual.request", "ok", "console"),
        ("support-1", "payout.manual.approve", "self_approval_forbidden", "console"),
        ("support-2", "payout.manual.approve", "ok", "console"),
    ] == [(e["actor_id"], e["action"], e["outcome"], e["via"]) for e in entries]
    assert ["pending"] == [x["status"] for x in rows(sql, "SELECT status FROM payouts")]


def test_a_denied_manual_payout_leaves_the_queue(signed_in: TestClient, sql: SQL) -> None:
    """Deny with a reason ends the request `denied`; the approvals queue no longer lists it."""
    register(signed_in, "p1")
    payout_id = request_manual(signed_in, "p1")
    assert payout_id in signed_in.get("/console/approvals").text
    page = signed_in.get(f"/console/payouts/{payout_id}").text
    r = signed_in.post(
        f"/console/payouts/{payout_id}/deny", data={"csrf": csrf_of(page), "reason": "duplicate"}
    )
    assert 200 == r.status_code
    assert ["denied"] == [x["status"] for x in rows(sql, "SELECT status FROM payouts")]
    assert payout_id not in signed_in.get("/console/approvals").text


def test_paid_option_is_set_and_cleared_through_the_api_s_use_case(
    signed_in: TestClient, sql: SQL
) -> None:
    """The fee and the end date saved in the console are the park's; empty fields clear them."""
    register(signed_in, "p1")
    token = csrf_of(signed_in.get("/console/parks/p1").text)
    form = {"csrf": token, "fee_percent": "1.50", "fee_fixed": "2.00"}
    r = signed_in.post(
        "/console/parks/p1/paid-option", data={**form, "until": "2030-01-01T00:00:00Z"}
    )
    assert 200 == r.status_code
    park = rows(
        sql, "SELECT instant_fee_percent, instant_fee_fixed, instant_payouts_until FROM parks"
    )[0]
    assert ("1.50", "2.00", 2030) == (
        str(park["instant_fee_percent"]),
        str(park["instant_fee_fixed"]),
        park["instant_payouts_until"].year,
    )
    bad = signed_in.post("/console/parks/p1/paid-option", data={**form, "fee_percent": "101"})
    assert 400 == bad.status_code
    signed_in.post("/console/parks/p1/paid-option", data={"csrf": token})
    park = rows(sql, "SELECT instant_fee_percent, instant_payouts_until FROM parks")[0]
    assert (None, None) == (park["instant_fee_percent"], park["instant_payouts_until"])
