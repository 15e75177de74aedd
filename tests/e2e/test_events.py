"""Events end to end (issue 12): concurrent writers against a reader polling GET /v1/events
on a real API process, and webhooks from a real worker to a consumer that was down."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import itertools
import json
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import service_env
from tests.helpers.api import press_headers, set_balance
from tests.helpers.emulator import free_port
from tests.helpers.events import FINAL_COLUMNS, Conn, read_all, register_parks, stored
from tests.helpers.procs import cluster, wait_for

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-0123456789abcdef"
FINAL = tuple(FINAL_COLUMNS)
# Short enough that a park can be pressed again within the test.
COOLDOWN_HOURS = "0.00001"


# --- three SQL writers, real presses, one reader ------------------------------------------


@dataclass
class Commit:
    """One writer transaction: the seqs of the events it wrote, and when it committed as
    seen from outside (ticks of one shared counter, taken just before and just after)."""

    seqs: list[int]
    before: int
    after: int


@dataclass
class Workload:
    db_url: str
    parks: list[str]
    ops_per_writer: int
    ticks: Iterator[int] = field(default_factory=itertools.count)
    tick_lock: threading.Lock = field(default_factory=threading.Lock)
    commits: list[Commit] = field(default_factory=list)
    press_statuses: list[int] = field(default_factory=list)

    def tick(self) -> int:
        with self.tick_lock:
            return next(self.ticks)

    def writer(self, seed: int) -> None:
        """Finish or create a payout of a random park, in a transaction held open a random
        while, with its transaction id taken early half of the time (as the instant path's
        park lock does). Each step locks what the service's own code path would."""
        rng = random.Random(seed)
        with psycopg.connect(
            self.db_url, autocommit=True, row_factory=dict_row, options="-c lock_timeout=20s"
        ) as conn:
            for _ in range(self.ops_per_writer):
                park = rng.choice(self.parks)
                # Taken by a worker in a statement of its own, as the payout job does.
                conn.execute(
                    "UPDATE payouts SET status = 'processing'"
                    " WHERE park_id = %s AND status = 'pending'",
                    (park,),
                )
                with conn.transaction():
                    if rng.random() < 0.5:
                        # An id taken early, then a while before the park is looked at:
                        # another writer's commit for the park can land in between.
                        conn.execute("SELECT pg_current_xact_id()")
                        conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.01),))
                    changed = self._finish(conn, park, rng) or self._create(conn, park)
                    seqs = self._seqs(conn, *changed) if changed else []
                    conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
                    before = self.tick()
                after = self.tick()
                if seqs:
                    self.commits.append(Commit(seqs, before, after))

    @staticmethod
    def _seqs(conn: Conn, payout_id: str, kind: str) -> list[int]:
        return [
            r["seq"]
            for r in conn.execute(
                "SELECT seq FROM events WHERE payout_id = %s AND type = %s", (payout_id, kind)
            ).fetchall()
        ]

    @staticmethod
    def _finish(conn: Conn, park: str, rng: random.Random) -> tuple[str, str] | None:
        status = rng.choice(FINAL)
        row = conn.execute(
            f"UPDATE payouts SET status = %s, {FINAL_COLUMNS[status]}"
            " WHERE park_id = %s AND status = 'processing' RETURNING id::text AS id",
            (status, park),
        ).fetchone()
        return (str(row["id"]), f"payout.{status}") if row else None

    @staticmethod
    def _create(conn: Conn, park: str) -> tuple[str, str] | None:
        # As the instant and periodic paths do: lock the park, then look, then insert.
        conn.execute("SELECT 1 FROM parks WHERE park_id = %s FOR UPDATE", (park,))
        row = conn.execute(
            "INSERT INTO payouts (id, park_id, kind, max_amount)"
            " SELECT gen_random_uuid(), %(park)s, 'periodic', 100000"
            " WHERE NOT EXISTS (SELECT 1 FROM payouts WHERE park_id = %(park)s"
            "                   AND status IN ('pending', 'processing'))"
            " RETURNING id::text AS id",
            {"park": park},
        ).fetchone()
        return (str(row["id"]), "payout.created") if row else None

    def presser(self, api: str, presses: int) -> None:
        """Real "Pay out now" presses through the API on the same parks."""
        rng = random.Random(99)
        with httpx.Client(base_url=api, timeout=30) as client:
            for _ in range(presses):
                park = rng.choice(self.parks)
                headers = press_headers(park, key=uuid.uuid4().hex)
                r = client.post("/v1/payouts/instant", json={}, headers=headers)
                self.press_statuses.append(r.status_code)


def test_concurrent_writers_are_read_once_in_commit_order_per_park(
    db_url: str, billing_url: str, pg: Conn, tmp_path: Path
) -> None:
    """Three SQL writers committing out of order and real presses, while a reader polls with
    the cursor: every event is seen exactly once, each park's in commit order, including
    events of transactions that committed after a later-numbered one."""
    parks = [f"park-{i}" for i in range(6)]
    register_parks(pg, *parks)
    env = service_env(db_url, billing_url, INSTANT_PAYOUT_COOLDOWN_HOURS=COOLDOWN_HOURS)
    with cluster(env, tmp_path) as c:
        api = c.api()
        load = Workload(db_url, parks, ops_per_writer=60)
        threads = [threading.Thread(target=load.writer, args=(seed,)) for seed in range(3)]
        threads.append(threading.Thread(target=load.presser, args=(api, 40)))
        for t in threads:
            t.start()
        seen: list[dict[str, Any]] = []
        cursor: str | None = None
        rng = random.Random(7)
        with httpx.Client(base_url=api, timeout=30) as reader:
            while any(t.is_alive() for t in threads):
                page, cursor = read_all(reader, after=cursor, limit=rng.randint(1, 100))
                seen.extend(page)
            for t in threads:
                t.join()
            # Nothing is running now: whatever committed is readable, and must come.
            page, cursor = read_all(reader, after=cursor)
            seen.extend(page)

    assert set() == {s for s in load.press_statuses if s >= 500}
    assert 202 in load.press_statuses
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)), "an event was seen twice"
    assert [e["id"] for e in stored(pg)] == ids, "missed, or out of the feed's order"
    by_park: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for e in seen:
        by_park[e["payout"]["park_id"]].append((e["type"], e["payout"]["id"]))
    for park, sequence in by_park.items():
        # One payout at a time per park: created, final, created, final... is commit order.
        for i, (kind, payout_id) in enumerate(sequence):
            assert ("payout.created" == kind) == (i % 2 == 0), (park, sequence)
            if i % 2:
                assert sequence[i - 1][1] == payout_id, (park, sequence)
    assert _committed_after_a_later_numbered_one(load.commits) > 0


