"""Helpers for the tests of the events outbox, its feed and webhooks: payouts written and
finished straight in SQL (as any code path would), and the feed read through the API or
straight from the table.
"""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from tests.helpers.api import TIMEOUT, park_headers

Conn = psycopg.Connection[DictRow]

FINAL_COLUMNS = {
    "succeeded": "available = 50.00, amount = 12.50, currency = 'RUB',"
    " billing_params = '{}', ordered_at = now(),"
    " billing_payout_id = 'bp-' || id::text, completed_at = now()",
    "failed": "failure_code = 'insufficient_funds', failure_message = 'no money',"
    " completed_at = now()",
    "skipped": "available = 0, currency = 'RUB', completed_at = now()",
}


def insert_payout(pg: Conn, park: str) -> str:
    """A pending periodic payout for `park` (the in-flight index must allow it); its id."""
    row = pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " VALUES (gen_random_uuid(), %s, 'periodic', 100000) RETURNING id",
        (park,),
    ).fetchone()
    assert row is not None
    return str(row["id"])


def finish(pg: Conn, payout_id: str, status: str = "succeeded") -> None:
    """pending/processing -> `status`, the way the schema's state machine allows it."""
    pg.execute(
        "UPDATE payouts SET status = 'processing' WHERE id = %s AND status = 'pending'",
        (payout_id,),
    )
    pg.execute(
        f"UPDATE payouts SET status = %s, {FINAL_COLUMNS[status]} WHERE id = %s",
        (status, payout_id),
    )


def register_parks(pg: Conn, *parks: str) -> None:
    pg.execute(
        "INSERT INTO parks (park_id, instant_payouts_enabled)"
        " SELECT p, true FROM unnest(%s::text[]) p",
        (list(parks),),
    )


def stored(pg: Conn, park: str | None = None) -> list[DictRow]:
    """The events table in feed order (position; unstamped last, by seq), one park's or all."""
    where = "WHERE park_id = %(park)s" if park else ""
    return pg.execute(
        f"SELECT 'evt_' || e.seq AS id, e.seq, e.xid::text AS xid, e.type, e.park_id,"
        f" e.payout_id::text AS payout_id FROM events e {where} ORDER BY e.position, e.seq",
        {"park": park},
    ).fetchall()


def feed_page(
    api: str | TestClient | httpx.Client,
    *,
    after: str | None = None,
    park: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """One GET /v1/events page (asserted 200): {"events": [...], "next_cursor": ...}."""
    headers = park_headers(park or "unused")
    if park is None:
        del headers["X-Park-Id"]
    params: dict[str, Any] = {}
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    if isinstance(api, str):
        r = httpx.get(f"{api}/v1/events", params=params, headers=headers, timeout=TIMEOUT)
    else:
        r = api.get("/v1/events", params=params, headers=headers)
    assert 200 == r.status_code, r.text
    body: dict[str, Any] = r.json()
    return body


def read_all(
    api: str | TestClient | httpx.Client,
    *,
    after: str | None = None,
    park: str | None = None,
    limit: int | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Every event committed and readable now, following next_cursor to an empty page."""
    seen: list[dict[str, Any]] = []
    while True:
        page = feed_page(api, after=after, park=park, limit=limit)
        after = page["next_cursor"]
        assert after is not None
        if not page["events"]:
            return seen, after
        seen.extend(page["events"])
