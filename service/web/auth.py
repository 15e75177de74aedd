"""Who may call what: bearer tokens, checked once per route group.

Every route is built by one of the groups below (`PARK`, `ADMIN`, `OPEN`), so
the check cannot be forgotten by a new handler; a test walks the app's
routes and fails on any route that did not come from a group.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.core import observability
from service.core.settings import Secret, Settings
from service.core.values import is_park_id
from service.web import refusals
from service.web.errors import ApiError
from service.web.state import settings_of

Endpoint = Callable[[Request], Awaitable[Response]]


class Access(enum.Enum):
    """Which token a route group requires."""

    OPEN = "open"  # operations endpoints: no token
    API = "api"  # park-scoped: a token from API_TOKENS (Opteum)
    ADMIN = "admin"  # a token from ADMIN_TOKENS


@dataclasses.dataclass(frozen=True)
class RouteGroup:
    """Routes that share one access rule; the only way routes are made here."""

    access: Access

    def route(
        self,
        path: str,
        endpoint: Endpoint,
        *,
        methods: Sequence[str],
        audited: str | None = None,
    ) -> Route:
        """A route of this group; `audited` names the action of a user or admin
        action, whose refusals (a wrong kind of token, bad input...) are written
        to the audit log like its successes."""

        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            try:
                if self.access is not Access.OPEN:
                    authenticate(request, settings_of(request), self.access)
                    _bind_park(request)
                return await endpoint(request)
            except ApiError as refusal:
                if audited is not None and _worth_auditing(refusal):
                    await refusals.write(request, audited, _actor(request, self.access), refusal)
                raise

        guarded.access = self.access  # type: ignore[attr-defined]  # read by the route test
        return Route(path, guarded, methods=list(methods), name=endpoint.__name__)


def _actor(request: Request, route_access: Access) -> refusals.Actor:
    """Who a refusal is recorded as: the token that authenticated decides, never the route.

    X-User-Id names a user only on a route of the token's own group (Opteum vouches for its
    users, admins for themselves); an API token on an admin route is a user whose claimed
    id is kept as a claim, so nobody can put words in an admin's mouth.
    """
    token = getattr(request.state, "token", None)
    actor_type: Literal["user", "admin"] = "admin" if token is Access.ADMIN else "user"
    return refusals.Actor(actor_type, trusted=token is route_access)


def _worth_auditing(refusal: ApiError) -> bool:
    # No valid token: nobody we know acted (scanners would fill the log).
    # Database down: nothing can be written, and the caller retries anyway.
    return not refusal.audited and refusal.code not in ("unauthorized", "unavailable")


PARK = RouteGroup(Access.API)
ADMIN = RouteGroup(Access.ADMIN)
OPEN = RouteGroup(Access.OPEN)


def access_of(route: Route) -> Access | None:
    """The group a route was built by, None for a route made by hand."""
    access = getattr(route.endpoint, "access", None)
    return access if isinstance(access, Access) else None


def authenticate(request: Request, settings: Settings, access: Access) -> None:
    """Bearer token check; constant time, and every configured token is compared.

    The kind of token that matched is kept in `request.state.token` (an Access), for the
    audit of a refusal: a wrong kind of token is still somebody we know.
    """
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError("unauthorized", "missing or malformed Authorization: Bearer token")
    presented = token.strip().encode("latin-1")
    is_api = _matches(presented, settings.api_tokens)
    is_admin = _matches(presented, settings.admin_tokens)
    if not (is_api or is_admin):
        raise ApiError("unauthorized", "unknown token")
    # A token in both lists is a configuration mistake; it counts as the route's kind.
    if is_api and is_admin:
        request.state.token = access
    else:
        request.state.token = Access.ADMIN if is_admin else Access.API
    if (access is Access.ADMIN and not is_admin) or (access is Access.API and not is_api):
        raise ApiError("forbidden", f"this token is not valid for {access.value} endpoints")


def _matches(presented: bytes, tokens: tuple[Secret, ...]) -> bool:
    found = False
    for token in tokens:
        # No early exit: the time taken does not tell which token matched.
        found |= hmac.compare_digest(presented, token.reveal().encode())
    return found


def _bind_park(request: Request) -> None:
    # The park a request acts for goes on its log lines and Sentry events,
    # once the caller has proved who it is and only when well-formed.
    park = request.path_params.get("park_id") or request.headers.get("x-park-id")
    if isinstance(park, str) and is_park_id(park):
        observability.bind(park_id=park)
