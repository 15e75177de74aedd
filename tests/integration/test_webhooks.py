"""The webhook dispatcher in-process against a real database, with the consumer as an
httpx mock: what a round sends, signs, retries and records (service/events/webhooks.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from service.core import db
from service.events import outbox as events
from service.events import webhooks
from service.ops import gauges
from tests.conftest import make_settings
from tests.helpers.events import Conn, finish, insert_payout, register_parks, stored

SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Consumer:
    """Records what it is sent; `refuse(request)` picks the requests it answers 500."""

    refuse: Callable[[dict[str, Any]], bool] = lambda event: False
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        parts = dict(
            p.split("=", 1) for p in request.headers["X-Fleet-Payouts-Signature"].split(",")
        )
        mac = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest(), parts["v1"]):
            self.bad_signatures += 1
            return httpx.Response(400)
        event = json.loads(body)
        if self.refuse(event):
            return httpx.Response(500)
        self.received.append(event)
        return httpx.Response(204)

    def ids(self, park: str | None = None) -> list[str]:
        return [e["id"] for e in self.received if park in (None, e["payout"]["park_id"])]


@pytest.fixture
def consumer() -> Consumer:
    return Consumer()


@pytest.fixture
async def dispatcher(
    db_url: str, pool: db.Pool, consumer: Consumer
) -> AsyncIterator[webhooks.Dispatcher]:
    settings = make_settings(db_url, webhook_url="http://consumer.test/hook", webhook_secret=SECRET)
    d = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(consumer))
    await d.start()  # WEBHOOK_URL set before the test's events
    try:
        yield d
    finally:
        await d.aclose()


def park_state(pg: Conn, park: str) -> dict[str, Any]:
    row = pg.execute(
        "SELECT failures, last_error, next_attempt_at IS NULL AS idle,"
        " next_attempt_at > now() AS waiting FROM webhook_feed_parks WHERE park_id = %s",
        (park,),
    ).fetchone()
    assert row is not None
    return dict(row)


def make_due(pg: Conn) -> None:
    """Skip the backoff wait: every park owed something is due now."""
    pg.execute(
        "UPDATE webhook_feed_parks SET next_attempt_at = now() WHERE next_attempt_at IS NOT NULL"
    )


async def undelivered(pool: db.Pool) -> int:
    async with pool.connection() as conn:
        return (await webhooks.backlog(conn)).events


async def test_every_event_is_sent_once_signed_and_in_order(
    pg: Conn, dispatcher: webhooks.Dispatcher, consumer: Consumer, pool: db.Pool
) -> None:
    """A round sends each event once with a valid signature, in feed order; the next round
    has nothing to send."""
    register_parks(pg, "a", "b")
    for park in ("a", "b", "a"):
        finish(pg, insert_payout(pg, park), "succeeded")
    assert 6 == await undelivered(pool)  # committed, not stamped yet: counted
    result = await dispatcher.run_round()
    assert (6, 6, 0) == (result.handed_out, result.delivered, result.failing_parks)
    assert 0 == consumer.bad_signatures
    for park in ("a", "b"):
        assert [e["id"] for e in stored(pg, park)] == consumer.ids(park)
    assert 0 == await undelivered(pool)
    again = await dispatcher.run_round()
    assert (0, 0) == (again.handed_out, again.delivered)
    assert 6 == len(consumer.received)


async def test_the_body_is_the_api_s_event(
    pg: Conn, dispatcher: webhooks.Dispatcher, consumer: Consumer, db_url: str
) -> None:
    """The POSTed JSON is exactly the event GET /v1/events gives."""
    from tests.helpers.api import app_client
    from tests.helpers.events import read_all

    register_parks(pg, "a")
    finish(pg, insert_payout(pg, "a"), "skipped")
    await dispatcher.run_round()
    with app_client(db_url) as client:
        feed, _ = read_all(client)
    assert feed == consumer.received


async def test_a_failing_park_waits_alone_and_resumes_in_order(
    pg: Conn, dispatcher: webhooks.Dispatcher, consumer: Consumer, pool: db.Pool
) -> None:
    """Events of a park whose consumer answers 500 wait with a backoff and a recorded error,
    counted by the undelivered gauges; other parks are served meanwhile; once accepted, the
    park's events arrive in order and the gauges drop to zero."""
    register_parks(pg, "a", "b")
    for park in ("a", "b", "a", "b"):
        finish(pg, insert_payout(pg, park), "failed")
    consumer.refuse = lambda event: event["payout"]["park_id"] == "a"
    result = await dispatcher.run_round()
    assert (4, 1) == (result.delivered, result.failing_parks)
    assert [e["id"] for e in stored(pg, "b")] == consumer.ids("b")
    assert [] == consumer.ids("a")
    assert {"failures": 1, "last_error": "HTTP 500", "idle": False, "waiting": True} == (
        park_state(pg, "a")
    )
    assert 4 == await undelivered(pool)
    await gauges.refresh_gauges(pool)
    assert 4 == REGISTRY.get_sample_value("fleet_payouts_events_undelivered")
    assert 0 < (REGISTRY.get_sample_value("fleet_payouts_events_oldest_undelivered_seconds") or 0)
    await dispatcher.run_round()  # not due yet: nothing is tried
    assert [] == consumer.ids("a")

    consumer.refuse = lambda event: False
    make_due(pg)
    await dispatcher.run_round()
    assert [e["id"] for e in stored(pg, "a")] == consumer.ids("a")
    assert {"failures": 0, "last_error": None, "idle": True, "waiting": None} == (
        park_state(pg, "a")
    )
    await gauges.refresh_gauges(pool)
    assert 0 == REGISTRY.get_sample_value("fleet_payouts_events_undelivered")
    assert 0 == REGISTRY.get_sample_value("fleet_payouts_events_oldest_undelivered_seconds")


