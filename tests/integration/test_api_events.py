"""GET /v1/events against SPEC section 3: the feed's contents, cursor, filters and refusals."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from starlette.testclient import TestClient

from service.core import db
from service.events import outbox as events
from tests.helpers.api import (
    ADMIN_AUTH,
    assert_error,
    cursor_of,
    park_headers,
    press_headers,
    register,
)
from tests.helpers.events import (
    Conn,
    feed_page,
    finish,
    insert_payout,
    read_all,
    register_parks,
    stored,
)
from tests.helpers.metrics import statements_sent


def press(client: TestClient, park: str, key: str = "k1") -> dict[str, Any]:
    r = client.post("/v1/payouts/instant", json={}, headers=press_headers(park, key=key))
    assert 202 == r.status_code, r.text
    body: dict[str, Any] = r.json()
    return body


def payout_now(client: TestClient, park: str, payout_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/payouts/{payout_id}", headers=park_headers(park))
    assert 200 == r.status_code, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_press_and_its_outcome_are_two_events_carrying_the_payout(
    client: TestClient, pg: Conn
) -> None:
    """A press gives payout.created with the payout as answered; its end gives payout.succeeded
    with the payout as GET /v1/payouts/{id} shows it then."""
    register(client, "p1")
    accepted = press(client, "p1")
    finish(pg, accepted["id"], "succeeded")
    seen, _ = read_all(client)
    assert ["payout.created", "payout.succeeded"] == [e["type"] for e in seen]
    assert accepted == seen[0]["payout"]
    assert payout_now(client, "p1", accepted["id"]) == seen[1]["payout"]
    assert {"id", "type", "created_at", "payout"} == set(seen[0])
    assert [e["id"] for e in stored(pg)] == [e["id"] for e in seen]


def test_the_park_header_narrows_the_feed_to_that_park(client: TestClient, pg: Conn) -> None:
    """With X-Park-Id only that park's events come back; without it, every park's."""
    register_parks(pg, "a", "b")
    for park in ("a", "b", "a"):
        finish(pg, insert_payout(pg, park), "skipped")
    everyone, _ = read_all(client)
    only_a, _ = read_all(client, park="a")
    assert [e["id"] for e in stored(pg)] == [e["id"] for e in everyone]
    assert [e["id"] for e in stored(pg, "a")] == [e["id"] for e in only_a]
    assert {"a"} == {e["payout"]["park_id"] for e in only_a}
    assert 4 == len(only_a)


def test_pages_of_any_size_cover_the_feed_once(client: TestClient, pg: Conn) -> None:
    """Walking with limit=3 returns every event exactly once, in feed order, in pages of 3."""
    register_parks(pg, "a", "b")
    for park in ("a", "b", "a", "b"):
        finish(pg, insert_payout(pg, park), "failed")
    sizes = []
    after = None
    seen: list[dict[str, Any]] = []
    while True:
        page = feed_page(client, after=after, limit=3)
        sizes.append(len(page["events"]))
        seen.extend(page["events"])
        after = page["next_cursor"]
        if not page["events"]:
            break
    assert [3, 3, 2, 0] == sizes
    assert [e["id"] for e in stored(pg)] == [e["id"] for e in seen]


def test_next_cursor_is_always_given_and_waits_for_newer_events(
    client: TestClient, pg: Conn
) -> None:
    """An empty feed, and the end of a feed, still answer a cursor; passed back, it returns only
    what committed since."""
    register_parks(pg, "a")
    empty = feed_page(client)
    assert [] == empty["events"] and empty["next_cursor"]
    payout_id = insert_payout(pg, "a")
    first = feed_page(client, after=empty["next_cursor"])
    assert ["payout.created"] == [e["type"] for e in first["events"]]
    at_end = feed_page(client, after=first["next_cursor"])
    assert {"events": [], "next_cursor": first["next_cursor"]} == at_end
    finish(pg, payout_id, "skipped")
    newer = feed_page(client, after=at_end["next_cursor"])
    assert ["payout.skipped"] == [e["type"] for e in newer["events"]]


def test_a_transaction_committing_after_a_later_numbered_one_is_not_skipped(
    client: TestClient, pg: Conn, db_url: str
) -> None:
    """While a transaction holding an earlier-numbered event is open, a later-numbered event
    that has committed is readable at once; the first comes after it once it commits, and
    none is lost (the feed follows commit order, not seq)."""
    register_parks(pg, "a", "b")
    start = feed_page(client)["next_cursor"]
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as slow:
        with slow.transaction():
            early = insert_payout(slow, "a")
            late = insert_payout(pg, "b")  # commits at once
            held = feed_page(client, after=start)
            assert [late] == [e["payout"]["id"] for e in held["events"]]
        rest, _ = read_all(client, after=held["next_cursor"])
    assert [early] == [e["payout"]["id"] for e in rest]
    rows = {r["payout_id"]: r["seq"] for r in stored(pg)}
    assert rows[early] < rows[late]  # the later-numbered one committed first


async def test_an_empty_page_is_one_indexed_statement(db_url: str, pg: Conn) -> None:
    """Reading past the end costs two statements (stamp, read), and neither the feeds nor the
    sequencer plan a scan of the table."""
    parks = [f"p{i}" for i in range(2000)]
    register_parks(pg, *parks)
    pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " SELECT gen_random_uuid(), p, 'periodic', 100000 FROM unnest(%s::text[]) p",
        (parks,),
    )
    conn = await db.connect(db_url, name="test")
    async with conn:
        assert 2000 == await events.sequence(conn, events.SEQUENCE_BATCH)
        last = (await events.page(conn, after=events.START, limit=100, park_id=None)).next
        pg.execute("ANALYZE events")  # as autovacuum would, once the events are stamped
        end = 2000
        before = statements_sent()
        page = await events.page(conn, after=end, limit=100, park_id=None)
        assert 2 == statements_sent() - before
        assert ([], end) == (page.events, page.next)
        for name, park in (("page", None), ("park_page", "p7")):
            plan = await _plan(conn, events.Q[name], last, park)
            assert "Seq Scan on events " not in plan, plan
        stamp = await _plan(conn, "SELECT 1 FROM events WHERE position IS NULL", 0, None)
        assert "events_unstamped" in stamp, stamp
    assert last < end


async def _plan(conn: db.Conn, query: Any, after: int, park: str | None) -> str:
    cur = await conn.execute(
        b"EXPLAIN " + query.encode(), {"after": after, "limit": 100, "park_id": park}
    )
    return "\n".join(str(next(iter(r.values()))) for r in await cur.fetchall())


FORGED_CURSORS = {
    "not-base64-json": "abc",
    "garbage": "!!!",
    "object": cursor_of({"xid": 1, "seq": 1}),
    "strings": cursor_of(["1", "2"]),
    "negative": cursor_of([-1, 5]),
    "booleans": cursor_of([True, True]),
    "floats": cursor_of([1.5, 2]),
    "too-big": cursor_of([2**64, 1]),
    "too-long": cursor_of([1, 2, 3]),
    "from-the-future": cursor_of([2**62]),
    "position-too-big": cursor_of([2**63]),
}


@pytest.mark.parametrize("cursor", list(FORGED_CURSORS.values()), ids=list(FORGED_CURSORS))
def test_a_cursor_the_api_did_not_issue_is_refused(client: TestClient, cursor: str) -> None:
    """A malformed cursor, or one past anything the feed has reached, is 400 invalid_request."""
    r = client.get("/v1/events", params={"after": cursor}, headers=park_headers())
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", ""])
def test_a_limit_outside_1_to_100_is_refused(client: TestClient, limit: str) -> None:
    """A limit that is not an integer from 1 to 100 is 400 invalid_request."""
    r = client.get("/v1/events", params={"limit": limit}, headers=park_headers())
    assert_error(r, 400, "invalid_request")


def test_a_malformed_park_header_is_refused_not_widened(client: TestClient) -> None:
    """A present but malformed X-Park-Id is 400, never read as 'every park'."""
    r = client.get("/v1/events", headers=park_headers("bad park!"))
    assert_error(r, 400, "invalid_request")


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [({}, 401, "unauthorized"), (ADMIN_AUTH, 403, "forbidden")],
    ids=["no-token", "admin-token"],
)
def test_the_feed_needs_an_api_token(
    client: TestClient, headers: dict[str, str], status: int, code: str
) -> None:
    """Without a token the feed is 401; with an admin token, 403 (it is Opteum's endpoint)."""
    assert_error(client.get("/v1/events", headers=headers), status, code)
