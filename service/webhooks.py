"""Webhooks (SPEC section 3): every event POSTed to WEBHOOK_URL, signed, at
least once, in commit order per park.

One *round* at a time (the `deliver_webhooks` job, every second; a round
leases `webhook_state`, and a tick that finds it leased ends at once):

1. hand out: what the feed has committed since the last round is handed to
   its parks (`webhook_parks` keeps, per park, what was delivered and what is
   owed), walking the same commit-order feed as GET /v1/events;
2. deliver: the parks whose turn has come are served concurrently, each
   one's events POSTed one after the other, oldest first; a park stops at its
   first failure and waits out its backoff alone, the others go on;
3. record how far each park got, in one statement.

A crash between a 2xx and step 3 sends those events again: at least once,
and consumers dedupe by id. Never in a payout's way: an httpx client of its
own (not Billing's, nor its budget), a queue of its own, and a round that
starts nothing new after ROUND_SECONDS, so it holds one worker slot briefly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import time
import uuid

import httpx
import psycopg
from psycopg_pool import PoolTimeout

from service import db, events
from service.settings import Settings

logger = logging.getLogger(__name__)
Q = db.queries("webhooks")

SIGNATURE_HEADER = "X-Fleet-Payouts-Signature"

# A consumer slower than this is treated as down: one slow consumer must not
# keep the round, and the worker slot it runs in, for long.
REQUEST_TIMEOUT_SECONDS = 5.0
# Parks served at once; one park's events always go one at a time, in order.
CONCURRENCY = 8
# What one round takes on. Rounds come a second apart, so a backlog drains
# over rounds; bounded, so a round stays short whatever the backlog.
PARKS_PER_ROUND = 200
EVENTS_PER_PARK = 50
HAND_OUT_BATCH = 1000
HAND_OUT_BATCHES_PER_ROUND = 10
# Nothing new (no park, no next event) is started after this: a round lasts at
# most this plus one request timeout.
ROUND_SECONDS = 10.0
# The round's lease: well past the longest round, so two never overlap; short
# enough that a round whose worker died holds nobody up for long.
LEASE_SECONDS = 3 * (ROUND_SECONDS + REQUEST_TIMEOUT_SECONDS)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def body_of(row: events.Row) -> bytes:
    """The POST body: the event's JSON, exactly the bytes that are signed."""
    return json.dumps(events.event_json(row), separators=(",", ":")).encode()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How far one park got in a round: delivered up to, and what stopped it."""

    park_id: str
    delivered: events.Position | None
    error: str | None = None
    delay: float | None = None


@dataclasses.dataclass(frozen=True)
class RoundResult:
    handed_out: int
    delivered: int
    failing_parks: int
    # Another round held the lease: this one did nothing.
    busy: bool = False


@dataclasses.dataclass(frozen=True)
class _Due:
    park_id: str
    failures: int
    pending: events.Position
    rows: list[events.Row]


class Dispatcher:
    """Runs delivery rounds; one per worker process with WEBHOOK_URL set."""

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
        self._started = False
        self.client = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_SECONDS,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=CONCURRENCY),
            headers={"User-Agent": "fleet-payouts-webhooks"},
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def run_round(self) -> RoundResult:
        holder = uuid.uuid4().hex
        async with self.pool.connection() as conn:
            if not self._started:
                await db.execute(conn, Q["start"])
                self._started = True
            if not await db.fetch_one(conn, Q["acquire"], holder=holder, seconds=LEASE_SECONDS):
                return RoundResult(0, 0, 0, busy=True)
        try:
            return await self._round()
        finally:
            async with self.pool.connection() as conn:
                await db.execute(conn, Q["release"], holder=holder)

    async def _round(self) -> RoundResult:
        async with self.pool.connection() as conn:
            handed = await _hand_out(conn)
            rows = await db.fetch_all(
                conn, Q["due"], parks=PARKS_PER_ROUND, per_park=EVENTS_PER_PARK
            )
        deadline = time.monotonic() + ROUND_SECONDS
        gate = asyncio.Semaphore(CONCURRENCY)

        async def serve(due: _Due) -> Outcome | None:
            async with gate:
                if time.monotonic() > deadline:
                    return None
                return await self._deliver(due, deadline)

        found = await asyncio.gather(*(serve(d) for d in _by_park(rows)))
        outcomes = [o for o in found if o is not None]
        if outcomes:
            async with self.pool.connection() as conn:
                await _record(conn, outcomes)
        result = RoundResult(
            handed_out=handed,
            delivered=_delivered_count(rows, outcomes),
            failing_parks=sum(1 for o in outcomes if o.error is not None),
        )
        if result.failing_parks:
            first = next(o for o in outcomes if o.error is not None)
            logger.warning(
                "webhooks: %d events delivered, %d parks failing (park %s: %s)",
                result.delivered,
                result.failing_parks,
                first.park_id,
                first.error,
            )
        elif result.delivered:
            logger.info("webhooks: %d events delivered", result.delivered)
        return result

    async def _deliver(self, due: _Due, deadline: float) -> Outcome:
        """POST one park's events in order; stop at the first failure."""
        if not due.rows:
            # What it was owed is gone (retention): nothing left to send.
            return Outcome(due.park_id, due.pending)
        delivered: events.Position | None = None
        for row in due.rows:
            if delivered is not None and time.monotonic() > deadline:
                break
            error = await self._post(row)
            if error is not None:
                return Outcome(due.park_id, delivered, error, self._delay(due.failures))
            delivered = events.Position.of(row)
        return Outcome(due.park_id, delivered)

    async def _post(self, row: events.Row) -> str | None:
        """Send one event; None on a 2xx, else what went wrong (never the URL)."""
        body = body_of(row)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, int(time.time()), body),
        }
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def _delay(self, failures: int) -> float:
        """Exponential backoff with jitter, capped (RETRY_BACKOFF_CAP_SECONDS)."""
        return min(self.backoff_cap, 2.0 ** min(failures, 16)) * random.uniform(0.75, 1.25)