async def test_a_failure_midway_resends_from_the_first_unaccepted_event(
    pg: Conn, dispatcher: webhooks.Dispatcher, consumer: Consumer
) -> None:
    """When the second of a park's events is refused, the first stays delivered and the next
    attempt starts at the second."""
    register_parks(pg, "a")
    finish(pg, insert_payout(pg, "a"), "succeeded")
    ids = [e["id"] for e in stored(pg, "a")]
    consumer.refuse = lambda event: event["id"] == ids[1]
    await dispatcher.run_round()
    assert ids[:1] == consumer.ids()
    consumer.refuse = lambda event: False
    make_due(pg)
    await dispatcher.run_round()
    assert ids == consumer.ids()


async def test_an_open_transaction_holds_back_only_its_own_events(
    pg: Conn, dispatcher: webhooks.Dispatcher, consumer: Consumer, db_url: str
) -> None:
    """An event committed while another transaction with an earlier-numbered event is open
    goes out at once; the open one's event follows when it commits."""
    register_parks(pg, "a", "b")
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as slow:
        with slow.transaction():
            insert_payout(slow, "a")
            insert_payout(pg, "b")
            held = await dispatcher.run_round()
            assert (1, 1) == (held.handed_out, held.delivered)
            assert [e["id"] for e in stored(pg, "b")] == consumer.ids()
        await dispatcher.run_round()
    assert [e["id"] for e in stored(pg, "b") + stored(pg, "a")] == consumer.ids()


async def test_a_consumer_that_cannot_be_reached_is_recorded(
    pg: Conn, db_url: str, pool: db.Pool
) -> None:
    """A connection error counts as a failure, with its reason, and the park backs off."""

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    settings = make_settings(db_url, webhook_url="http://consumer.test/", webhook_secret=SECRET)
    d = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(unreachable))
    await d.start()
    register_parks(pg, "a")
    insert_payout(pg, "a")
    try:
        result = await d.run_round()
    finally:
        await d.aclose()
    assert (0, 1) == (result.delivered, result.failing_parks)
    state = park_state(pg, "a")
    assert (1, "ConnectError: connection refused", True) == (
        state["failures"],
        state["last_error"],
        state["waiting"],
    )


