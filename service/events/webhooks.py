"""Webhooks (SPEC section 3): every event POSTed to WEBHOOK_URL, signed, at
least once, in commit order per park.

One process delivers at a time: every worker with WEBHOOK_URL runs a turn
every TURN_SECONDS (a background chore), and the one holding the lease on
`webhook_feed` (renewed each turn) does the work:

1. record the parks whose deliveries finished since the last turn;
2. stamp and hand out: what the feed has committed since is handed to its
   parks (`webhook_feed_parks` keeps, per park, what was delivered and what
   is owed), walking the same position-ordered feed as GET /v1/events;
3. start each due park that is not already under way as a task of its own:
   its events POSTed one after the other, oldest first, stopping at its first
   failure to wait out its backoff alone.

No park waits for another: there is no round to finish, only bounded
concurrency, and parks that are failing take their turns in a lane of their
own (FAILING_SLOTS). Consumer paths that hang for 48 parks hold at most
HEALTHY_SLOTS connections for one REQUEST_TIMEOUT_SECONDS at their first
failure, then FAILING_SLOTS at each retry; the healthy parks go on meanwhile.

Deliveries start at the feed's end when WEBHOOK_URL is first set (history is
read through the feed). A crash between a 2xx and step 1 sends those events
again: at least once, and consumers dedupe by id. Never in a payout's way: an
httpx client of its own (not Billing's, nor its budget), and no worker slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid

import httpx
import psycopg
from psycopg_pool import PoolTimeout

from service.core import db, retry
from service.core.settings import Settings
from service.events import outbox as events

logger = logging.getLogger(__name__)
Q = db.queries("webhooks")

SIGNATURE_HEADER = "X-Fleet-Payouts-Signature"

# A consumer slower than this is treated as down for that event: one slow
# consumer path must not keep a connection, and the parks behind it, for long.
REQUEST_TIMEOUT_SECONDS = 5.0
# Parks served at once, one request each; one park's events always go one at a
# time, in order. Parks with no failure have their own slots: a consumer path
# that hangs for some parks takes at most FAILING_SLOTS connections once it has
# failed, and only HEALTHY_SLOTS parks' first attempts before that.
HEALTHY_SLOTS = 64
FAILING_SLOTS = 16
# How many of a park's events one task takes on; it is started again if owed more.
EVENTS_PER_PARK = 50
HAND_OUT_BATCH = 1000
HAND_OUT_BATCHES_PER_TURN = 10
# How often the holder looks for newly committed events and finished parks:
# an event waits about this long for its turn.
TURN_SECONDS = 0.2
# The holder renews its lease every turn; a holder whose process died (or
# stalled this long) is replaced after it, and stops its own deliveries when
# it finds out.
LEASE_SECONDS = 10.0
# The undelivered gauge counts unstamped events up to this (they are stamped
# within a second; the cap keeps the gauge's read bounded).
UNSTAMPED_CAP = 10_000


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def body_of(event: events.Event) -> bytes:
    """The POST body: the event's JSON, exactly the bytes that are signed."""
    return json.dumps(events.event_json(event), separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How far one park got: delivered up to a position (`sent` events), and what stopped it."""

    park_id: str
    delivered: int | None
    sent: int = 0
    error: str | None = None
    delay: float | None = None


@dataclasses.dataclass(frozen=True)
class RoundResult:
    handed_out: int
    delivered: int
    failing_parks: int
    # Another process holds the lease: this one did nothing.
    busy: bool = False


@dataclasses.dataclass(frozen=True)
class _Due:
    park_id: str
    failures: int
    pending: int
    events: list[events.Event]


class Dispatcher:
    """Delivers webhooks from one worker process, while it holds the feed's lease.

    Each turn (every TURN_SECONDS, `webhooks` chore of the worker) renews or
    takes the lease, records the parks that finished, hands out what the feed
    committed since, and starts each due park that is not under way as a task
    of its own. A park's task lives across turns: nothing waits for it but
    its own park.
    """

    def __init__(
        self,
        pool: db.Pool,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if settings.webhook_url is None or settings.webhook_secret is None:
            raise ValueError("webhooks need WEBHOOK_URL and WEBHOOK_SECRET")
        self.pool = pool
        self.url = settings.webhook_url
        self._secret = settings.webhook_secret
        self.backoff_cap = settings.retry_backoff_cap_seconds
        self.holder = uuid.uuid4().hex
        self._started = False
        self.running: dict[str, asyncio.Task[Outcome]] = {}
        self._busy = {True: 0, False: 0}  # tasks under way by lane (failing or not)
        self.totals = RoundResult(0, 0, 0)
        self.client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_SECONDS,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=HEALTHY_SLOTS + FAILING_SLOTS),
            headers={"User-Agent": "fleet-payouts-webhooks"},
            transport=transport,
        )

    async def aclose(self) -> None:
        """Stop: parks under way are cut short (sent again by the next holder), lease freed."""
        for task in self.running.values():
            task.cancel()
        if self.running:
            await asyncio.wait(self.running.values())
        self.running.clear()
        try:
            async with self.pool.connection() as conn:
                await db.execute(conn, Q["release"], holder=self.holder)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            logger.warning("webhooks: could not free the lease (%s); it lapses", exc)
        finally:
            await self.client.aclose()

    async def start(self) -> None:
        """Webhooks are on: the first time ever, deliveries start at the feed's end.

        Every committed event is stamped first: after the deploy of positions, the
        events of the version before, which may take a while (minutes per ten million).
        """
        async with self.pool.connection() as conn:
            batch = events.SEQUENCE_BATCH
            while await events.sequence(conn, batch) >= batch:
                pass
            await db.execute(conn, Q["start"])
        self._started = True

    async def turn(self) -> bool:
        """One turn; False when another process holds the lease (nothing was done)."""
        if not self._started:
            await self.start()
        async with self.pool.connection() as conn:
            if not await _acquire(conn, self.holder):
                # Lost it (this process stalled past the lease): another holder
                # serves these parks now; ours stop, and are sent again.
                for task in self.running.values():
                    task.cancel()
                return False
            await self._settle(conn)
            await events.sequence(conn)
            self._add(handed_out=await _hand_out(conn))
            for failing, slots in ((False, HEALTHY_SLOTS), (True, FAILING_SLOTS)):
                free = slots - self._busy[failing]
                if free <= 0:
                    continue
                for due in await _due(conn, busy=list(self.running), failing=failing, parks=free):
                    self._busy[failing] += 1
                    self.running[due.park_id] = asyncio.create_task(self._serve(due, failing))
        return True

    async def chore(self) -> None:
        """The worker's `webhooks` chore: one turn."""
        await self.turn()

    async def run_round(self) -> RoundResult:
        """Turns until nothing is due and every park started has been recorded (tests,
        drills): what this pass handed out, delivered and found failing; `busy` if another
        process holds the lease."""
        before = self.totals
        while True:
            if not await self.turn():
                return RoundResult(0, 0, 0, busy=True)
            if not self.running:
                break
            await asyncio.wait(self.running.values())
            async with self.pool.connection() as conn:
                await self._settle(conn)
        after = self.totals
        return RoundResult(
            after.handed_out - before.handed_out,
            after.delivered - before.delivered,
            after.failing_parks - before.failing_parks,
        )

    async def _serve(self, due: _Due, failing: bool) -> Outcome:
        try:
            return await self.deliver(due)
        finally:
            self._busy[failing] -= 1

    async def _settle(self, conn: db.Conn) -> None:
        """Record the parks that finished, in one statement."""
        done = [park for park, task in self.running.items() if task.done()]
        outcomes = []
        for park in done:
            task = self.running.pop(park)
            if not task.cancelled() and task.exception() is None:
                outcomes.append(task.result())
            elif not task.cancelled():
                logger.error("webhooks: park %s: %r", park, task.exception())
        if not outcomes:
            return
        await _record(conn, outcomes)
        failing = [o for o in outcomes if o.error is not None]
        self._add(delivered=sum(o.sent for o in outcomes), failing_parks=len(failing))
        if failing:
            logger.warning(
                "webhooks: %d parks failing (park %s: %s)",
                len(failing),
                failing[0].park_id,
                failing[0].error,
            )

    def _add(self, *, handed_out: int = 0, delivered: int = 0, failing_parks: int = 0) -> None:
        t = self.totals
        self.totals = RoundResult(
            t.handed_out + handed_out, t.delivered + delivered, t.failing_parks + failing_parks
        )

    async def deliver(self, due: _Due) -> Outcome:
        """POST one park's events in order; stop at the first failure."""
        if not due.events:
            # What it was owed is gone (retention): nothing left to send.
            return Outcome(due.park_id, due.pending)
        delivered: int | None = None
        sent = 0
        for event in due.events:
            error = await self._post(event)
            if error is not None:
                return Outcome(
                    due.park_id,
                    delivered,
                    sent,
                    error,
                    retry.delay(due.failures, cap=self.backoff_cap),
                )
            delivered = event.position
            sent += 1
        return Outcome(due.park_id, delivered, sent)

    async def _post(self, event: events.Event) -> str | None:
        """Send one event; None on a 2xx, else what went wrong (never the URL)."""
        body = body_of(event)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret.reveal(), int(time.time()), body),
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"


