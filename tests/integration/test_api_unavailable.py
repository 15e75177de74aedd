"""Database trouble at the edge: 503 `unavailable` with Retry-After, quickly, nothing written."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from tests.helpers.api import ADMIN, app_client, assert_error, press_headers, register

ACTION = "payout.instant.request"
NOWHERE = "postgresql://postgres@127.0.0.1:9/nowhere?connect_timeout=1"


def assert_unavailable(r: httpx.Response) -> None:
    """A 503 in the one error shape, telling the caller when to retry."""
    assert_error(r, 503, "unavailable")
    assert r.headers["Retry-After"].isdigit()


def presses_on_record(pg: psycopg.Connection[DictRow]) -> tuple[int, int]:
    """(payouts, audit entries of presses): what a press would have written."""
    row = pg.execute(
        "SELECT (SELECT count(*) FROM payouts) AS payouts,"
        " (SELECT count(*) FROM audit_log WHERE action = %s) AS entries",
        (ACTION,),
    ).fetchone()
    assert row is not None
    return row["payouts"], row["entries"]


@contextlib.contextmanager
def holding(db_url: str, statement: str) -> Iterator[None]:
    """Another session holds the locks `statement` takes until the block ends."""
    with psycopg.connect(db_url) as other:
        other.execute(statement)
        yield
        other.rollback()


def timed_press(client: TestClient, key: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = client.post("/v1/payouts/instant", json={}, headers=press_headers(key=key))
    return r, time.monotonic() - start


def test_presses_on_a_locked_park_answer_503_fast_and_write_nothing(
    db_url: str, pg: psycopg.Connection[DictRow]
) -> None:
    """While another session holds the park row, presses answer 503 within the lock timeout."""
    with app_client(db_url) as client:
        register(client)
        with holding(db_url, "SELECT * FROM parks WHERE park_id = 'p1' FOR UPDATE"):
            answers = [timed_press(client, f"k{i}") for i in range(3)]
        for r, _ in answers:
            assert_unavailable(r)
        # lock_timeout is 1 s by default: well under the 10 s a pool wait used to take
        assert max(seconds for _, seconds in answers) < 4.0, answers
        assert (0, 0) == presses_on_record(pg)
        r, _ = timed_press(client, "k-after")
        assert 202 == r.status_code, r.text


def test_a_slow_statement_answers_503_at_the_statement_timeout(
    db_url: str, pg: psycopg.Connection[DictRow]
) -> None:
    """A statement running past API_STATEMENT_TIMEOUT_SECONDS is cancelled: 503, nothing written."""
    overrides = {"api_statement_timeout_seconds": 0.3, "api_lock_timeout_seconds": 30.0}
    with app_client(db_url, **overrides) as client:
        register(client)
        with holding(db_url, "SELECT * FROM parks WHERE park_id = 'p1' FOR UPDATE"):
            r, seconds = timed_press(client, "k1")
        assert_unavailable(r)
        assert seconds < 3.0
        assert (0, 0) == presses_on_record(pg)


def test_unreachable_database_answers_503_not_500() -> None:
    """With no database at all, park and admin endpoints alike answer 503 with Retry-After."""
    with app_client(NOWHERE, api_pool_timeout_seconds=0.5) as client:
        assert_unavailable(client.post("/v1/payouts/instant", headers=press_headers()))
        assert_unavailable(client.get("/v1/payouts", headers=press_headers()))
        assert_unavailable(client.get("/v1/audit", headers=ADMIN))
        assert 200 == client.get("/ping").status_code


def test_connections_lost_between_requests_answer_503_then_recover(
    db_url: str, pg: psycopg.Connection[DictRow]
) -> None:
    """A pooled connection the server dropped (a restart, a failover) fails one request with
    503, never 500; the pool replaces it and the next request is served."""
    with app_client(db_url, api_pool_min_size=1, api_pool_max_size=1) as client:
        register(client)
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'fleet-payouts-api'"
        )
        statuses = [
            client.get("/v1/payouts", headers=press_headers()).status_code for _ in range(3)
        ]
        assert 503 == statuses[0]
        assert [200, 200] == statuses[1:]


def test_database_trouble_is_one_warning_line_without_traceback(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 for database trouble logs one WARNING (no ERROR, no traceback: no Sentry event)."""
    with app_client(db_url) as client:
        register(client)
        caplog.clear()
        with (
            caplog.at_level(logging.INFO),
            holding(db_url, "SELECT * FROM parks WHERE park_id = 'p1' FOR UPDATE"),
        ):
            r, _ = timed_press(client, "k1")
        assert_unavailable(r)
        trouble = [rec for rec in caplog.records if rec.name == "service.web.errors"]
        assert ["WARNING"] == [rec.levelname for rec in trouble]
        assert [] == [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert [] == [rec for rec in trouble if rec.exc_info]


def test_slow_admin_query_answers_503_at_the_admin_statement_timeout(db_url: str) -> None:
    """An audit query stuck behind a DBA's lock ends at ADMIN_STATEMENT_TIMEOUT_SECONDS with 503,
    while presses keep their own pool."""
    with app_client(db_url, admin_statement_timeout_seconds=0.3) as client:
        register(client)
        with holding(db_url, "LOCK TABLE parks IN ACCESS EXCLUSIVE MODE"):
            start = time.monotonic()
            r = client.get("/v1/parks/p1", headers=ADMIN)
            seconds = time.monotonic() - start
        assert_unavailable(r)
        assert seconds < 3.0
        assert 200 == client.get("/v1/parks/p1", headers=ADMIN).status_code
