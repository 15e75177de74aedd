"""Operations endpoints (no token): liveness, readiness, metrics, the API description."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.web import openapi
from service.web.auth import OPEN
from service.web.errors import unavailable


async def ping(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    if request.state.drain.draining:
        raise unavailable("this server is stopping")
    if not await request.state.readiness.check():
        raise unavailable("the database does not answer")
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi.document())


ROUTES = [
    OPEN.route("/ping", ping, methods=["GET"]),
    OPEN.route("/ready", ready, methods=["GET"]),
    OPEN.route("/metrics", metrics, methods=["GET"]),
    OPEN.route("/openapi.json", openapi_json, methods=["GET"]),
]
