"""A programmable HTTP proxy between the service and the Billing emulator.

It lets a test play the adversary on the wire: hold an order past the
client's timeout and deliver it later anyway, act at the moment an order
arrives (change the park's balance), rewrite Billing's answers (one
park's malformed or negative balance), or answer in Billing's place as an
intermediary would (a 408, a gateway's HTML page, a redirect, junk). It
records every order it saw, so a test can check that one key only ever
carried one body.

It runs in a thread of the test process (uvicorn on its own event loop);
the test sets its hooks as plain attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fleet_payouts_devkit.processes import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.helpers.procs import wait_for

# (path, answer) -> the answer to send instead, for 200 JSON answers.
Rewrite = Callable[[str, Any], Any]


@dataclass
class Order:
    key: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Canned:
    """An answer the proxy gives instead of Billing's: an intermediary talking (a gateway's
    408 or HTML page, a redirect), or junk. With `forward`, the request reaches Billing first
    and Billing's own answer is thrown away: the money moved, the client hears this."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    forward: bool = False

    def response(self) -> Response:
        return Response(
            self.body, status_code=self.status, headers=self.headers, media_type=self.content_type
        )


@dataclass
class BillingProxy:
    upstream: str
    url: str = ""
    orders: list[Order] = field(default_factory=list)
    # Orders (by arrival number, from 0) held this many seconds before they
    # are forwarded; the client has given up by then, the order lands anyway.
    hold: dict[int, float] = field(default_factory=dict)
    # Called when an order arrives, before it is forwarded.
    on_order: Callable[[Order], None] | None = None
    rewrite: Rewrite | None = None
    # Every request's path, in arrival order; and paths whose requests are
    # held this many seconds before they are forwarded.
    seen: list[str] = field(default_factory=list)
    hold_path: dict[str, float] = field(default_factory=dict)
    # Set while a held order is on its way, cleared when it has landed.
    landed: threading.Event = field(default_factory=threading.Event)
    # Orders (by arrival number) answered by the proxy itself: None forwards as usual.
    answer_order: Callable[[int], Canned | None] | None = None
    # Per path, the answers the next requests get from the proxy itself, one each, in order.
    answer_path: dict[str, list[Canned]] = field(default_factory=dict)

    def bodies_by_key(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for order in self.orders:
            found.setdefault(order.key, []).append(order.body)
        return found

    async def _forward(self, client: httpx.AsyncClient, request: Request, body: bytes) -> Response:
        path = request.url.path
        self.seen.append(path)
        if self.hold_path.get(path):
            await asyncio.sleep(self.hold_path[path])
        canned = self.answer_path.get(path)
        if canned:
            return await self._canned(client, request, body, canned.pop(0))
        if request.method == "POST" and path == "/v1/payouts":
            order = Order(request.headers.get("idempotency-key", ""), json.loads(body))
            number = len(self.orders)
            self.orders.append(order)
            if self.on_order is not None:
                self.on_order(order)
            answer = self.answer_order(number) if self.answer_order is not None else None
            if answer is not None:
                return await self._canned(client, request, body, answer)
            delay = self.hold.get(number)
            if delay:
                # Delivered later whatever the client does: a task of its own
                # survives the client hanging up.
                task = asyncio.ensure_future(self._late(client, request, body, delay))
                return await asyncio.shield(task)
        return await self._send(client, request, body)

    async def _canned(
        self, client: httpx.AsyncClient, request: Request, body: bytes, answer: Canned
    ) -> Response:
        if answer.forward:
            await self._send(client, request, body)
        return answer.response()

    async def _late(
        self, client: httpx.AsyncClient, request: Request, body: bytes, delay: float
    ) -> Response:
        self.landed.clear()
        await asyncio.sleep(delay)
        try:
            return await self._send(client, request, body)
        finally:
            self.landed.set()

    async def _send(self, client: httpx.AsyncClient, request: Request, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        upstream = await client.request(
            request.method,
            request.url.path,
            params=request.query_params,
            content=body,
            headers=headers,
        )
        content = upstream.content
        if self.rewrite is not None and upstream.status_code == 200:
            content = json.dumps(self.rewrite(request.url.path, upstream.json())).encode()
        return Response(
            content,
            status_code=upstream.status_code,
            headers={k: v for k, v in upstream.headers.items() if k.lower() in ("retry-after",)},
            media_type="application/json",
        )


@contextlib.contextmanager
def billing_proxy(upstream: str) -> Iterator[BillingProxy]:
    """Start a proxy in front of `upstream` (the emulator) and yield it, its url set."""
    proxy = BillingProxy(upstream)

    async def handle(request: Request) -> Response:
        async with httpx.AsyncClient(base_url=upstream, timeout=30) as client:
            return await proxy._forward(client, request, await request.body())

    app = Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST", "PUT"])])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            # At the test's end a request still held is one nobody waits for (its caller was
            # stopped): cancel it after a second instead of waiting out the hold.
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    proxy.url = f"http://127.0.0.1:{port}"
    wait_for(lambda: server.started, timeout=10, what="the Billing proxy")
    try:
        yield proxy
    finally:
        server.should_exit = True
        thread.join(timeout=10)
