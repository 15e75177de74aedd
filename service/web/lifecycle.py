"""How `serve` starts, says it is ready, and stops without dropping anyone.

On SIGTERM: /ready answers 503 at once while the API keeps serving for
API_DRAIN_SECONDS (the load balancer sees it and stops sending), then
uvicorn stops accepting connections and gives requests in flight
SHUTDOWN_GRACE_SECONDS. A request still running a second before that grace
ends is cut short with a 503 (its transaction rolls back, so the caller may
retry it as it is): every caller gets an answer, none a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
from types import FrameType

import psycopg
import uvicorn

from service.core.settings import Settings
from service.web import edge

logger = logging.getLogger(__name__)

# Requests still running this long before uvicorn's grace ends answer 503,
# leaving time for the answer to be written before connections close.
ANSWER_MARGIN_SECONDS = 1.0


class Drain:
    """The stop sequence's clock: when it began, and the deadline it gives requests."""

    def __init__(self, drain_seconds: float, grace_seconds: float) -> None:
        self.drain_seconds = drain_seconds
        self.grace_seconds = grace_seconds
        self.requested = False  # set from the signal handler: a plain store only
        self.started_at: float | None = None
        self._timeouts: set[asyncio.Timeout] = set()

    @property
    def draining(self) -> bool:
        return self.requested

    def deadline(self) -> float | None:
        """Loop time by which a request must have answered, once the stop began."""
        if self.started_at is None:
            return None
        return self.started_at + self.drain_seconds + self.grace_seconds - ANSWER_MARGIN_SECONDS

    def start(self) -> None:
        """Called on the loop once the signal arrived: fix the deadline for everyone in flight."""
        if self.started_at is not None:
            return
        self.started_at = asyncio.get_running_loop().time()
        logger.info(
            "stopping: /ready says 503; serving %.0fs more, then %.0fs for requests in flight",
            self.drain_seconds,
            self.grace_seconds,
        )
        deadline = self.deadline()
        for timeout in self._timeouts:
            timeout.reschedule(deadline)

    def done_draining(self) -> bool:
        if self.started_at is None:
            return False
        return asyncio.get_running_loop().time() >= self.started_at + self.drain_seconds

    def track(self, timeout: asyncio.Timeout) -> None:
        timeout.reschedule(self.deadline())
        self._timeouts.add(timeout)

    def untrack(self, timeout: asyncio.Timeout) -> None:
        self._timeouts.discard(timeout)


class ReadinessProbe:
    """`SELECT 1` on a connection of its own, so a full request pool never fails /ready,
    and a database that is down is seen as down rather than as a pool timeout."""

    TIMEOUT_SECONDS = 2.0

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._lock = asyncio.Lock()
        self._was_ready: bool | None = None

    async def check(self) -> bool:
        async with self._lock:
            ready = await self._probe()
        if ready != self._was_ready:
            # Transitions only: a load balancer probes every few seconds.
            log = logger.info if ready else logger.warning
            log("database %s", "ready" if ready else "not ready")
            self._was_ready = ready
        return ready

    async def _probe(self) -> bool:
        try:
            async with asyncio.timeout(self.TIMEOUT_SECONDS):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=max(1, int(self.TIMEOUT_SECONDS)),
                        application_name="fleet-payouts-ready",
                    )
                await self._conn.execute("SELECT 1")
            return True
        except (OSError, TimeoutError, psycopg.Error) as exc:
            logger.debug("readiness probe failed: %s", exc)
            await self.close()
            return False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its own shutdown: the first SIGTERM or SIGINT starts
    the drain; a second one stops at once as uvicorn always did."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.requested:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self.drain.requested = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain.requested:
            self.drain.start()
            if self.drain.done_draining():
                return True
        return await super().on_tick(counter)


# Descriptors kept for what is not a client connection: the two pools, the
# readiness probe, log files, the listening socket, Sentry, with room to spare.
RESERVED_DESCRIPTORS = 64


def _connection_cap(configured: int) -> int:
    """API_MAX_CONNECTIONS, lowered to what the process's descriptor limit allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= soft - RESERVED_DESCRIPTORS:
        return configured
    allowed = max(1, soft - RESERVED_DESCRIPTORS)
    logger.warning(
        "API_MAX_CONNECTIONS %d is above what the descriptor limit (%d) allows: using %d",
        configured,
        soft,
        allowed,
    )
    return allowed


def serve(settings: Settings, *, host: str, port: int) -> None:
    """`fleet-payouts serve`: the API under uvicorn, drained on SIGTERM."""
    from service.web.app import create_app

    drain = Drain(settings.api_drain_seconds, settings.shutdown_grace_seconds)
    limits = edge.EdgeLimits(
        max_connections=_connection_cap(settings.api_max_connections),
        header_seconds=settings.api_header_timeout_seconds,
        body_seconds=settings.api_body_timeout_seconds,
    )
    config = uvicorn.Config(
        create_app(settings, drain=drain),
        host=host,
        port=port,
        # The limits of service/web/edge.py on uvicorn's httptools protocol.
        http=edge.protocol(limits),
        # Longer than a browser needs between calls, shorter than a front proxy's
        # upstream keep-alive must be (ops/proxy/: the proxy closes idle ones first).
        timeout_keep_alive=max(1, math.ceil(settings.api_keep_alive_seconds)),
        log_config=None,
        access_log=False,  # ours has the route template, the park and the request id
        proxy_headers=False,  # X-Forwarded-For is read only from TRUSTED_PROXIES
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
    )
    DrainingServer(config, drain).run()
