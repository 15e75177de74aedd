"""Stopping `serve` and `worker` with SIGTERM, as a deploy does: drained, answered, handed back."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow

from tests.conftest import service_env
from tests.helpers.api import press_headers, register, set_balance, set_faults, transfers
from tests.helpers.procs import Proc, cluster, wait_for

pytestmark = pytest.mark.e2e


def api_proc(c: Any) -> Proc:
    proc: Proc = c.procs[-1]
    assert "serve" == proc.args[0]
    return proc


def press(api: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{api}/v1/payouts/instant", json={}, headers=press_headers(key=key), timeout=30
    )


def waiting_on_lock(pg: psycopg.Connection[DictRow]) -> bool:
    row = pg.execute(
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE application_name = 'fleet-payouts-api' AND wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row["n"])


def log_records(proc: Proc) -> list[dict[str, Any]]:
    records = []
    for line in proc.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_ready_is_503_from_sigterm_while_requests_are_still_served(
    db_url: str, billing_url: str, tmp_path: Path
) -> None:
    """From the moment SIGTERM arrives /ready answers 503, while other requests are still
    served through the drain; then the process exits on its own."""
    env = service_env(db_url, billing_url, API_DRAIN_SECONDS="3", SHUTDOWN_GRACE_SECONDS="5")
    with cluster(env, tmp_path) as c:
        api = c.api()
        register(api)
        assert 200 == httpx.get(f"{api}/ready", timeout=5).status_code
        proc = api_proc(c)
        proc.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(
            lambda: httpx.get(f"{api}/ready", timeout=2).status_code == 503,
            timeout=1.0,
            what="/ready 503 right after SIGTERM",
        )
        assert 202 == press(api, "during-drain").status_code
        assert 200 == httpx.get(f"{api}/ping", timeout=2).status_code
        proc.popen.wait(timeout=15)
        assert time.monotonic() - signalled >= 3.0


def blocking_env(db_url: str, billing_url: str, grace: str) -> dict[str, str]:
    """Timeouts out of the way, so only the stop sequence decides when a blocked press ends."""
    return service_env(
        db_url,
        billing_url,
        API_DRAIN_SECONDS="0.5",
        SHUTDOWN_GRACE_SECONDS=grace,
        API_LOCK_TIMEOUT_SECONDS="60",
        API_STATEMENT_TIMEOUT_SECONDS="60",
    )


@contextlib.contextmanager
def press_blocked_at_sigterm(
    c: Any, db_url: str, pg: psycopg.Connection[DictRow]
) -> Iterator[concurrent.futures.Future[httpx.Response]]:
    """A press waiting on its park's row lock when SIGTERM reaches the API; the lock is
    released when the block ends."""
    api = c.api()
    register(api)
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        psycopg.connect(db_url) as locker,
    ):
        locker.execute("SELECT * FROM parks WHERE park_id = 'p1' FOR UPDATE")
        pending = pool.submit(press, api, "blocked")
        wait_for(lambda: waiting_on_lock(pg), timeout=10, what="press waiting on the lock")
        api_proc(c).popen.send_signal(signal.SIGTERM)
        try:
            yield pending
        finally:
            locker.rollback()
            pending.result(timeout=15)


def test_press_blocked_at_sigterm_gets_a_503_before_the_grace_ends(
    db_url: str, billing_url: str, tmp_path: Path, pg: psycopg.Connection[DictRow]
) -> None:
    """A press stuck behind a lock when the stop begins is answered 503 (nothing written)
    before the grace ends: an answer, never a dropped connection."""
    with (
        cluster(blocking_env(db_url, billing_url, grace="3"), tmp_path) as c,
        press_blocked_at_sigterm(c, db_url, pg) as pending,
    ):
        r = pending.result(timeout=15)
    assert 503 == r.status_code, r.text
    assert "unavailable" == r.json()["code"]
    assert r.headers["Retry-After"].isdigit()
    assert [] == pg.execute("SELECT id FROM payouts").fetchall()


def test_request_in_flight_at_sigterm_finishes_within_the_grace(
    db_url: str, billing_url: str, tmp_path: Path, pg: psycopg.Connection[DictRow]
) -> None:
    """A press still running when the stop begins completes normally if it can within the
    grace period."""
    with cluster(blocking_env(db_url, billing_url, grace="10"), tmp_path) as c:
        with press_blocked_at_sigterm(c, db_url, pg) as pending:
            wait_for(
                lambda: httpx.get(f"{c.api_url}/ready", timeout=2).status_code == 503,
                timeout=2,
                what="the stop to begin",
            )
        r = pending.result(timeout=15)
    assert 202 == r.status_code, r.text


def test_worker_stopped_mid_payout_hands_it_back_quietly(
    db_url: str, billing_url: str, tmp_path: Path, pg: psycopg.Connection[DictRow]
) -> None:
    """A worker stopped while a payout waits on Billing logs the payout it hands back at
    INFO with no ERROR line or traceback; another worker then pays it exactly once."""
    env = service_env(
        db_url, billing_url, SHUTDOWN_GRACE_SECONDS="0.5", BILLING_TIMEOUT_SECONDS="20"
    )
    with cluster(env, tmp_path) as c:
        api = c.api()
        register(api)
        set_balance(billing_url, "p1", "300.00")
        set_faults(billing_url, latency_ms=5000)
        worker = c.worker()
        r = press(api, "k1")
        assert 202 == r.status_code, r.text
        payout_id = r.json()["id"]
        wait_for(
            lambda: pg.execute(
                "SELECT 1 FROM procrastinate_jobs WHERE status = 'doing'"
                " AND task_name = 'execute_payout'"
            ).fetchone(),
            timeout=20,
            what="the payout job running",
        )
        worker.popen.send_signal(signal.SIGTERM)
        worker.popen.wait(timeout=20)

        records = log_records(worker)
        assert [] == [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
        assert [] == [r for r in records if "exc" in r]
        handed = [r for r in records if "handed back" in r["message"]]
        assert [("INFO", payout_id)] == [(r["level"], r.get("payout_id")) for r in handed]

        set_faults(billing_url, latency_ms=0)
        c.worker()
        wait_for(
            lambda: pg.execute(
                "SELECT 1 FROM payouts WHERE id = %s AND status = 'succeeded'", (payout_id,)
            ).fetchone(),
            timeout=60,
            what="the payout to succeed on another worker",
        )
        assert [payout_id] == [t["idempotency_key"] for t in transfers(billing_url)]


def test_answers_during_the_drain_close_keep_alive_connections(
    db_url: str, billing_url: str, tmp_path: Path
) -> None:
    """From SIGTERM on, every answer carries `Connection: close`, so a keep-alive client (a
    load balancer) moves its next request elsewhere instead of writing into a socket the
    process is about to close (issue 17 item 9); before it, connections are kept."""
    env = service_env(db_url, billing_url, API_DRAIN_SECONDS="3", SHUTDOWN_GRACE_SECONDS="5")
    with cluster(env, tmp_path) as c, httpx.Client(base_url=c.api(), timeout=5) as client:
        assert "close" != client.get("/ping").headers.get("connection")
        api_proc(c).popen.send_signal(signal.SIGTERM)
        wait_for(lambda: client.get("/ready").status_code == 503, timeout=2, what="drain began")
        r = client.get("/ping")
        assert (200, "close") == (r.status_code, r.headers.get("connection"))
        api_proc(c).popen.wait(timeout=15)