async def test_one_process_delivers_at_a_time_and_a_dead_holder_s_lease_lapses(
    pg: Conn, db_url: str, pool: db.Pool
) -> None:
    """While one dispatcher holds the feed's lease (renewed each turn) another does nothing;
    a lease left by a process that died lapses, and the next dispatcher takes over."""
    register_parks(pg, "a")
    settings = make_settings(db_url, webhook_url="http://consumer.test/", webhook_secret=SECRET)
    ok = httpx.MockTransport(lambda request: httpx.Response(200))
    first = webhooks.Dispatcher(pool, settings, transport=ok)
    second = webhooks.Dispatcher(pool, settings, transport=ok)
    try:
        await first.start()
        insert_payout(pg, "a")
        assert (1, False) == ((r := await first.run_round()).delivered, r.busy)
        assert webhooks.RoundResult(0, 0, 0, busy=True) == await second.run_round()
        assert (0, False) == ((r := await first.run_round()).delivered, r.busy)

        pg.execute("UPDATE webhook_feed SET lease_until = now() - interval '1s'")  # died
        finish(pg, stored(pg, "a")[0]["payout_id"], "skipped")  # one more event
        assert (1, False) == ((r := await second.run_round()).delivered, r.busy)
        assert webhooks.RoundResult(0, 0, 0, busy=True) == await first.run_round()
    finally:
        await first.aclose()
        await second.aclose()


async def test_the_undelivered_gauge_reads_a_bounded_amount(
    pg: Conn, dispatcher: webhooks.Dispatcher, pool: db.Pool
) -> None:
    """With thousands of delivered events and a few owed, the undelivered gauge counts the
    owed ones exactly and reads a handful of pages (indexes and two state rows, never the
    history): a year of events costs it what a day does."""
    parks = [f"p{i}" for i in range(3000)]
    register_parks(pg, *parks)
    pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " SELECT gen_random_uuid(), p, 'periodic', 100000 FROM unnest(%s::text[]) p",
        (parks,),
    )
    await dispatcher.run_round()
    assert 0 == await undelivered(pool)
    finish(pg, stored(pg, "p7")[0]["payout_id"], "failed")  # handed out, not delivered
    pg.execute("ANALYZE events")
    async with pool.connection() as conn:
        await events.sequence(conn)
        await webhooks._hand_out(conn)  # one step of a turn, alone
    finish(pg, stored(pg, "p8")[0]["payout_id"], "skipped")  # committed, not stamped
    assert 2 == await undelivered(pool)
    plan = pg.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + webhooks.Q["undelivered"],
        {"cap": webhooks.UNSTAMPED_CAP},
    ).fetchone()
    assert plan is not None
    top = next(iter(plan.values()))[0]["Plan"]
    pages = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    assert "Seq Scan on events" not in json.dumps(top)
    assert pages < 40, pages


async def test_webhooks_of_the_version_before_go_on_where_they_were(
    pg: Conn, db_url: str, pool: db.Pool, consumer: Consumer
) -> None:
    """With webhooks on under v5 (webhook_state had delivered the first two events), the
    new dispatcher starts right after them, not at the feed's end nor at its start."""
    register_parks(pg, "a", "b")
    for park in ("a", "b"):
        finish(pg, insert_payout(pg, park), "succeeded")
    rows = stored(pg)
    pg.execute(
        "INSERT INTO webhook_state (xid, seq) VALUES (%s::xid8, %s)",
        (rows[1]["xid"], rows[1]["seq"]),
    )
    settings = make_settings(db_url, webhook_url="http://consumer.test/", webhook_secret=SECRET)
    d = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(consumer))
    try:
        await d.run_round()
    finally:
        await d.aclose()
    assert [r["id"] for r in stored(pg)[2:]] == consumer.ids()
