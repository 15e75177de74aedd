"""`fleet-payouts serve`: the HTTP API of SPEC section 3, assembled.

Dependencies (settings, pools, the readiness probe) are built in the
lifespan and reach handlers through the request state (service/web/state.py);
nothing here is a module global.

The web edge, one concern per module:
- auth.py: tokens and the route groups (PARK, ADMIN, OPEN) every route is built by
- params.py: headers, query values, bodies, cursors; views.py: JSON objects
- errors.py: the one error shape; database trouble becomes 503
- middleware.py: request id, log context, access line, metrics, stop deadline
- lifecycle.py: readiness, drain on SIGTERM, uvicorn
- origin.py: who and from where, for audit entries
- openapi.py: the description served at /openapi.json
- console/: the support console at /console (HTML, not API; off without CONSOLE_SECRET)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from service.billing import gate as billing_gate
from service.core import db
from service.core.settings import Settings
from service.ops import gauges
from service.web import admin_routes, events, ops_routes, payout_routes
from service.web.errors import EXCEPTION_HANDLERS
from service.web.lifecycle import Drain, ReadinessProbe
from service.web.middleware import Deadline, RequestContext
from service.web.state import State

# The one place route modules are plugged in. Each exports ROUTES built from
# the groups in service/web/auth.py; tests check that every route came from a
# group and is in the OpenAPI description (service/web/openapi.py).
ROUTE_MODULES = (payout_routes, events, admin_routes, ops_routes)


def routes() -> list[BaseRoute]:
    found = [route for module in ROUTE_MODULES for route in module.ROUTES]
    _literal_segments_first(found)
    return found


def _literal_segments_first(found: list[BaseRoute]) -> None:
    """A literal path segment wins over a parameter in the same place.

    Starlette takes the first route that matches path and method, so `GET
    /v1/payouts/instant` would be read as the payout "instant" (a 404) instead of
    the wrong method on `/v1/payouts/instant` (405 with Allow). Each parameter is
    told not to match the literals other routes have at its position.
    """
    paths = [r.path for r in found if isinstance(r, Route)]
    for route in found:
        if not isinstance(route, Route):
            continue
        pattern = route.path_regex.pattern
        segments = route.path.split("/")
        for index, segment in enumerate(segments):
            match = re.fullmatch(r"\{(\w+)(?::\w+)?\}", segment)
            if match is None:
                continue
            prefix = segments[:index]
            literals = sorted(
                {
                    other[index]
                    for other in (p.split("/") for p in paths)
                    if len(other) > index and other[:index] == prefix and "{" not in other[index]
                }
            )
            if literals and "(?!" not in pattern:
                group = f"(?P<{match.group(1)}>"
                ahead = "(?!(?:" + "|".join(map(re.escape, literals)) + ")(?:/|$))"
                pattern = pattern.replace(group, ahead + group, 1)
        route.path_regex = re.compile(pattern)


def create_app(settings: Settings, *, drain: Drain | None = None) -> ASGIApp:
    drain = drain or Drain(settings.api_drain_seconds, settings.shutdown_grace_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        pool = db.make_pool(
            settings.database_url.reveal(),
            name="api",
            min_size=settings.api_pool_min_size,
            max_size=settings.api_pool_max_size,
            timeout=settings.api_pool_timeout_seconds,
            session=db.timeouts(
                statement_seconds=settings.api_statement_timeout_seconds,
                lock_seconds=settings.api_lock_timeout_seconds,
            ),
        )
        admin_pool = db.make_pool(
            settings.database_url.reveal(),
            name="api-admin",
            min_size=1,
            max_size=settings.admin_pool_max_size,
            timeout=settings.api_pool_timeout_seconds,
            session=db.timeouts(statement_seconds=settings.admin_statement_timeout_seconds),
        )
        readiness = ReadinessProbe(settings.database_url.reveal())
        # Open without waiting: /ping must answer even while the database is
        # down, and /ready says whether it is up.
        await pool.open(wait=False)
        await admin_pool.open(wait=False)
        refresher = gauges.gauge_refresher(admin_pool, settings.gauge_seconds)
        # Quotes read a balance: within the one global budget every host shares.
        billing = billing_gate.client(admin_pool, settings)
        try:
            yield {
                "settings": settings,
                "pool": pool,
                "admin_pool": admin_pool,
                "readiness": readiness,
                "drain": drain,
                "billing": billing,
            }
        finally:
            await billing.aclose()
            await refresher.stop()
            await readiness.close()
            await admin_pool.close()
            await pool.close()

    all_routes = routes()
    if settings.console_secret is not None:
        # The support console (SPEC section 9): off unless a secret signs its sessions.
        from service.web import console

        all_routes += console.routes()
    app = Starlette(routes=all_routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    # "/v1/payouts/" is an unknown route (a JSON 404), not a redirect.
    app.router.redirect_slashes = False
    return RequestContext(Deadline(app, drain))
