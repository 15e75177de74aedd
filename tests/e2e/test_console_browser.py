"""The support console in a real browser (issue 20): headless Chromium (Debian's
`chromium`, driven by Playwright) against a real `serve` on the suite's PostgreSQL and
the Billing emulator. One browser and one API process for the module; a fresh browser
context (no cookies) per test.

Every page a test shows is saved as a PNG under the run's temporary directory
(`console-screenshots`, or $CONSOLE_SCREENSHOTS), the last one of each test included,
so a person can look at what the test saw.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from service.ops import roles
from service.web.console import manual, sentences
from tests.conftest import (
    ADMIN_TOKEN,
    TEMPLATE,
    create_database,
    drop_database,
    service_env,
    with_user,
)
from tests.helpers.api import TIMEOUT, admin_headers, press_headers
from tests.helpers.console import SECRET, forged_cookie
from tests.helpers.emulator import free_port
from tests.helpers.procs import Cluster, cluster, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


# --- one browser, one database, one API for the module -----------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    with sync_playwright() as p:
        # Debian's Chromium: Playwright's own browser download is not reachable here.
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def console_db(pg_server_url: str, template_url: str) -> Iterator[str]:
    url = create_database(pg_server_url, template=TEMPLATE)
    yield url
    drop_database(pg_server_url, url)


@pytest.fixture(scope="module")
def hosts(
    console_db: str, emulator_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    env = service_env(with_user(console_db, roles.ROLES.app), emulator_url, CONSOLE_SECRET=SECRET)
    with cluster(env, tmp_path_factory.mktemp("console-logs")) as c:
        c.api()
        yield c


@pytest.fixture(scope="module")
def api(hosts: Cluster) -> str:
    assert hosts.api_url is not None
    return hosts.api_url


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("CONSOLE_SCREENSHOTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Console:
    """One browser context on the console: cookies of its own, screenshots named by test."""

    def __init__(self, context: BrowserContext, api: str, shots: Path, test: str) -> None:
        self.context = context
        self.api = api
        self.page: Page = context.new_page()
        self.shots = shots
        self.test = test
        self.count = 0
        # Alerts would mean injected script ran; confirms are our "are you sure?".
        self.dialogs: list[str] = []
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept()

    def shot(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=self.shots / f"{self.test}-{self.count:02d}-{name}.png")

    def goto(self, path: str, name: str) -> None:
        self.page.goto(self.api + path)
        self.shot(name)

    def sign_in(self, user: str = "support-1", token: str = ADMIN_TOKEN) -> None:
        self.page.goto(self.api + "/console")
        assert "/console/sign-in" in self.page.url
        self.page.fill("#user_id", user)
        self.page.fill("#token", token)
        self.shot("sign-in")
        self.page.click("button[type=submit]")
        assert user == self.page.inner_text("#who")

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)


@pytest.fixture
def console(
    browser: Browser, api: str, shots: Path, request: pytest.FixtureRequest
) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    name = re.sub(r"[^a-z0-9_]+", "-", request.node.name.removeprefix("test_"))[:60]
    c = Console(context, api, shots, name)
    try:
        yield c
    finally:
        # The page as the test left it: the first thing to look at when it failed.
        c.page.screenshot(path=shots / f"{name}-last.png", full_page=True)
        context.close()


# --- the API, as Opteum and admins call it -----------------------------------------------


def register(api: str, park: str) -> None:
    r = httpx.put(
        f"{api}/v1/parks/{park}",
        json={"instant_payouts_enabled": True},
        headers=admin_headers(),
        timeout=TIMEOUT,
    )
    assert r.status_code in (200, 201), r.text


def press(api: str, park: str) -> httpx.Response:
    return httpx.post(
        f"{api}/v1/payouts/instant",
        headers=press_headers(park, key=uuid.uuid4().hex),
        timeout=TIMEOUT,
    )


def park_row(db_url: str, park: str) -> dict[str, Any]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM parks WHERE park_id = %s", (park,)).fetchone()
    assert row is not None
    return row


# --- the tests ---------------------------------------------------------------------------


def test_sign_in_find_a_park_hold_it_see_a_press_refused_and_release_it(
    console: Console, api: str
) -> None:
    """Support signs in, finds the park by prefix, holds it (a press is refused, the
    timeline shows it), releases it, and the next press is accepted."""
    register(api, "brw-hold-1")
    console.sign_in()
    console.page.fill("#q", "brw-hold")
    console.page.click("button:has-text('Search')")
    console.shot("search")
    console.page.click("a:has-text('brw-hold-1')")
    assert "Available" == console.text("#availability")
    console.shot("park")

    console.page.fill("#reason", "dispute #42")
    console.page.click("#put-on-hold")
    assert sentences.DONE["hold"] == console.text(".done")
    assert sentences.AVAILABILITY["park_on_hold"] in console.text("#availability")
    refused = press(api, "brw-hold-1")
    assert (403, "park_on_hold") == (refused.status_code, refused.json()["code"])
    console.page.reload()
    assert "payout.instant.request → park_on_hold" in console.text("#timeline")
    console.shot("on-hold")

    console.page.click("#release")  # confirmed in the dialog
    assert sentences.DONE["release"] == console.text(".done")
    assert "Available" == console.text("#availability")
    assert 202 == press(api, "brw-hold-1").status_code
    console.page.reload()
    assert "pending" in console.text("#in-flight")
    console.shot("released")


def test_cancel_a_pending_payout(console: Console, api: str) -> None:
    """A payout no worker has taken is cancelled from its page, as the API would."""
    register(api, "brw-cancel-1")
    payout = press(api, "brw-cancel-1").json()
    console.sign_in()
    console.goto(f"/console/payouts/{payout['id']}", "payout")
    assert "pending" == console.text("#status")
    console.page.click("#cancel")
    assert sentences.DONE["cancel"] == console.text(".done")
    assert "cancelled" == console.text("#status")
    assert "payout.cancel" in console.text("#trail")
    assert "payout.cancelled" in console.text("#events")
    console.shot("cancelled")
    r = httpx.get(
        f"{api}/v1/payouts/{payout['id']}", headers=press_headers("brw-cancel-1"), timeout=TIMEOUT
    )
    assert "cancelled" == r.json()["status"]


def test_markup_and_quotes_in_a_park_id_and_a_hold_reason_render_as_text(
    console: Console, api: str
) -> None:
    """A hold reason and a searched park id holding <script> and quotes show as typed and
    run nothing: no alert, our one script element only."""
    register(api, "brw-xss-1")
    console.sign_in()
    reason = "<script>alert(1)</script> \"double\" 'single' <b>bold</b>"
    console.goto("/console/parks/brw-xss-1", "park")
    console.page.fill("#reason", reason)
    console.page.click("#put-on-hold")
    assert reason == console.text("#hold-reason")
    assert "<script>alert(1)</script>" in console.text("#timeline")  # in the JSON details
    assert 1 == console.page.locator("script").count()
    console.shot("hold-reason")

    hostile_id = "\"><script>alert(2)</script>'"
    console.page.goto(f"{api}/console/parks?{urlencode({'q': hostile_id})}")
    assert hostile_id == console.page.input_value("#q")
    assert 1 == console.page.locator("script").count()
    console.shot("search")
    console.page.goto(api + "/console/parks/%3Cscript%3Ealert(3)%3Cb%3E%22")
    assert sentences.REFUSALS["park_not_found"] == console.text(".error")
    console.shot("park-not-found")
    assert [] == [d for d in console.dialogs if d.startswith("alert")]


def test_a_cross_site_post_without_the_csrf_token_is_refused(
    console: Console, api: str, console_db: str
) -> None:
    """A form on another site posting to the console changes nothing, and neither does a
    POST with the signed-in cookie but without the form's token."""
    register(api, "brw-csrf-1")
    console.sign_in()
    port = free_port()
    target = f"{api}/console/parks/brw-csrf-1/hold"
    attack = (
        f'<form id="f" method="post" action="{target}">'
        '<input name="reason" value="forged"></form>'
        "<script>document.getElementById('f').submit()</script>"
    ).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Attacker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # "localhost" is another site than 127.0.0.1: the SameSite=Strict cookie stays home.
        with console.page.expect_navigation(url=re.compile(r".*/console/.*")):
            console.page.goto(f"http://localhost:{port}/")
        console.shot("after-forged-post")
    finally:
        server.shutdown()
        server.server_close()
    assert park_row(console_db, "brw-csrf-1")["hold_reason"] is None

    # The browser's own cookie, the token left out: refused by the token check.
    r = console.context.request.post(target, form={"reason": "forged"}, max_redirects=0)
    assert 403 == r.status
    assert sentences.REFUSALS["csrf"] in r.text()
    assert park_row(console_db, "brw-csrf-1")["hold_reason"] is None


