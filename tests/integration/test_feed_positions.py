"""Feed positions assigned after commit (migrations/0008; issue 15 breaks 3, 4 and 5):
an idle transaction anywhere in the cluster holds nothing back, a dump restored into a
fresh cluster keeps the feed, its cursors and webhooks going, v5 cursors still resume,
and the app role can read events but never write them."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from fleet_payouts_devkit.postgres import find_pg_bindir, temporary_server
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from service.core import db
from service.events import outbox as events
from service.events import webhooks
from service.ops import migrate
from tests.conftest import drop_database, make_settings, with_dbname
from tests.helpers.api import app_client, assert_error, cursor_of, park_headers
from tests.helpers.events import (
    Conn,
    feed_page,
    finish,
    insert_payout,
    read_all,
    register_parks,
    stored,
)
from tests.helpers.procs import wait_for

SECRET = "whsec-test-0123456789abcdef"


@pytest.fixture
def other_database(pg_server_url: str) -> Iterator[str]:
    """Another database of the same cluster (another application, a DBA's scratch db)."""
    url = with_dbname(pg_server_url, f"fp_other_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(pg_server_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{conninfo_to_dict(url)["dbname"]}" TEMPLATE template0')
    yield url
    drop_database(pg_server_url, url)


def test_an_idle_transaction_in_another_database_holds_nothing_back(
    db_url: str, pg: Conn, other_database: str
) -> None:
    """With a session of another database idle in a transaction that holds an xid, events
    committed afterwards are readable within 1 s, every park's and one park's."""
    register_parks(pg, "a", "b")
    with app_client(db_url) as client, psycopg.connect(other_database) as idle:
        start = feed_page(client)["next_cursor"]
        idle.execute("SELECT pg_current_xact_id()")  # BEGIN; ... and stays open
        committed = time.monotonic()
        created = [insert_payout(pg, "a"), insert_payout(pg, "b")]
        seen = wait_for(
            lambda: len(e := feed_page(client, after=start)["events"]) == 2 and e,
            timeout=1.0,
            interval=0.02,
            what="events committed beside an idle transaction",
        )
        delay = time.monotonic() - committed
        assert created == [e["payout"]["id"] for e in seen]
        assert [created[1]] == [e["payout"]["id"] for e in feed_page(client, park="b")["events"]]
        assert psycopg.pq.TransactionStatus.INTRANS == idle.info.transaction_status
    assert delay < 1.0


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO events (xid, type, park_id, payout_id, payout)"
        " VALUES ('1', 'payout.succeeded', 'a', gen_random_uuid(), '{}')",
        "UPDATE events SET type = 'payout.succeeded'",
        "UPDATE events SET position = NULL",
        "DELETE FROM events",
        "TRUNCATE events",
        "UPDATE events_sequencer SET last_position = 0",
    ],
    ids=["insert", "update", "unstamp", "delete", "truncate", "sequencer"],
)
def test_the_app_role_cannot_write_events(pg: Conn, app_db_url: str, statement: str) -> None:
    """As fleet_payouts_app, every write to the events (or the sequencer's state) is refused
    by privilege: a leaked app password cannot forge, edit or drop a payout event."""
    register_parks(pg, "a")
    insert_payout(pg, "a")
    with (
        psycopg.connect(app_db_url, autocommit=True) as c,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        c.execute(statement)
    assert 1 == len(stored(pg))


def test_the_app_role_stamps_through_the_owner_s_function(pg: Conn, app_db_url: str) -> None:
    """The app role stamps committed events only through events_sequence() and reads them."""
    register_parks(pg, "a")
    insert_payout(pg, "a")
    with psycopg.connect(app_db_url, autocommit=True, row_factory=dict_row) as c:
        assert {"n": 1} == c.execute("SELECT events_sequence() AS n").fetchone()
        row = c.execute("SELECT position FROM events").fetchone()
    assert {"position": 1} == row


def test_a_v5_cursor_resumes_without_skipping(db_url: str, pg: Conn) -> None:
    """A cursor of the (xid, seq) feed resumes right after the events it had reached."""
    register_parks(pg, "a", "b")
    for park in ("a", "b", "a"):
        finish(pg, insert_payout(pg, park), "failed")
    rows = stored(pg)
    xid = int(rows[1]["xid"])
    # The v5 feed issued a cursor only once every transaction up to its xid had ended; a
    # transaction still running elsewhere (the suite makes the next test's database ahead)
    # makes this one not yet "ours" (410), as it should.
    done = "SELECT %s::text::xid8 < pg_snapshot_xmin(pg_current_snapshot()) AS done"
    wait_for(
        lambda: (pg.execute(done, (xid,)).fetchone() or {}).get("done"),
        timeout=30,
        what="every transaction up to the cursor's to end",
    )
    v5 = cursor_of([xid, rows[1]["seq"]])
    with app_client(db_url) as client:
        rest, _ = read_all(client, after=v5)
    assert [r["id"] for r in stored(pg)[2:]] == [e["id"] for e in rest]


def test_a_v5_cursor_from_before_a_restore_says_where_to_resume(db_url: str, pg: Conn) -> None:
    """A v5 cursor that cannot be resolved (ids restarted after a restore) is 410
    cursor_expired with the cursor to resume from: the feed's start."""
    register_parks(pg, "a")
    insert_payout(pg, "a")
    with app_client(db_url) as client:
        r = client.get(
            "/v1/events", params={"after": cursor_of([2**40, 7])}, headers=park_headers()
        )
        assert_error(r, 410, "cursor_expired")
        resumed, _ = read_all(client, after=r.json()["details"]["oldest_cursor"])
    assert [r["id"] for r in stored(pg)] == [e["id"] for e in resumed]


# --- dump and restore into a fresh cluster ------------------------------------------------


def _burn_xids(url: str, n: int) -> None:
    """Move the source cluster's transaction ids well past a fresh cluster's."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            f"DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP;"
            " END $$"
        )


def _dump_restore(source: str, target_server: str, tmp: Path) -> str:
    """pg_dump the source and pg_restore it into a new database of another cluster."""
    bindir = find_pg_bindir()
    assert bindir is not None
    dump = tmp / "feed.dump"
    subprocess.run(
        [str(bindir / "pg_dump"), "--format=custom", f"--file={dump}", source],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(target_server, autocommit=True) as c:
        c.execute('CREATE DATABASE "restored" TEMPLATE template0')
    target = with_dbname(target_server, "restored")
    subprocess.run(
        [str(bindir / "pg_restore"), "--no-owner", "--no-privileges", f"--dbname={target}", dump],
        check=True,
        capture_output=True,
    )
    return target


class Received:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.ids.append(json.loads(request.content)["id"])
        return httpx.Response(200)


async def _deliver(url: str, consumer: Received) -> webhooks.RoundResult:
    pool = db.make_pool(url, name="test", min_size=1, max_size=4)
    await pool.open(wait=True)
    settings = make_settings(url, webhook_url="http://consumer.test/", webhook_secret=SECRET)
    d = webhooks.Dispatcher(pool, settings, transport=httpx.MockTransport(consumer))
    try:
        return await d.run_round()
    finally:
        await d.aclose()
        await pool.close()


async def test_a_dump_restored_into_a_fresh_cluster_keeps_the_feed_going(
    db_url: str, pg: Conn, tmp_path: Path
) -> None:
    """After pg_dump and pg_restore into a fresh cluster (transaction ids restart), the
    feed keeps its order, a cursor issued before goes on with the events written after,
    new events sort after old ones, and webhook delivery resumes where it was."""
    _burn_xids(db_url, 3000)
    register_parks(pg, "a", "b")
    consumer = Received()
    await _deliver(db_url, consumer)  # webhooks on
    for park in ("a", "b"):
        finish(pg, insert_payout(pg, park), "succeeded")
    assert 4 == (await _deliver(db_url, consumer)).delivered
    with app_client(db_url) as client:
        before, cursor = read_all(client)
    insert_payout(pg, "a")  # committed before the dump, neither read nor delivered yet

    with temporary_server("fp-test-restore-", fast_unsafe=True) as server:
        restored = _dump_restore(db_url, server, tmp_path)
        await migrate.migrate(restored)
        with psycopg.connect(restored, autocommit=True, row_factory=dict_row) as new:
            fresh = new.execute("SELECT pg_current_xact_id()::text AS x").fetchone()
            assert fresh is not None
            fresh_xid = int(fresh["x"])
            assert fresh_xid < int(stored(pg)[-1]["xid"])  # ids did restart
            finish(new, stored(new, "a")[-1]["payout_id"], "skipped")
            insert_payout(new, "b")
            with app_client(restored) as client:
                again, _ = read_all(client)
                after_restore, _ = read_all(client, after=cursor)
            expected = [r["id"] for r in stored(new)]
            result = await _deliver(restored, consumer)
    assert [e["id"] for e in before] == [e["id"] for e in again][: len(before)]
    assert expected == [e["id"] for e in again]
    assert expected[len(before) :] == [e["id"] for e in after_restore]
    assert 3 == len(after_restore)
    assert (3, 3) == (result.handed_out, result.delivered)
    assert expected == consumer.ids


async def test_retention_deletes_the_oldest_and_old_cursors_say_where_to_resume(
    db_url: str, pg: Conn, app_db_url: str
) -> None:
    """Events past EVENTS_RETENTION_DAYS are deleted (as the app role, through the owner's
    function); a cursor from before them answers 410 cursor_expired with the oldest cursor,
    which reads on from the first event kept; a cursor at the feed's end goes on as ever."""
    register_parks(pg, "a", "b")
    # Two events of last year (written as the owner could; created_at as then).
    pg.execute(
        "INSERT INTO events (xid, type, park_id, payout_id, payout, created_at)"
        " SELECT pg_current_xact_id(), 'payout.created', 'a', gen_random_uuid(),"
        " jsonb_build_object('id', gen_random_uuid()), now() - interval '1 year'"
        " FROM generate_series(1, 2)"
    )
    pg.execute("SELECT events_sequence()")
    with app_client(db_url) as client:
        first = cursor_of([1])
        end = cursor_of([2])
        kept = [insert_payout(pg, "b")]
        conn = await db.connect(app_db_url, name="test")
        async with conn:
            assert 2 == await events.expire(conn, days=90)
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                await events.expire(conn, days=1)  # the recent feed is not the app's to drop
        r = client.get("/v1/events", params={"after": first}, headers=park_headers())
        assert_error(r, 410, "cursor_expired")
        resumed, _ = read_all(client, after=r.json()["details"]["oldest_cursor"])
        assert kept == [e["payout"]["id"] for e in resumed]
        assert kept == [e["payout"]["id"] for e in read_all(client, after=end)[0]]
        assert kept == [e["payout"]["id"] for e in read_all(client)[0]]
