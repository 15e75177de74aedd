"""Concurrent presses against a real API process: the park's rules hold under a race."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.core import db
from tests.conftest import ADMIN_TOKEN, API_TOKEN, service_env
from tests.helpers.procs import cluster

pytestmark = pytest.mark.e2e

PRESSES = 20
ACTION = "payout.instant.request"


@pytest.fixture
def api_url(db_url: str, billing_url: str, tmp_path: Path) -> Iterator[str]:
    """A real `fleet-payouts serve` process (no worker: payouts stay pending)."""
    with cluster(service_env(db_url, billing_url), tmp_path) as c:
        yield c.api()


async def register(client: httpx.AsyncClient, park: str) -> None:
    r = await client.put(
        f"/v1/parks/{park}",
        json={"instant_payouts_enabled": True},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-User-Id": "admin-1"},
    )
    assert 201 == r.status_code, r.text


async def press_all(client: httpx.AsyncClient, park: str, keys: list[str]) -> list[httpx.Response]:
    """Fire one press per key, all at once, with the same body."""

    def headers(key: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {API_TOKEN}",
            "X-Park-Id": park,
            "X-User-Id": "u1",
            "Idempotency-Key": key,
        }

    return list(
        await asyncio.gather(
            *(
                client.post("/v1/payouts/instant", json={"amount": "10.00"}, headers=headers(k))
                for k in keys
            )
        )
    )


async def payout_ids(conn: db.Conn, park: str) -> list[str]:
    cur = await conn.execute("SELECT id FROM payouts WHERE park_id = %s", (park,))
    return [str(row["id"]) for row in await cur.fetchall()]


async def press_outcomes(conn: db.Conn, park: str) -> Counter[str]:
    cur = await conn.execute(
        "SELECT outcome FROM audit_log WHERE park_id = %s AND action = %s", (park, ACTION)
    )
    return Counter(row["outcome"] for row in await cur.fetchall())


async def test_racing_presses_with_different_keys_make_exactly_one_payout(
    api_url: str, conn: db.Conn
) -> None:
    """Of 20 simultaneous presses with distinct keys one is accepted, 19 refused as in flight."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        await register(client, "p1")
        responses = await press_all(client, "p1", [f"key-{i}" for i in range(PRESSES)])
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code != 202]
    assert 1 == len(accepted), [r.text for r in responses]
    assert [] == [
        (r.status_code, r.text)
        for r in refused
        if (r.status_code, r.json().get("code"))
        not in {(409, "payout_in_progress"), (429, "cooldown_active")}
    ]
    assert [accepted[0].json()["id"]] == await payout_ids(conn, "p1")
    outcomes = await press_outcomes(conn, "p1")
    assert PRESSES == sum(outcomes.values())
    assert 1 == outcomes["ok"]


async def test_racing_presses_with_the_same_key_all_get_the_one_payout(
    api_url: str, conn: db.Conn
) -> None:
    """20 simultaneous presses with one key and body all answer the same payout; one row exists."""
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as client:
        await register(client, "p2")
        responses = await press_all(client, "p2", ["same-key"] * PRESSES)
    assert [] == [(r.status_code, r.text) for r in responses if r.status_code not in (200, 202)]
    ids = {r.json()["id"] for r in responses}
    assert 1 == len(ids)
    assert list(ids) == await payout_ids(conn, "p2")
