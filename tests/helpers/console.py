"""Helpers for the console's tests: sign in over plain HTTP, read a form's CSRF token,
and forge the session cookie a browser would hold (the tests know CONSOLE_SECRET)."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
from starlette.testclient import TestClient

from service.web.console import session as sessions
from tests.conftest import ADMIN_TOKEN, make_settings

SECRET = "test-console-secret-0123456789abcdef"
_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')

Client = TestClient | httpx.Client


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    found = _CSRF_RE.search(html)
    assert found is not None, html[:2000]
    return found.group(1)


def sign_in(client: Client, user: str = "support-1", token: str = ADMIN_TOKEN) -> httpx.Response:
    """The sign-in form, filled in and sent, as a browser would (not following the redirect)."""
    form = client.get("/console/sign-in")
    assert 200 == form.status_code, form.text
    return client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "user_id": user, "token": token, "next": "/console"},
        follow_redirects=False,
    )


def forged_cookie(*, user: str, expires_at: datetime, token: str = ADMIN_TOKEN) -> str:
    """A session cookie signed with the suite's secret, ending at `expires_at`."""
    settings = make_settings("postgresql://unused", console_secret=SECRET)
    session = sessions.Session(
        user_id=user,
        token_fingerprint=sessions.token_fingerprint(settings, token),
        csrf="forged-csrf-token",
        expires_at=expires_at,
    )
    return sessions.encode(settings, session)
