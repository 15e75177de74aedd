"""Helpers shared by the tests that drive the service's HTTP API, the Billing emulator's admin
endpoints and the test database directly.

Service calls take either the base URL of a running `fleet-payouts serve` (e2e tests) or a
client for the app (`app_client`, the `client` fixture), so the same helper serves both.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.core import db
from service.web.app import create_app
from tests.conftest import ADMIN_TOKEN, API_TOKEN, make_settings
from tests.helpers.procs import wait_for

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")
TIMEOUT = 10


# --- headers -----------------------------------------------------------------------


ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def admin_headers(user: str = "admin-1") -> dict[str, str]:
    """An admin token acting as `user`."""
    return {**ADMIN_AUTH, "X-User-Id": user}


ADMIN = admin_headers()


def park_headers(park: str = "p1") -> dict[str, str]:
    """An API token calling on behalf of `park`."""
    return {"Authorization": f"Bearer {API_TOKEN}", "X-Park-Id": park}


def press_headers(
    park: str = "p1", user: str = "u1", key: str = "k1", **extra: str
) -> dict[str, str]:
    """What a "Pay out now" press sends: the park's headers, the user and an idempotency key."""
    return {**park_headers(park), "X-User-Id": user, "Idempotency-Key": key, **extra}


# --- the service -------------------------------------------------------------------


def app_client(db_url: str, **overrides: Any) -> TestClient:
    """A client for the API app on `db_url`, with `make_settings` overrides."""
    return TestClient(create_app(make_settings(db_url, **overrides)))


def register(
    api: str | httpx.Client,
    park: str = "p1",
    *,
    instant: bool | None = True,
    periodic: bool | None = None,
    user: str = "admin-1",
    status: int | None = None,
    **fields: Any,
) -> httpx.Response:
    """Register (or update) a park with PUT /v1/parks/{park} as admin `user`.

    `instant` and `periodic` set the park's flags (None leaves a flag out of the body); `fields`
    are further body fields. The answer must be `status` if given, else 200 or 201.
    """
    body: dict[str, Any] = {}
    if instant is not None:
        body["instant_payouts_enabled"] = instant
    if periodic is not None:
        body["periodic_payouts_enabled"] = periodic
    body.update(fields)
    headers = admin_headers(user)
    if isinstance(api, str):
        r = httpx.put(f"{api}/v1/parks/{park}", json=body, headers=headers, timeout=TIMEOUT)
    else:
        r = api.put(f"/v1/parks/{park}", json=body, headers=headers)
    if status is None:
        assert r.status_code in (200, 201), r.text
    else:
        assert status == r.status_code, r.text
    return r


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an error envelope with this status and code; returns its body."""
    assert status == r.status_code, r.text
    body: dict[str, Any] = r.json()
    assert {"code", "message", "details"} == set(body)
    assert code == body["code"]
    return body


def parse_ts(value: str) -> datetime:
    """An RFC 3339 UTC timestamp as the API writes them."""
    assert RFC3339_UTC.match(value), value
    return datetime.fromisoformat(value)


FINAL = ("succeeded", "failed", "skipped", "cancelled")


def press(api: str, park_id: str, amount: str | None = None) -> dict[str, Any]:
    """Press "Pay out now" for the park; returns the accepted payout."""
    headers = press_headers(park_id, user=f"user-of-{park_id}", key=uuid.uuid4().hex)
    body = {"amount": amount} if amount is not None else {}
    r = httpx.post(f"{api}/v1/payouts/instant", json=body, headers=headers, timeout=10)
    assert 202 == r.status_code, r.text
    payout: dict[str, Any] = r.json()
    return payout


def get_payout(api: str, park_id: str, payout_id: str) -> dict[str, Any]:
    r = httpx.get(f"{api}/v1/payouts/{payout_id}", headers=park_headers(park_id), timeout=10)
    assert 200 == r.status_code, r.text
    payout: dict[str, Any] = r.json()
    return payout


def wait_final(api: str, park_id: str, payout_id: str, timeout: float = 30) -> dict[str, Any]:
    payout: dict[str, Any] = wait_for(
        lambda: (p := get_payout(api, park_id, payout_id))["status"] in FINAL and p,
        timeout=timeout,
        interval=0.1,
        what=f"payout {payout_id} of {park_id} to reach a final status",
    )
    return payout


# --- the database ------------------------------------------------------------------


def rows(pg: psycopg.Connection[DictRow], sql: str, **params: Any) -> list[DictRow]:
    return pg.execute(sql, params).fetchall()


def finish(pg: psycopg.Connection[DictRow], payout_id: str, status: str) -> None:
    """Move a pending payout to a final status as the worker would, without Billing."""
    pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    if status == "succeeded":
        pg.execute(
            "UPDATE payouts SET available = 500.00, amount = 10.00, currency = 'RUB',"
            " billing_params = '{}', ordered_at = now() WHERE id = %s",
            (payout_id,),
        )
        pg.execute(
            "UPDATE payouts SET status = 'succeeded', billing_payout_id = 'bp-1',"
            " completed_at = now() WHERE id = %s",
            (payout_id,),
        )
    elif status == "failed":
        pg.execute(
            "UPDATE payouts SET status = 'failed', failure_code = 'x', completed_at = now()"
            " WHERE id = %s",
            (payout_id,),
        )
    else:
        pg.execute(
            "UPDATE payouts SET status = 'skipped', available = 0, completed_at = now()"
            " WHERE id = %s",
            (payout_id,),
        )


def ordered_payout(pg: psycopg.Connection[DictRow], park: str, kind: str = "periodic") -> uuid.UUID:
    """A payout of `park` (registered if it is not) taken by a worker and ordered at Billing
    (70.00 RUB), still processing."""
    pg.execute("INSERT INTO parks (park_id) VALUES (%s) ON CONFLICT DO NOTHING", (park,))
    payout_id = uuid.uuid4()
    pg.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount) VALUES (%s, %s, %s, 1000)",
        (payout_id, park, kind),
    )
    pg.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (payout_id,))
    pg.execute(
        "UPDATE payouts SET available = 70, amount = 70, currency = 'RUB', billing_params = '{}',"
        " ordered_at = now() WHERE id = %s",
        (payout_id,),
    )
    return payout_id


def count_final(pg: psycopg.Connection[DictRow], ids: list[str]) -> int:
    """How many of these payouts have reached a final status."""
    row = rows(
        pg,
        "SELECT count(*) AS n FROM payouts WHERE id = ANY(%(ids)s::uuid[]) "
        "AND status IN ('succeeded', 'failed', 'skipped', 'cancelled')",
        ids=ids,
    )[0]
    return int(row["n"])


def statuses(pg: psycopg.Connection[DictRow], ids: list[str]) -> dict[str, int]:
    """How many of these payouts are in each status."""
    found = rows(
        pg,
        "SELECT status, count(*) AS n FROM payouts WHERE id = ANY(%(ids)s::uuid[]) GROUP BY 1",
        ids=ids,
    )
    return {r["status"]: int(r["n"]) for r in found}


def periodic_payouts(
    pg: psycopg.Connection[dict[str, Any]], park_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Each park's periodic payouts, oldest first (parks without any map to [])."""
    by_park: dict[str, list[dict[str, Any]]] = {p: [] for p in park_ids}
    for r in rows(
        pg,
        "SELECT * FROM payouts WHERE kind = 'periodic' AND park_id = ANY(%(parks)s) "
        "ORDER BY created_at, id",
        parks=park_ids,
    ):
        by_park[r["park_id"]].append(r)
    return by_park


