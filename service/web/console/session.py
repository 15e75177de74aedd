"""The console's sign-in state: a signed session cookie, and the CSRF token its forms carry.

The cookie holds the user id, a fingerprint of the admin token they signed in with
(so that removing the token from ADMIN_TOKENS ends its sessions), the session's CSRF
token and its end, on the database's clock like every time rule here. It is signed
with CONSOLE_SECRET (itsdangerous), `HttpOnly`, `SameSite=Strict`, `Secure` over
HTTPS, and scoped to /console.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
from datetime import datetime, timedelta

from itsdangerous import BadSignature, URLSafeSerializer
from starlette.requests import Request
from starlette.responses import Response

from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.core.values import format_timestamp, is_visible_ascii, parse_timestamp

COOKIE = "fp_console"
# Before sign-in: the CSRF token of the sign-in form itself (a forged sign-in
# would put a victim into an attacker's session).
PRE_COOKIE = "fp_console_pre"
PATH = "/console"
PRE_COOKIE_SECONDS = 3600


class SignInRequired(Exception):
    """No session, an expired or forged one, or one whose admin token was withdrawn."""


@dataclasses.dataclass(frozen=True)
class Session:
    user_id: str
    token_fingerprint: str
    csrf: str
    expires_at: datetime


def _serializer(settings: Settings, salt: str) -> URLSafeSerializer:
    if settings.console_secret is None:
        raise InvariantError("settings.console_secret is not None")
    return URLSafeSerializer(settings.console_secret.reveal(), salt=salt)


def token_fingerprint(settings: Settings, token: str) -> str:
    """Names the admin token without revealing it (the cookie is the browser's to read)."""
    if settings.console_secret is None:
        raise InvariantError("settings.console_secret is not None")
    key = settings.console_secret.reveal().encode()
    return hmac.new(key, b"admin-token:" + token.encode(), hashlib.sha256).hexdigest()[:32]


def matching_admin_token(settings: Settings, presented: str) -> bool:
    """Whether `presented` is one of ADMIN_TOKENS; constant time, every token compared."""
    found = False
    for token in settings.admin_tokens:
        found |= hmac.compare_digest(presented.encode(), token.reveal().encode())
    return found


def new_session(settings: Settings, user_id: str, token: str, now: datetime) -> Session:
    return Session(
        user_id=user_id,
        token_fingerprint=token_fingerprint(settings, token),
        csrf=secrets.token_urlsafe(24),
        expires_at=now + timedelta(hours=settings.console_session_hours),
    )


def encode(settings: Settings, session: Session) -> str:
    return str(
        _serializer(settings, "session").dumps(
            {
                "u": session.user_id,
                "k": session.token_fingerprint,
                "c": session.csrf,
                "e": format_timestamp(session.expires_at),
            }
        )
    )


def read(settings: Settings, request: Request, now: datetime) -> Session:
    """The request's valid session at `now` (the database's clock), else SignInRequired."""
    raw = request.cookies.get(COOKIE)
    if not raw:
        raise SignInRequired
    try:
        data = _serializer(settings, "session").loads(raw)
        session = Session(
            user_id=str(data["u"]),
            token_fingerprint=str(data["k"]),
            csrf=str(data["c"]),
            expires_at=parse_timestamp(str(data["e"])),
        )
    except (BadSignature, KeyError, TypeError, ValueError):
        raise SignInRequired from None
    if session.expires_at <= now or not is_visible_ascii(session.user_id, 128):
        raise SignInRequired
    current = {token_fingerprint(settings, t.reveal()) for t in settings.admin_tokens}
    if not any(hmac.compare_digest(session.token_fingerprint, f) for f in current):
        raise SignInRequired
    return session


def session_id(session: Session) -> str:
    """Names one session (for its sign-out entry) without revealing its CSRF token."""
    return hashlib.sha256(b"session:" + session.csrf.encode()).hexdigest()[:32]


def issued_at(settings: Settings, session: Session) -> datetime:
    return session.expires_at - timedelta(hours=settings.console_session_hours)


def has_cookie(request: Request) -> bool:
    return bool(request.cookies.get(COOKIE))


def is_https(request: Request, settings: Settings) -> bool:
    """Served over HTTPS: directly, or at a proxy among TRUSTED_PROXIES that says so."""
    if request.url.scheme == "https":
        return True
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    if forwarded != "https":
        return False
    try:
        peer = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return False
    return any(peer in net for net in settings.trusted_proxies)


def set_cookie(
    response: Response,
    request: Request,
    settings: Settings,
    name: str,
    value: str,
    max_age: int | None,
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PATH,
        secure=is_https(request, settings),
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, request: Request, settings: Settings, name: str) -> None:
    response.delete_cookie(
        name, path=PATH, secure=is_https(request, settings), httponly=True, samesite="strict"
    )


def pre_token(settings: Settings, request: Request) -> tuple[str, str | None]:
    """The sign-in form's CSRF token, and the cookie value to set when it is new."""
    raw = request.cookies.get(PRE_COOKIE)
    if raw:
        try:
            token = _serializer(settings, "pre").loads(raw)
            if isinstance(token, str):
                return token, None
        except BadSignature:
            pass
    token = secrets.token_urlsafe(24)
    return token, str(_serializer(settings, "pre").dumps(token))


def pre_token_matches(settings: Settings, request: Request, given: str) -> bool:
    raw = request.cookies.get(PRE_COOKIE)
    if not raw or not given:
        return False
    try:
        token = _serializer(settings, "pre").loads(raw)
    except BadSignature:
        return False
    return isinstance(token, str) and hmac.compare_digest(token.encode(), given.encode())


def csrf_matches(session: Session, given: str) -> bool:
    return bool(given) and hmac.compare_digest(session.csrf.encode(), given.encode())
