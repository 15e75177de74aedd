"""The support console at /console (SPEC section 9): server-rendered pages for support,
served by `serve` when CONSOLE_SECRET is set. Not API: the OpenAPI description leaves
it out, and its routes are plugged in beside the API's (service/web/app.py).

- session.py: the signed session cookie and the CSRF tokens
- pages.py: the pages and actions, each calling the API's use case
- manual.py: the adapter over the manual-payout use cases
- sentences.py: refusal codes and states as sentences
- templates/, static/: Jinja2 templates (autoescaped) and our own stylesheet and script
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from service.web.console import pages

_STATIC_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("service.web.console").joinpath("static")
    return {
        item.name: (item.read_bytes(), _STATIC_TYPES[item.name[item.name.rindex(".") :]])
        for item in folder.iterdir()
        if item.name.endswith(tuple(_STATIC_TYPES))
    }


def routes() -> list[BaseRoute]:
    """The console's routes; every page and action is wrapped in pages.page/open_page."""
    files = _static()

    async def static(request: Request) -> Response:
        found = files.get(str(request.path_params["name"]))
        if found is None:
            raise pages.Refusal("not_found")
        body, media_type = found
        return Response(body, media_type=media_type, headers={"Cache-Control": "max-age=300"})

    def get(path: str, endpoint: pages.Handler) -> Route:
        return Route(
            path, pages.page(endpoint), methods=["GET"], name=f"console_{endpoint.__name__}"
        )

    def post(path: str, endpoint: pages.Handler) -> Route:
        return Route(
            path, pages.page(endpoint), methods=["POST"], name=f"console_{endpoint.__name__}"
        )

    return [
        Route("/console", pages.open_page(pages.home), methods=["GET"]),
        Route("/console/static/{name}", pages.open_page(static), methods=["GET"]),
        Route("/console/sign-in", pages.open_page(pages.sign_in_form), methods=["GET"]),
        Route("/console/sign-in", pages.open_page(pages.sign_in), methods=["POST"]),
        post("/console/sign-out", pages.sign_out),
        get("/console/parks", pages.park_search),
        get("/console/parks/{park_id}", pages.park_page),
        post("/console/parks/{park_id}/switches", pages.park_switches),
        post("/console/parks/{park_id}/hold", pages.park_hold),
        post("/console/parks/{park_id}/release", pages.park_release),
        post("/console/parks/{park_id}/paid-option", pages.park_paid_option),
        get("/console/payouts/{payout_id}", pages.payout_page),
        post("/console/payouts/{payout_id}/cancel", pages.payout_cancel),
        post("/console/payouts/{payout_id}/approve", pages.payout_approve),
        post("/console/payouts/{payout_id}/deny", pages.payout_deny),
        get("/console/approvals", pages.approvals),
        post("/console/approvals", pages.request_manual),
        get("/console/audit", pages.audit_search),
    ]