def _committed_after_a_later_numbered_one(commits: list[Commit]) -> int:
    """How many transactions surely committed after one holding a larger seq."""
    return sum(
        1 for a in commits if any(b.after < a.before and max(b.seqs) > min(a.seqs) for b in commits)
    )


# --- webhooks to a consumer that is down for a while -----------------------------------------


class Consumer:
    """A webhook consumer on a real socket, as the README tells Opteum to write one: check
    the signature and its age, dedupe by id, answer 2xx. Not listening until start()."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.arrivals: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        consumer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(self.headers.get("X-Fleet-Payouts-Signature", ""), body)
                with consumer.lock:
                    if ok:
                        consumer.arrivals.append(json.loads(body))
                    else:
                        consumer.bad_signatures += 1
                self.send_response(204 if ok else 400)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def first_seen(self) -> list[dict[str, Any]]:
        """Arrivals deduplicated by id, in the order each id first arrived."""
        with self.lock:
            unique = {e["id"]: e for e in reversed(self.arrivals)}
            order = list(dict.fromkeys(e["id"] for e in self.arrivals))
        return [unique[i] for i in order]


def verify(header: str, body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    if "t" not in parts or "v1" not in parts or not parts["t"].isdigit():
        return False
    mac = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(mac.hexdigest(), parts["v1"])


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    c = Consumer(free_port())
    try:
        yield c
    finally:
        c.stop()


def test_webhooks_reach_a_consumer_that_was_down_all_in_order_per_park(
    db_url: str, billing_url: str, pg: Conn, tmp_path: Path, consumer: Consumer
) -> None:
    """Payouts made while the consumer is unreachable are all delivered once it comes up:
    signed, each park's events in commit order, bodies equal to the API's events."""
    pressed = ["p1", "p2", "p3"]
    register_parks(pg, *pressed, "by-sql")
    for park in pressed:
        set_balance(billing_url, park, "300.00")
    env = service_env(
        db_url,
        billing_url,
        INSTANT_PAYOUT_COOLDOWN_HOURS=COOLDOWN_HOURS,
        WEBHOOK_URL=f"http://127.0.0.1:{consumer.port}/hooks",
        WEBHOOK_SECRET=SECRET,
    )
    with cluster(env, tmp_path) as c:
        api = c.api()
        c.worker()
        # Deliveries start with what commits once the worker has switched webhooks on.
        wait_for(
            lambda: pg.execute("SELECT 1 FROM webhook_feed").fetchone(),
            timeout=60,
            what="the worker to switch webhooks on",
        )
        for _ in range(2):
            for park in pressed:
                headers = press_headers(park, key=uuid.uuid4().hex)
                r = httpx.post(f"{api}/v1/payouts/instant", json={}, headers=headers, timeout=30)
                assert 202 == r.status_code, r.text
            wait_for(lambda: not _in_flight(pg), timeout=60, what="payouts to finish")
        for status in ("failed", "skipped"):
            row = pg.execute(
                "INSERT INTO payouts (id, park_id, kind, max_amount)"
                " VALUES (gen_random_uuid(), 'by-sql', 'periodic', 100000) RETURNING id::text"
            ).fetchone()
            assert row is not None
            pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (row["id"],))
            pg.execute(
                f"UPDATE payouts SET status = %s, {FINAL_COLUMNS[status]} WHERE id = %s",
                (status, row["id"]),
            )
        parks_with_events = {*pressed, "by-sql"}
        wait_for(
            lambda: parks_with_events <= _tried_and_failed(pg),
            timeout=60,
            what="deliveries to be tried while the consumer is down",
        )
        assert [] == consumer.arrivals

        consumer.start()
        expected = stored(pg)
        wait_for(
            lambda: len(consumer.first_seen()) >= len(expected),
            timeout=60,
            what="every event to reach the consumer",
        )
        feed, _ = read_all(api)

    assert 0 == consumer.bad_signatures
    received = consumer.first_seen()
    assert {e["id"] for e in expected} == {e["id"] for e in received}
    for park in parks_with_events:
        in_feed = [e["id"] for e in stored(pg, park)]
        assert in_feed == [e["id"] for e in received if e["payout"]["park_id"] == park], park
    assert sorted(feed, key=lambda e: e["id"]) == sorted(received, key=lambda e: e["id"])
    assert 12 + 4 == len(received)


def _in_flight(pg: Conn) -> bool:
    row = pg.execute(
        "SELECT count(*) AS n FROM payouts WHERE status IN ('pending', 'processing')"
    ).fetchone()
    return row is not None and row["n"] > 0


def _tried_and_failed(pg: Conn) -> set[str]:
    return {
        r["park_id"]
        for r in pg.execute(
            "SELECT park_id FROM webhook_feed_parks WHERE failures > 0 AND last_error IS NOT NULL"
        ).fetchall()
    }
