"""Webhooks beside a consumer path that hangs (issue 17 break 12): 48 parks whose
deliveries never get an answer delay no other park's events (service/events/webhooks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import multiprocessing
import queue
import select
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.core import db
from service.core.background import Every
from service.events import webhooks
from tests.conftest import make_settings
from tests.helpers.emulator import free_port
from tests.helpers.events import Conn, finish, insert_payout, register_parks
from tests.helpers.procs import wait_for

SECRET = "whsec-test-0123456789abcdef"
HANGING = [f"hang-{i:02}" for i in range(48)]
HANGING_SET = frozenset(HANGING)
HEALTHY = [f"ok-{i:02}" for i in range(16)]


class _Handler(http.server.BaseHTTPRequestHandler):
    """The consumer: 204 and a receipt for most parks; no answer at all for HANGING ones,
    for as long as the dispatcher keeps the connection open."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real consumer would

    receipts: Any = None
    hanging_now: Any = None
    most_hanging: Any = None

    def do_POST(self) -> None:  # http.server's naming
        event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if event["payout"]["park_id"] in HANGING_SET:
            self._hang()
            return
        self.receipts.put((event["payout"]["id"], event["type"], time.monotonic()))
        self.send_response(204)
        self.end_headers()

    def _hang(self) -> None:
        with self.hanging_now.get_lock():
            self.hanging_now.value += 1
            self.most_hanging.value = max(self.most_hanging.value, self.hanging_now.value)
        try:
            while True:  # until the dispatcher gives up on the request and closes
                readable, _, _ = select.select([self.connection], [], [], 0.5)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return
        finally:
            with self.hanging_now.get_lock():
                self.hanging_now.value -= 1

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(port: int, receipts: Any, hanging_now: Any, most_hanging: Any) -> None:
    _Handler.receipts, _Handler.hanging_now, _Handler.most_hanging = (
        receipts,
        hanging_now,
        most_hanging,
    )
    server = _Server(("127.0.0.1", port), _Handler)
    server.serve_forever()


class _Server(http.server.ThreadingHTTPServer):
    # A listen backlog of 5 (the default) drops connections under 64 at once, and
    # the SYN retries then add seconds that are the test's, not the dispatcher's.
    request_queue_size = 1024
    daemon_threads = True


@dataclass
class Consumer:
    """A consumer process: its URL, receipts (payout id, type) -> monotonic time of arrival."""

    url: str
    queue: Any
    most_hanging: Any
    received: dict[tuple[str, str], float] = field(default_factory=dict)

    def wait_for(self, expected: set[tuple[str, str]], seconds: float) -> None:
        """Block (in a thread) until every expected receipt has come; fail after `seconds`."""
        deadline = time.monotonic() + seconds
        while not expected <= set(self.received):
            left = deadline - time.monotonic()
            assert left > 0, f"{len(expected - set(self.received))} events never arrived"
            with contextlib.suppress(queue.Empty):
                payout_id, kind, at = self.queue.get(timeout=left)
                self.received[(payout_id, kind)] = at


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    ctx = multiprocessing.get_context("spawn")
    receipts, hanging_now, most_hanging = ctx.Queue(), ctx.Value("i", 0), ctx.Value("i", 0)
    port = free_port()
    proc = ctx.Process(target=_serve, args=(port, receipts, hanging_now, most_hanging), daemon=True)
    proc.start()
    try:
        wait_for(lambda: _listening(port), timeout=30, what="the consumer to listen")
        yield Consumer(f"http://127.0.0.1:{port}/hook", receipts, most_hanging)
    finally:
        proc.terminate()
        proc.join(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_48_hanging_parks_delay_no_other_park(
    pg: Conn, db_url: str, pool: db.Pool, consumer: Consumer
) -> None:
    """While the consumer hangs on every event of 48 parks, each other park's event, written
    behind and among theirs for three request timeouts, arrives in less than one request
    timeout after its commit (so none waited behind a hanging request), and the hanging
    parks never hold more than HEALTHY_SLOTS connections."""
    register_parks(pg, *HANGING, *HEALTHY)
    settings = make_settings(db_url, webhook_url=consumer.url, webhook_secret=SECRET)
    dispatcher = webhooks.Dispatcher(pool, settings)
    await dispatcher.start()
    chore = Every(webhooks.TURN_SECONDS, dispatcher.chore, "webhooks").start()
    committed: dict[tuple[str, str], float] = {}
    try:
        for park in HANGING:  # first in the feed, so first in line
            insert_payout(pg, park)
        payouts = {}
        for park in HEALTHY:
            payouts[park] = insert_payout(pg, park)
            committed[(payouts[park], "payout.created")] = time.monotonic()

        # Three request timeouts of traffic: each healthy park's payout ends, a new one
        # starts. Written from a thread, so the dispatcher's loop is never blocked by it.
        def wave() -> None:
            for park in HEALTHY:
                finish(pg, payouts[park], "succeeded")
                committed[(payouts[park], "payout.succeeded")] = time.monotonic()
                payouts[park] = insert_payout(pg, park)
                committed[(payouts[park], "payout.created")] = time.monotonic()

        end = time.monotonic() + 3 * webhooks.REQUEST_TIMEOUT_SECONDS
        while time.monotonic() < end:
            await asyncio.to_thread(wave)
            # Load pacing, not synchronisation: about two waves of events a second.
            await asyncio.sleep(0.5)
        await asyncio.to_thread(consumer.wait_for, set(committed), 10)
    finally:
        await chore.stop()
        await dispatcher.aclose()
    delays = sorted(consumer.received[k] - t for k, t in committed.items())
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(  # the figure for the report
        f"\nwebhooks beside 48 hanging parks: {len(delays)} events, p50 "
        f"{statistics.median(delays) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {delays[-1] * 1000:.0f} ms; most hanging at once {consumer.most_hanging.value}"
    )
    assert delays[-1] < webhooks.REQUEST_TIMEOUT_SECONDS
    assert consumer.most_hanging.value <= webhooks.HEALTHY_SLOTS
    failing = pg.execute(
        "SELECT count(*) AS n FROM webhook_feed_parks WHERE failures > 0 AND last_error LIKE"
        " 'ReadTimeout%%'"
    ).fetchone()
    assert failing is not None and len(HANGING) == failing["n"]