# --- the queries (sql/webhooks.sql) ---------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _DueRow(events.EventColumns):
    """A row of the due query: one event a park is owed (all None when the events it was
    owed are gone), and the park."""

    park_id: str
    failures: int
    pending: int


async def _acquire(conn: db.Conn, holder: str) -> bool:
    """Take or renew the feed's lease; False when another holder has it."""
    held = await db.fetch_value(conn, str, Q["acquire"], holder=holder, seconds=LEASE_SECONDS)
    return held is not None


async def _due(conn: db.Conn, *, busy: list[str], failing: bool, parks: int) -> list[_Due]:
    """One lane's due parks, each with the events it is owed, in the query's order."""
    rows = await db.fetch_all_as(
        conn,
        _DueRow,
        Q["due"],
        busy=busy,
        failing=failing,
        parks=parks,
        per_park=EVENTS_PER_PARK,
    )
    found: dict[str, _Due] = {}
    for row in rows:
        due = found.get(row.park_id)
        if due is None:
            due = found[row.park_id] = _Due(row.park_id, row.failures, row.pending, [])
        event = row.event()
        if event is not None:
            due.events.append(event)
    return list(found.values())


async def _hand_out(conn: db.Conn) -> int:
    handed = 0
    for _ in range(HAND_OUT_BATCHES_PER_TURN):
        count = await db.fetch_value(conn, int, Q["hand_out"], limit=HAND_OUT_BATCH) or 0
        handed += count
        if count < HAND_OUT_BATCH:
            break
    return handed


async def _record(conn: db.Conn, outcomes: list[Outcome]) -> None:
    await db.execute(
        conn,
        Q["record"],
        park_ids=[o.park_id for o in outcomes],
        positions=[o.delivered for o in outcomes],
        sent=[o.sent for o in outcomes],
        errors=[o.error for o in outcomes],
        delays=[o.delay for o in outcomes],
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    """Events not yet delivered to WEBHOOK_URL, and how long the oldest has waited."""

    events: int
    oldest_seconds: float


async def backlog(conn: db.Conn) -> Backlog:
    """The webhook backlog (zero if webhooks were never switched on)."""
    found = await db.fetch_as(conn, Backlog, Q["undelivered"], cap=UNSTAMPED_CAP)
    return Backlog(0, 0.0) if found is None else found


async def tick(dispatcher: Dispatcher | None) -> None:
    """A deliver_webhooks job, deferred by a worker of the version before (which ran
    delivery rounds as jobs): delivery is the workers' `webhooks` chore now."""
    logger.debug("deliver_webhooks: delivery runs as a worker chore; nothing to do")