def _delivered_count(rows: list[events.Row], outcomes: list[Outcome]) -> int:
    reached = {o.park_id: o.delivered for o in outcomes if o.delivered is not None}
    return sum(
        1
        for r in rows
        if r["seq"] is not None
        and r["park_id"] in reached
        and events.Position.of(r) <= reached[r["park_id"]]
    )


def _by_park(rows: list[events.Row]) -> list[_Due]:
    """The due query's rows, one entry per park, in the query's order."""
    parks: dict[str, _Due] = {}
    for row in rows:
        due = parks.get(row["park_id"])
        if due is None:
            pending = events.Position(int(row["pending_xid"]), row["pending_seq"])
            due = parks[row["park_id"]] = _Due(row["park_id"], row["failures"], pending, [])
        if row["seq"] is not None:
            due.rows.append(row)
    return list(parks.values())


async def _hand_out(conn: db.Conn) -> int:
    handed = 0
    for _ in range(HAND_OUT_BATCHES_PER_ROUND):
        row = await db.fetch_one(conn, Q["hand_out"], limit=HAND_OUT_BATCH)
        count = int(row["handed"]) if row else 0
        handed += count
        if count < HAND_OUT_BATCH:
            break
    return handed


async def _record(conn: db.Conn, outcomes: list[Outcome]) -> None:
    await db.execute(
        conn,
        Q["record"],
        park_ids=[o.park_id for o in outcomes],
        xids=[str(o.delivered.xid) if o.delivered else None for o in outcomes],
        seqs=[o.delivered.seq if o.delivered else None for o in outcomes],
        errors=[o.error for o in outcomes],
        delays=[o.delay for o in outcomes],
    )


@dataclasses.dataclass(frozen=True)
class Backlog:
    """Events not yet delivered to WEBHOOK_URL, and how long the oldest has waited."""

    events: int
    oldest_seconds: float


async def backlog(conn: db.Conn) -> Backlog:
    """The webhook backlog (zero if webhooks were never switched on)."""
    row = await db.fetch_one(conn, Q["undelivered"])
    assert row is not None
    return Backlog(int(row["n"]), float(row["oldest_seconds"]))


async def tick(dispatcher: Dispatcher | None) -> None:
    """One round, for the deliver_webhooks job.

    A database outage ends the round quietly: the next tick, a second later,
    tries again, and the undelivered gauge tells if it lasts. Anything else is
    a bug and fails the job, visibly.
    """
    if dispatcher is None:
        logger.warning("deliver_webhooks ran on a worker without WEBHOOK_URL; skipped")
        return
    try:
        await dispatcher.run_round()
    except (psycopg.OperationalError, PoolTimeout) as exc:
        logger.warning("webhook round stopped: %s", exc)
