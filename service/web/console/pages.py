"""The support console's pages and actions (SPEC section 9), server-rendered.

Every page goes through `page` (session, errors, security headers) and every action
through `action` (session, CSRF, then the same use case as the API's endpoint, audited
with the signed-in user and "via": "console"). A refusal is shown as a sentence from
service/web/console/sentences.py with the API's status code; success redirects (303)
to the page that shows the result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode

import psycopg
import psycopg_pool
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from service.audit import store as audit
from service.core import db
from service.core.invariant import InvariantError
from service.core.settings import Settings
from service.core.values import is_park_id, parse_money
from service.parks import admin as park_admin
from service.parks import store as parks
from service.parks.fees import Fee, parse_fee_fixed, parse_fee_percent
from service.payouts import cancel, instant
from service.payouts import store as payouts
from service.support import store as support
from service.web import cursors, params, views
from service.web.console import manual, sentences
from service.web.console import session as sessions
from service.web.errors import STATUS, ApiError
from service.web.origin import client_details, client_ip
from service.web.state import admin_pool_of, pool_of, request_id_of, settings_of

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
SEARCH_LIMIT = 50
MAX_FORM_BYTES = 16 * 1024
# A failed sign-in answers after this long, whoever sends it: guessing tokens at
# one try a second per connection, and each try on record.
FAILED_SIGN_IN_DELAY_SECONDS = 1.0
# Past this many failed sign-ins from one address in the window, that address is
# refused without looking at what it sends, until the window moves on.
MAX_FAILED_SIGN_INS = 10
# Sign-ins using a database connection at once, per process (the rest wait without one).
SIGN_IN_CONCURRENCY = 2
_sign_in_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def sign_in_slots() -> asyncio.Semaphore:
    """This event loop's sign-in slots (a semaphore belongs to one loop; tests run several)."""
    loop = asyncio.get_running_loop()
    slots = _sign_in_slots.get(loop)
    if slots is None:
        slots = _sign_in_slots[loop] = asyncio.Semaphore(SIGN_IN_CONCURRENCY)
    return slots


SIGN_IN_WINDOW_MINUTES = 15
SIGN_IN_ACTION = "console.sign_in"
SIGN_OUT_ACTION = "console.sign_out"
VIA = "console"
# The signed cursors' purpose for a park's timeline (service/web/cursors.py).
TIMELINE = "console-timeline"