def spacing_violations(payouts: list[dict[str, Any]], period: timedelta) -> list[str]:
    """Payouts created before the previous one's clock (its completion if it succeeded, its creation
    otherwise) was a period old.
    """
    bad = []
    for prev, nxt in itertools.pairwise(payouts):
        anchor = prev["created_at"]
        if prev["status"] == "succeeded":
            anchor = max(anchor, prev["completed_at"])
        if nxt["created_at"] < anchor + period:
            bad.append(f"{nxt['id']} at {nxt['created_at']} < {anchor} + {period}")
    return bad


# --- the Billing emulator's admin endpoints ----------------------------------------


def set_balance(billing: str, park_id: str, available: str, currency: str = "RUB") -> None:
    r = httpx.put(
        f"{billing}/admin/balances/{park_id}",
        json={"available": available, "currency": currency},
        timeout=TIMEOUT,
    )
    assert 200 == r.status_code, r.text


def billing_balance(billing: str, park_id: str) -> Decimal:
    r = httpx.get(f"{billing}/admin/balances/{park_id}", timeout=TIMEOUT)
    assert 200 == r.status_code, r.text
    return Decimal(r.json()["available"])


def transfers(billing: str) -> list[dict[str, Any]]:
    """Every payout Billing has applied."""
    r = httpx.get(f"{billing}/admin/payouts", timeout=TIMEOUT)
    r.raise_for_status()
    payouts: list[dict[str, Any]] = r.json()["payouts"]
    return payouts


def assert_books_agree(pg: psycopg.Connection[DictRow], billing: str, park_id: str) -> None:
    """Per park, Billing's transfers are exactly our succeeded (or since returned) payouts:
    each under its own id, with its amount and fee; nothing else moved money."""
    ours = {
        (str(r["id"]), str(r["amount"]), None if r["fee_amount"] is None else str(r["fee_amount"]))
        for r in rows(
            pg,
            "SELECT id, amount, fee_amount FROM payouts"
            " WHERE park_id = %(p)s AND status IN ('succeeded', 'returned')",
            p=park_id,
        )
    }
    theirs = [
        (t["idempotency_key"], t["amount"], t.get("fee"))
        for t in transfers(billing)
        if t["park_id"] == park_id
    ]
    assert len(theirs) == len(set(theirs)), theirs
    # (only ours, only Billing's): says which payout disagrees when the books do not.
    assert (set(), set()) == (ours - set(theirs), set(theirs) - ours), park_id


def stats(billing: str) -> dict[str, Any]:
    r = httpx.get(f"{billing}/admin/stats", timeout=TIMEOUT)
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


def set_faults(billing: str, **faults: float) -> None:
    httpx.put(f"{billing}/admin/faults", json=faults, timeout=TIMEOUT).raise_for_status()


def bank_returns(billing: str, key: str, code: str = "account_closed") -> None:
    """The bank sends the payout made under `key` back: Billing records a return."""
    url = f"{billing}/admin/payouts/{key}/return"
    httpx.post(url, json={"code": code}, timeout=TIMEOUT).raise_for_status()


def outside_return(billing: str, key: str, code: str = "wrong_iban") -> None:
    """Billing's returns feed names a key it made no payout under through us."""
    body = {"idempotency_key": key, "code": code}
    httpx.post(f"{billing}/admin/returns", json=body, timeout=TIMEOUT).raise_for_status()


def cursor_of(value: Any) -> str:
    """A cursor in the service's encoding, made up by the client from any JSON value."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def lock_waiters(conn: db.Conn) -> int:
    """Sessions of this database waiting for a lock right now."""
    found = await db.fetch_one(
        conn,
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    assert found is not None
    return int(found["n"])
