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

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import observability
from service.domain import is_park_id
from service.settings import Settings
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

    def route(self, path: str, endpoint: Endpoint, *, methods: Sequence[str]) -> Route:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            if self.access is not Access.OPEN:
                authenticate(request, settings_of(request), self.access)
                _bind_park(request)
            return await endpoint(request)

        guarded.access = self.access  # type: ignore[attr-defined]  # read by the route test
        return Route(path, guarded, methods=list(methods), name=endpoint.__name__)


PARK = RouteGroup(Access.API)
ADMIN = RouteGroup(Access.ADMIN)
OPEN = RouteGroup(Access.OPEN)


def access_of(route: Route) -> Access | None:
    """The group a route was built by, None for a route made by hand."""
    access = getattr(route.endpoint, "access", None)
    return access if isinstance(access, Access) else None


def authenticate(request: Request, settings: Settings, access: Access) -> None:
    """Bearer token check; constant time, and every configured token is compared."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError("unauthorized", "missing or malformed Authorization: Bearer token")
    presented = token.strip().encode("latin-1")
    is_api = _matches(presented, settings.api_tokens)
    is_admin = _matches(presented, settings.admin_tokens)
    if not (is_api or is_admin):
        raise ApiError("unauthorized", "unknown token")
    if (access is Access.ADMIN and not is_admin) or (access is Access.API and not is_api):
        raise ApiError("forbidden", f"this token is not valid for {access.value} endpoints")


def _matches(presented: bytes, tokens: tuple[str, ...]) -> bool:
    found = False
    for token in tokens:
        # No early exit: the time taken does not tell which token matched.
        found |= hmac.compare_digest(presented, token.encode())
    return found


def _bind_park(request: Request) -> None:
    # The park a request acts for goes on its log lines and Sentry events,
    # once the caller has proved who it is and only when well-formed.
    park = request.path_params.get("park_id") or request.headers.get("x-park-id")
    if isinstance(park, str) and is_park_id(park):
        observability.bind(park_id=park)