SECURITY_HEADERS = {
    # Our own stylesheet and script only; nothing inline, nothing from another site.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def when(value: str | None) -> str:
    """An RFC 3339 UTC timestamp as people read it (the full one stays in <time datetime>)."""
    if not value:
        return ""
    return value[:19].replace("T", " ") + " UTC"


_env = Environment(
    loader=PackageLoader("service.web.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
_env.filters["when"] = when
templates = Jinja2Templates(env=_env)


class Refusal(Exception):
    """An action or page refused with an API code, shown as its sentence."""

    def __init__(self, code: str, detail: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail

    @property
    def status(self) -> int:
        if self.code == "csrf":
            return 403
        if self.code == "too_many_sign_ins":
            return 429
        if self.code == "manual_unavailable":
            return 404
        return STATUS.get(self.code, 409)


Handler = Callable[[Request, sessions.Session], Awaitable[Response]]


# --- the frame every page and action runs in ------------------------------------------


def secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


async def current_session(request: Request) -> sessions.Session:
    if not sessions.has_cookie(request):
        raise sessions.SignInRequired
    settings = settings_of(request)
    async with admin_pool_of(request).connection() as conn:
        now = await support.now(conn)
        session = sessions.read(settings, request, now)
        if await support.signed_out(
            conn,
            action=SIGN_OUT_ACTION,
            user_id=session.user_id,
            issued_at=sessions.issued_at(settings, session),
            session=sessions.session_id(session),
        ):
            raise sessions.SignInRequired
    return session


def to_sign_in(request: Request) -> Response:
    target = request.url.path
    if request.method == "GET" and request.url.query:
        target += "?" + request.url.query
    return RedirectResponse("/console/sign-in?" + urlencode({"next": target}), status_code=303)


def page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A page or action for signed-in users: a missing or expired session goes to sign-in."""

    async def endpoint(request: Request) -> Response:
        try:
            session = await current_session(request)
            if request.method == "POST":
                await check_csrf(request, session)
            response = await handler(request, session)
        except sessions.SignInRequired:
            response = to_sign_in(request)
        except Refusal as refusal:
            response = error_page(request, refusal, None)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            logger.warning("console: database unavailable: %s", type(exc).__name__)
            response = error_page(request, Refusal("unavailable"), None)
            response.headers["Retry-After"] = "2"
        return secure(response)

    endpoint.__name__ = handler.__name__
    return endpoint


def open_page(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A page without a session (sign-in, the stylesheet), with the same headers and errors."""

    async def endpoint(request: Request) -> Response:
        try:
            response = await handler(request)
        except Refusal as refusal:
            response = error_page(request, refusal, None)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            logger.warning("console: database unavailable: %s", type(exc).__name__)
            response = error_page(request, Refusal("unavailable"), None)
        return secure(response)

    endpoint.__name__ = handler.__name__
    return endpoint


def render(
    request: Request,
    name: str,
    session: sessions.Session | None,
    status_code: int = 200,
    **context: Any,
) -> Response:
    done = request.query_params.get("done")
    return templates.TemplateResponse(
        request,
        name,
        {
            "user": session.user_id if session else None,
            "csrf": session.csrf if session else None,
            "done": sentences.DONE.get(done) if done else None,
            "manual_available": manual.AVAILABLE,
            "request_id": request_id_of(request),
            **context,
        },
        status_code=status_code,
    )


def error_page(request: Request, refusal: Refusal, session: sessions.Session | None) -> Response:
    return render(
        request,
        "error.html",
        session,
        status_code=refusal.status,
        error=sentences.refusal(refusal.code),
        detail=refusal.detail,
    )


async def form(request: Request) -> dict[str, str]:
    """The urlencoded body as a dict (last value wins); anything else is refused."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refusal("invalid_request", "The form is too large.")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=50, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        raise Refusal("invalid_request") from None
    return dict(pairs)


async def check_csrf(request: Request, session: sessions.Session) -> None:
    """Every form carries the session's token, and comes from this origin if it says."""
    if not _same_origin(request):
        raise Refusal("csrf")
    fields = await form(request)
    request.state.console_form = fields
    if not sessions.csrf_matches(session, fields.get("csrf", "")):
        raise Refusal("csrf")


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True  # older browsers and curl; the CSRF token still decides
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def fields_of(request: Request) -> dict[str, str]:
    fields: dict[str, str] = request.state.console_form
    return fields


def client(request: Request) -> dict[str, Any]:
    return client_details(request)


def park_id_of(request: Request) -> str:
    park_id = str(request.path_params["park_id"])
    if not is_park_id(park_id):
        raise Refusal("park_not_found")
    return park_id


def payout_id_of(request: Request) -> uuid.UUID:
    try:
        return uuid.UUID(str(request.path_params["payout_id"]))
    except ValueError:
        raise Refusal("payout_not_found") from None


def done(url: str, what: str) -> Response:
    sep = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{sep}done={what}", status_code=303)


# --- sign-in ---------------------------------------------------------------------------


async def sign_in_form(request: Request) -> Response:
    settings = settings_of(request)
    token, cookie = sessions.pre_token(settings, request)
    response = render(
        request, "sign_in.html", None, pre_csrf=token, next=_next(request.query_params.get("next"))
    )
    if cookie is not None:
        sessions.set_cookie(
            response, request, settings, sessions.PRE_COOKIE, cookie, sessions.PRE_COOKIE_SECONDS
        )
    return response


def _next(raw: str | None) -> str:
    # Only a path of the console itself: never an open redirect to another site.
    if raw and raw.startswith("/console") and "//" not in raw and "\\" not in raw:
        return raw
    return "/console/parks"


async def sign_in(request: Request) -> Response:
    settings = settings_of(request)
    fields = await form(request)
    if not _same_origin(request) or not sessions.pre_token_matches(
        settings, request, fields.get("csrf", "")
    ):
        raise Refusal("csrf")
    user_id = fields.get("user_id", "").strip()
    token = fields.get("token", "").strip()
    next_url = _next(fields.get("next"))
    ip = client_ip(request)
    # Sign-in is open to anyone: a flood of it must not take the presses' connections
    # (each attempt writes a chained audit entry), so a few at a time, the rest wait here.
    async with sign_in_slots(), pool_of(request).connection() as conn, conn.transaction():
        if ip is not None:
            await support.lock_sign_ins(conn, ip=ip)
        failures = await _recent_failures(conn, ip)
        if failures >= MAX_FAILED_SIGN_INS:
            outcome = "too_many_sign_ins"
        elif not params.is_user_id(user_id) or not sessions.matching_admin_token(settings, token):
            outcome = "unauthorized"
        else:
            outcome = "ok"
            now = await support.now(conn)
        # An address already refused is on record once per window: a flood of refused
        # attempts would otherwise write an entry each to the append-only log, and keep
        # its own count (and so the refusal) up for as long as it lasts.
        if outcome != "too_many_sign_ins" or failures == MAX_FAILED_SIGN_INS:
            await _audit_sign_in(request, conn, user_id, outcome)
    # The delay without the connection (or the slot) in hand: a caller waiting out its
    # delay holds nothing anyone else needs.
    if outcome == "too_many_sign_ins":
        await asyncio.sleep(FAILED_SIGN_IN_DELAY_SECONDS)
        raise Refusal("too_many_sign_ins")
    if outcome == "unauthorized":
        await asyncio.sleep(FAILED_SIGN_IN_DELAY_SECONDS)
        pre, _ = sessions.pre_token(settings, request)
        return render(
            request,
            "sign_in.html",
            None,
            status_code=401,
            error=sentences.refusal("unauthorized"),
            pre_csrf=pre,
            next=next_url,
            user_id=user_id if params.is_user_id(user_id) else "",
        )
    new = sessions.new_session(settings, user_id, token, now)
    response = RedirectResponse(next_url, status_code=303)
    max_age = int(settings.console_session_hours * 3600)
    sessions.set_cookie(
        response, request, settings, sessions.COOKIE, sessions.encode(settings, new), max_age
    )
    sessions.clear_cookie(response, request, settings, sessions.PRE_COOKIE)
    return response


async def _recent_failures(conn: db.Conn, ip: str | None) -> int:
    if ip is None:
        return 0
    return await support.failed_sign_ins(
        conn, action=SIGN_IN_ACTION, ip=ip, minutes=SIGN_IN_WINDOW_MINUTES
    )


async def _audit_sign_in(request: Request, conn: db.Conn, user_id: str, outcome: str) -> None:
    async with conn.transaction():
        await audit.write(
            conn,
            audit.Entry(
                actor_type="admin",
                # What was typed, when it could be a user id at all: the log says who tried.
                actor_id=user_id if params.is_user_id(user_id) else None,
                action=SIGN_IN_ACTION,
                outcome=outcome,
                request_id=request_id_of(request),
                details={"via": VIA, "client": client(request)},
            ),
        )


async def sign_out(request: Request, session: sessions.Session) -> Response:
    settings = settings_of(request)
    async with pool_of(request).connection() as conn, conn.transaction():
        await audit.write(
            conn,
            audit.Entry(
                actor_type="admin",
                actor_id=session.user_id,
                action=SIGN_OUT_ACTION,
                outcome="ok",
                request_id=request_id_of(request),
                # Names the session: every page refuses it from now on (current_session).
                details={
                    "via": VIA,
                    "client": client(request),
                    "session": sessions.session_id(session),
                },
            ),
        )
    response = RedirectResponse("/console/sign-in?done=signed_out", status_code=303)
    sessions.clear_cookie(response, request, settings, sessions.COOKIE)
    return response


async def home(request: Request) -> Response:
    return RedirectResponse("/console/parks", status_code=303)


# --- parks -----------------------------------------------------------------------------


async def park_search(request: Request, session: sessions.Session) -> Response:
    query = request.query_params.get("q", "").strip()
    found: list[support.ParkFound] = []
    problem = None
    if query and not is_park_id(query):
        problem = "A park id is 1-64 letters, digits, _ or -."
    elif query:
        async with admin_pool_of(request).connection() as conn:
            found = await support.search_parks(conn, query, limit=SEARCH_LIMIT + 1)
        if len(found) == 1 and found[0].park_id == query:
            return RedirectResponse(f"/console/parks/{query}", status_code=303)
    return render(
        request,
        "parks.html",
        session,
        query=query,
        parks=found[:SEARCH_LIMIT],
        more=len(found) > SEARCH_LIMIT,
        problem=problem,
    )


async def park_page(request: Request, session: sessions.Session) -> Response:
    return await _park_page(request, session, park_id_of(request))


async def _park_page(
    request: Request,
    session: sessions.Session,
    park_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    settings = settings_of(request)
    after = _timeline_cursor(settings, request.query_params.get("cursor"))
    async with admin_pool_of(request).connection() as conn:
        row = await parks.get(conn, park_id)
        if row is None:
            raise Refusal("park_not_found")
        decision = await instant.availability(conn, settings, park_id)
        flight = await support.in_flight(conn, park_id)
        entries = await support.timeline(conn, park_id, limit=PAGE_SIZE + 1, after=after)
    more = len(entries) > PAGE_SIZE
    entries = entries[:PAGE_SIZE]
    next_cursor = (
        cursors.sign(
            cursors.key_for(settings),
            TIMELINE,
            entries[-1].at,
            entries[-1].source,
            entries[-1].key,
        )
        if more
        else None
    )
    park = views.park_json(row, settings)
    if decision is None:
        raise InvariantError("decision is not None")
    return render(
        request,
        "park.html",
        session,
        status_code=status_code,
        error=error,
        park=park,
        fee=_fee(row.fee),
        until=views.timestamp(row.instant_payouts_until),
        fee_percent=row.instant_fee_percent,
        fee_fixed=row.instant_fee_fixed,
        available=decision.decision.available,
        availability=(
            sentences.SUBSCRIPTION_ENDED
            if decision.subscription_ended
            else sentences.AVAILABILITY.get(decision.decision.reason, decision.decision.reason)
        ),
        next_available_at=views.timestamp(decision.decision.next_available_at),
        in_flight=views.payout_json(flight) if flight else None,
        timeline=[_timeline_entry(e) for e in entries],
        next_cursor=next_cursor,
        first_page=after is None,
        max_hold_reason=park_admin.MAX_HOLD_REASON,
    )


def _fee(fee: Fee | None) -> str | None:
    """The paid option's fee, as the park page shows it (SPEC section 8)."""
    return f"{fee.percent}% + {fee.fixed}" if fee else None


def _timeline_cursor(settings: Settings, raw: str | None) -> support.TimelinePosition | None:
    try:
        decoded = cursors.verify(
            cursors.key_for(settings), TIMELINE, raw, (params.parse_time, _source, _key)
        )
    except ApiError:
        raise Refusal("invalid_request", "This page link is not one the console made.") from None
    return support.TimelinePosition(*decoded) if decoded else None


def _source(raw: Any) -> int:
    if raw not in support.SOURCES or isinstance(raw, bool):
        raise ValueError("not a timeline source")
    return int(raw)


def _key(raw: Any) -> str:
    if not isinstance(raw, str) or len(raw) > 64:
        raise ValueError("not a timeline key")
    return raw


def _timeline_entry(entry: support.TimelineEntry) -> dict[str, Any]:
    details = entry.details
    return {
        "at": views.timestamp(entry.at),
        "source": support.SOURCES[entry.source],
        "payout_id": str(entry.payout_id) if entry.payout_id else None,
        "kind": entry.kind,
        "status": entry.status,
        "amount": views.money(entry.amount),
        "currency": entry.currency,
        "type": entry.type,
        "actor_type": entry.actor_type,
        "actor_id": entry.actor_id,
        "action": entry.action,
        "outcome": entry.outcome,
        # Who-from-where is on the audit page; the timeline keeps to what happened.
        "details": _compact({k: v for k, v in details.items() if k != "client"})
        if details
        else None,
    }


def _audit_entry(entry: audit.Logged) -> dict[str, Any]:
    """An audit entry as the console lists it: its details in one short line."""
    return {
        **views.audit_json(entry),
        "details": _compact(entry.details) if entry.details else None,
    }


def _compact(details: dict[str, Any]) -> str:
    text = json.dumps(details, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= 400 else text[:399] + "…"


async def park_switches(request: Request, session: sessions.Session) -> Response:
    park_id = park_id_of(request)
    fields = fields_of(request)
    instant_on = fields.get("instant_payouts_enabled") == "on"
    periodic_on = fields.get("periodic_payouts_enabled") == "on"
    await _change_park(
        request,
        session,
        park_id,
        {"instant_payouts_enabled": instant_on, "periodic_payouts_enabled": periodic_on},
        instant=instant_on,
        periodic=periodic_on,
    )
    return done(f"/console/parks/{park_id}", "switches")


async def park_hold(request: Request, session: sessions.Session) -> Response:
    park_id = park_id_of(request)
    raw = fields_of(request).get("reason", "")
    try:
        reason = park_admin.hold_reason(raw)
    except park_admin.InvalidChange as exc:
        return await _park_page(
            request, session, park_id, error=str(exc).capitalize() + ".", status_code=400
        )
    hold = parks.Hold(reason=reason, by=session.user_id)
    await _change_park(request, session, park_id, {"hold": {"reason": reason}}, hold=hold)
    return done(f"/console/parks/{park_id}", "hold")


async def park_paid_option(request: Request, session: sessions.Session) -> Response:
    """The instant fee and the subscription's end (SPEC section 8); empty fields clear them."""
    park_id = park_id_of(request)
    fields = fields_of(request)
    percent, fixed = fields.get("fee_percent", "").strip(), fields.get("fee_fixed", "").strip()
    until_raw = fields.get("until", "").strip()
    try:
        fee = (
            Fee(parse_fee_percent(percent or "0"), parse_fee_fixed(fixed or "0"))
            if percent or fixed
            else None
        )
        until = params.parse_time(until_raw) if until_raw else None
    except ValueError as exc:
        message = f"The fee is a percent (0-100) and a fixed sum; the end an RFC 3339 time ({exc})."
        return await _park_page(request, session, park_id, error=message, status_code=400)
    changes = {
        "instant_fee": {"percent": str(fee.percent), "fixed": str(fee.fixed)} if fee else None,
        "instant_payouts_until": views.timestamp(until),
    }
    await _change_park(request, session, park_id, changes, fee=fee, until=until)
    return done(f"/console/parks/{park_id}", "paid_option")


async def park_release(request: Request, session: sessions.Session) -> Response:
    park_id = park_id_of(request)
    hold = parks.Hold(reason=None, by=None)
    await _change_park(request, session, park_id, {"hold": None}, hold=hold)
    return done(f"/console/parks/{park_id}", "release")


async def _change_park(
    request: Request,
    session: sessions.Session,
    park_id: str,
    changes: dict[str, Any],
    **fields: Any,
) -> None:
    change = park_admin.ParkChange(
        park_id=park_id,
        user_id=session.user_id,
        request_id=request_id_of(request),
        changes=changes,
        client=client(request),
        existing_only=True,
        via=VIA,
        **fields,
    )
    async with pool_of(request).connection() as conn:
        try:
            await park_admin.apply(conn, change)
        except park_admin.ParkNotFound:
            raise Refusal("park_not_found") from None


# --- payouts ---------------------------------------------------------------------------


async def payout_page(request: Request, session: sessions.Session) -> Response:
    return await _payout_page(request, session, payout_id_of(request))


async def _payout_page(
    request: Request,
    session: sessions.Session,
    payout_id: uuid.UUID,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    async with admin_pool_of(request).connection() as conn:
        row = await payouts.get(conn, payout_id)
        if row is None:
            raise Refusal("payout_not_found")
        trail = await support.payout_audit(conn, row.park_id, payout_id, limit=200)
        events = await support.payout_events(conn, row.park_id, payout_id)
    payout = views.payout_json(row)
    return render(
        request,
        "payout.html",
        session,
        status_code=status_code,
        error=error,
        payout=payout,
        # Support sees the last transient problem while retries go on (the API does not).
        note=row.failure_message if row.status != "failed" else None,
        approval=row.approval_reason,
        trail=[_audit_entry(e) for e in trail],
        events=[
            {"id": f"evt_{e.seq}", "type": e.type, "at": views.timestamp(e.created_at)}
            for e in events
        ],
    )


async def payout_cancel(request: Request, session: sessions.Session) -> Response:
    payout_id = payout_id_of(request)
    async with admin_pool_of(request).connection() as conn:
        row = await payouts.get(conn, payout_id)
    if row is None:
        raise Refusal("payout_not_found")
    req = cancel.CancelRequest(
        park_id=row.park_id,
        payout_id=payout_id,
        user_id=session.user_id,
        request_id=request_id_of(request),
        client=client(request),
        actor_type="admin",
        via=VIA,
    )
    async with pool_of(request).connection() as conn:
        try:
            await cancel.cancel(conn, req)
        except cancel.NotFound:
            raise Refusal("payout_not_found") from None
        except cancel.NotCancellable:
            return await _payout_page(
                request,
                session,
                payout_id,
                error=sentences.refusal("payout_not_cancellable"),
                status_code=409,
            )
    return done(f"/console/payouts/{payout_id}", "cancel")


def _actor(request: Request, session: sessions.Session) -> manual.Actor:
    return manual.Actor(
        user_id=session.user_id, request_id=request_id_of(request), client=client(request)
    )


async def payout_approve(request: Request, session: sessions.Session) -> Response:
    payout_id = payout_id_of(request)
    return await _decide(
        request,
        session,
        payout_id,
        "approve",
        lambda conn: manual.approve(
            conn, settings_of(request), _actor(request, session), payout_id
        ),
    )


async def payout_deny(request: Request, session: sessions.Session) -> Response:
    payout_id = payout_id_of(request)
    reason = fields_of(request).get("reason", "").strip()
    if not reason or len(reason) > 500 or not reason.isprintable():
        return await _payout_page(
            request,
            session,
            payout_id,
            error="A denial needs a reason: 1-500 printable characters.",
            status_code=400,
        )
    return await _decide(
        request,
        session,
        payout_id,
        "deny",
        lambda conn: manual.deny(
            conn, settings_of(request), _actor(request, session), payout_id, reason
        ),
    )


async def _decide(
    request: Request,
    session: sessions.Session,
    payout_id: uuid.UUID,
    what: str,
    call: Callable[[Any], Awaitable[payouts.Record]],
) -> Response:
    async with pool_of(request).connection() as conn:
        try:
            await call(conn)
        except manual.Unavailable:
            raise Refusal("manual_unavailable") from None
        except manual.Refused as refused:
            if refused.code == "payout_not_found":
                raise Refusal("payout_not_found") from None
            return await _payout_page(
                request,
                session,
                payout_id,
                error=sentences.refusal(refused.code),
                status_code=STATUS.get(refused.code, 409),
            )
    return done(f"/console/payouts/{payout_id}", what)


# --- approvals -------------------------------------------------------------------------


async def approvals(request: Request, session: sessions.Session) -> Response:
    return await _approvals_page(request, session)


async def _approvals_page(
    request: Request,
    session: sessions.Session,
    *,
    error: str | None = None,
    status_code: int = 200,
    values: dict[str, str] | None = None,
) -> Response:
    waiting: list[dict[str, Any]] = []
    if manual.AVAILABLE:
        async with admin_pool_of(request).connection() as conn:
            waiting = [views.payout_json(r) for r in await manual.queue(conn, limit=PAGE_SIZE)]
    return render(
        request,
        "approvals.html",
        session,
        status_code=status_code,
        error=error,
        waiting=waiting,
        values=values or {"park_id": request.query_params.get("park_id", "")},
        # A fresh key per form: sending the same form twice makes one payout.
        form_key=uuid.uuid4().hex,
    )


async def request_manual(request: Request, session: sessions.Session) -> Response:
    fields = fields_of(request)
    park_id = fields.get("park_id", "").strip()
    reason = fields.get("reason", "").strip()
    key = fields.get("key", "")
    values = {"park_id": park_id, "amount": fields.get("amount", ""), "reason": reason}

    def again(message: str, status_code: int) -> Awaitable[Response]:
        return _approvals_page(
            request, session, error=message, status_code=status_code, values=values
        )

    if not manual.AVAILABLE:
        raise Refusal("manual_unavailable")
    if not is_park_id(park_id):
        return await again("A park id is 1-64 letters, digits, _ or -.", 400)
    try:
        amount: Decimal = parse_money(fields.get("amount", "").strip())
    except ValueError:
        return await again('The amount is a positive sum such as "250.00".', 400)
    if not reason or len(reason) > 500 or not reason.isprintable():
        return await again("A manual payout needs a reason: 1-500 printable characters.", 400)
    if not params.is_idempotency_key(key):
        raise Refusal("csrf")
    async with pool_of(request).connection() as conn:
        try:
            row = await manual.request(
                conn,
                settings_of(request),
                _actor(request, session),
                park_id=park_id,
                amount=amount,
                reason=reason,
                idempotency_key=key,
            )
        except manual.Refused as refused:
            return await again(sentences.refusal(refused.code), STATUS.get(refused.code, 409))
    return done(f"/console/payouts/{row.id}", "request")


# --- audit -----------------------------------------------------------------------------


async def audit_search(request: Request, session: sessions.Session) -> Response:
    q = request.query_params
    values = {k: q.get(k, "") for k in ("park_id", "actor_id", "action", "since", "until")}
    problem = None
    entries: list[dict[str, Any]] = []
    cursor = None
    try:
        filters = audit.Filters(
            park_id=params.query_value(request, "park_id", is_park_id, "a park id"),
            actor_id=params.query_value(request, "actor_id", params.is_user_id, "visible ASCII"),
            action=params.query_value(request, "action", params.is_user_id, "visible ASCII"),
            since=params.time_param(request, "since"),
            until=params.time_param(request, "until"),
        )
        after = cursors.verify(
            cursors.key_for(settings_of(request)),
            "audit",
            q.get("cursor"),
            (params.parse_time, params.row_id),
        )
    except ApiError as exc:
        problem = exc.message[:1].upper() + exc.message[1:] + "."
    else:
        async with admin_pool_of(request).connection() as conn:
            rows = await audit.page(conn, filters, limit=PAGE_SIZE + 1, after=after)
        rows, position = params.page(rows, PAGE_SIZE, "at", "id")
        if position:
            cursor = cursors.sign(cursors.key_for(settings_of(request)), "audit", *position)
        entries = [_audit_entry(r) for r in rows]
    next_link = None
    if cursor:
        next_link = "/console/audit?" + urlencode(
            {**{k: v for k, v in values.items() if v}, "cursor": cursor}
        )
    return render(
        request,
        "audit.html",
        session,
        status_code=400 if problem else 200,
        values=values,
        problem=problem,
        entries=entries,
        next_link=next_link,
    )
