"""What the lifespan builds and every handler reaches through the request.

Dependencies live in the lifespan state, not in module globals, so a test
app and a served app never share a pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from starlette.requests import Request

from service.core import db
from service.core.settings import Settings

if TYPE_CHECKING:
    from service.billing.client import BillingClient
    from service.web.lifecycle import Drain, ReadinessProbe


class State(TypedDict):
    settings: Settings
    # Presses and park-scoped reads: statement and lock timeouts, sized for load.
    pool: db.Pool
    # Admin reads and gauges: small, its own statement timeout.
    admin_pool: db.Pool
    readiness: ReadinessProbe
    drain: Drain
    # The instant quote's balance read, through the shared Billing gate.
    billing: BillingClient


def settings_of(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def pool_of(request: Request) -> db.Pool:
    pool: db.Pool = request.state.pool
    return pool


def admin_pool_of(request: Request) -> db.Pool:
    pool: db.Pool = request.state.admin_pool
    return pool


def request_id_of(request: Request) -> str:
    """The id the response carries (the caller's X-Request-Id, or one we made)."""
    return str(request.state.request_id)


def billing_of(request: Request) -> BillingClient:
    billing: BillingClient = request.state.billing
    return billing
