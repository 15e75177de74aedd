"""Pure ASGI middleware around the app: one concern each.

RequestContext (outermost): the request id, the log context every line of
the request carries, one access line and the HTTP metrics per request.
Deadline: from the moment the process is asked to stop, a request must
answer before the grace ends, with a 503 if it cannot finish, and every
answer says `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core import observability
from service.core.values import is_visible_ascii
from service.web.errors import ApiError, unavailable
from service.web.lifecycle import Drain

access_logger = logging.getLogger("service.web.access")
logger = logging.getLogger(__name__)

# Label for requests no route matched: the raw path would let any caller
# create metric series at will.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_METRICS: dict[tuple[str, str, int], tuple[Any, Any]] = {}


class RequestContext:
    """X-Request-Id on every response (the caller's if usable, else a new one), the log
    context, the access line and the HTTP metrics.

    Outermost, so even a 500 from the error middleware carries the id and is counted.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if is_visible_ascii(given, 128) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        with observability.log_context(request_id=request_id) as fields:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Starlette re-raises after its 500 handler answered (and logged);
                # anything raised before an answer gets the one error shape here.
                if not started:
                    logger.exception("unhandled error outside the app")
                    await _send_error(send_with_id, ApiError("internal_error", "internal error"))
            finally:
                self._account(scope, status, time.perf_counter() - start, fields)

    @staticmethod
    def _account(scope: Scope, status: int, seconds: float, fields: dict[str, object]) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED
        method = scope["method"] if scope["method"] in _METHODS else "other"
        children = _METRICS.get((template, method, status))
        if children is None:
            # labels() validates and locks on every call: each series' children are looked
            # up once (routes, methods and statuses are a small fixed set).
            children = (
                observability.HTTP_REQUESTS.labels(template, method, str(status)),
                observability.HTTP_SECONDS.labels(template),
            )
            _METRICS[(template, method, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        client = scope.get("client")
        access_logger.info(
            "%s %s %s",
            method,
            template,
            status,
            extra={
                "method": method,
                "route": template,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
                "client_ip": client[0] if client else None,
                **fields,
            },
        )


class Deadline:
    """Once the stop began, answer 503 rather than be cut off when the grace ends."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.drain.draining:
                    # The connection closes after this answer: a keep-alive client
                    # (a load balancer) opens its next request elsewhere instead of
                    # meeting a socket this process is about to close.
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            async with asyncio.timeout(None) as timeout:
                self.drain.track(timeout)
                try:
                    await self.app(scope, receive, send_tracking)
                finally:
                    self.drain.untrack(timeout)
        except TimeoutError:
            logger.warning("request still running at the end of the shutdown grace: 503")
            if not started:
                await _send_error(send_tracking, unavailable("this server is stopping; retry"))


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(
        {"code": error.code, "message": error.message, "details": error.details}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
