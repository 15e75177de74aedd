"""The instant payout path through the real API app and a real database."""

from __future__ import annotations

from starlette.testclient import TestClient

from tests.conftest import ADMIN_TOKEN, API_TOKEN


def test_accepted_press_is_queued_and_audited(client: TestClient) -> None:
    """A press for an enabled park answers 202, a pending payout, and an ok audit entry."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-User-Id": "admin-1"}
    r = client.put("/v1/parks/p1", json={"instant_payouts_enabled": True}, headers=admin)
    assert 201 == r.status_code, r.text
    headers = {
        "Authorization": f"Bearer {API_TOKEN}",
        "X-Park-Id": "p1",
        "X-User-Id": "u1",
        "Idempotency-Key": "k1",
    }
    r = client.post("/v1/payouts/instant", json={"amount": "10.50"}, headers=headers)
    assert 202 == r.status_code, r.text
    body = r.json()
    assert ("pending", "10.50", "instant") == (
        body["status"],
        body["requested_amount"],
        body["kind"],
    )
    entries = client.get("/v1/audit?park_id=p1", headers=admin).json()["entries"]
    assert ["payout.instant.request", "park.register"] == [e["action"] for e in entries]
    assert "ok" == entries[0]["outcome"]