def test_an_expired_session_goes_back_to_sign_in(console: Console, api: str) -> None:
    """A session past its end sends every page to sign-in, which then returns to the page."""
    register(api, "brw-expired-1")
    console.sign_in()
    host = httpx.URL(api).host
    expired = forged_cookie(user="support-1", expires_at=datetime.now(UTC) - timedelta(hours=1))
    console.context.add_cookies(
        [{"name": "fp_console", "value": expired, "domain": host, "path": "/console"}]
    )
    console.goto("/console/parks/brw-expired-1", "expired")
    assert "/console/sign-in" in console.page.url
    console.page.fill("#user_id", "support-1")
    console.page.fill("#token", ADMIN_TOKEN)
    console.page.click("button[type=submit]")
    assert console.page.url.endswith("/console/parks/brw-expired-1")
    assert "brw-expired-1" == console.text("#park-id")


@pytest.mark.skipif(not manual.AVAILABLE, reason="manual payouts are not in this version")
def test_manual_payout_needs_a_second_admin_and_then_succeeds(
    console: Console, browser: Browser, api: str, hosts: Cluster, emulator_url: str
) -> None:
    """One admin requests a manual payout; approving it is refused to them and accepted
    from another admin, and it reaches succeeded."""
    from tests.helpers.api import set_balance

    register(api, "brw-manual-1")
    set_balance(emulator_url, "brw-manual-1", "1000.00")
    hosts.worker(concurrency=2)
    console.sign_in("support-1")
    console.goto("/console/approvals", "approvals")
    console.page.fill("#park_id", "brw-manual-1")
    console.page.fill("#amount", "250.00")
    console.page.fill("#manual-reason", "goodwill: ticket 7")
    console.page.click("#request")
    assert "pending_approval" == console.text("#status")
    payout_url = console.page.url.split("?")[0]
    console.page.click("#approve")
    assert sentences.REFUSALS["self_approval_forbidden"] == console.text(".error")
    console.shot("self-approval")

    other = Console(
        browser.new_context(viewport={"width": 1200, "height": 900}),
        api,
        console.shots,
        console.test + "-second",
    )
    try:
        other.sign_in("support-2")
        other.page.goto(payout_url)
        other.page.click("#approve")
        assert sentences.DONE["approve"] == other.text(".done")

        def succeeded() -> bool:
            other.page.reload()
            return other.text("#status") == "succeeded"

        wait_for(succeeded, timeout=30, what="the approved manual payout to succeed")
        other.shot("succeeded")
    finally:
        other.context.close()
