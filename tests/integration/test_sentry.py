"""Sentry: events carry the request's and the job's tags, release and environment, and no secret.

An in-memory transport stands in for the network: nothing leaves the process.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from service.core import observability
from service.payouts import store as payouts
from tests.conftest import ADMIN_TOKEN, API_TOKEN, make_settings
from tests.helpers.api import app_client, park_headers

BILLING_TOKEN = "billing-token-never-in-sentry"
WEBHOOK_SECRET = "webhook-secret-never-in-sentry"


class Captured(Transport):
    """Keeps every event in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(dict(event))


@pytest.fixture
def sentry(db_url: str) -> Iterator[Captured]:
    """Sentry initialised as `serve` does it, sending to memory; switched off afterwards."""
    transport = Captured()
    settings = make_settings(
        db_url,
        sentry_dsn="https://public@sentry.invalid/1",
        billing_token=BILLING_TOKEN,
        sentry_environment="staging",
        sentry_release="fleet-payouts@test",
        webhook_secret=WEBHOOK_SECRET,
    )
    observability.init_sentry(settings, transport=transport)
    try:
        yield transport
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.init()  # no DSN: a disabled client for the rest of the session


def test_request_error_event_is_tagged_and_scrubbed(
    db_url: str, sentry: Captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500's event has the request id the response carries, the park and payout as tags,
    release and environment, and no token or secret anywhere in it."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"boom {API_TOKEN} {BILLING_TOKEN} {WEBHOOK_SECRET}")

    monkeypatch.setattr(payouts, "get", broken)
    payout_id = str(uuid.uuid4())
    with app_client(db_url) as client:
        r = client.get(f"/v1/payouts/{payout_id}", headers=park_headers())
    assert 500 == r.status_code
    sentry_sdk.flush()
    assert sentry.events, "no event captured"
    for event in sentry.events:
        tags = event.get("tags", {})
        assert (r.headers["X-Request-Id"], "p1", payout_id) == (
            tags.get("request_id"),
            tags.get("park_id"),
            tags.get("payout_id"),
        )
        assert ("fleet-payouts@test", "staging") == (event["release"], event["environment"])
        text = json.dumps(event, default=str)
        for secret in (API_TOKEN, ADMIN_TOKEN, BILLING_TOKEN, WEBHOOK_SECRET):
            assert secret not in text


def test_job_error_event_is_tagged_with_payout_and_kind(sentry: Captured) -> None:
    """An error logged inside a payout job's context reaches Sentry tagged with its payout,
    park and kind."""
    payout_id = str(uuid.uuid4())
    with observability.log_context(payout_id=payout_id, kind="periodic", park_id="p9"):
        logging.getLogger("service.payouts.store.execution").error("Billing refused the order")
    sentry_sdk.flush()
    assert [(payout_id, "periodic", "p9")] == [
        (e["tags"].get("payout_id"), e["tags"].get("kind"), e["tags"].get("park_id"))
        for e in sentry.events
    ]


def test_scrubbing_redacts_secret_keys_and_values_anywhere() -> None:
    """before_send redacts Authorization-like keys and cuts configured secrets out of any
    string, in nested dicts and header pairs alike."""
    scrub = observability._before_send(("s3cr3t-value-123456",))
    event = {
        "request": {
            "headers": [["Authorization", "Bearer x"], ["User-Agent", "ua"]],
            "data": {"WEBHOOK_SECRET": "abc", "note": "has s3cr3t-value-123456 inside"},
        },
        "extra": {"api_token": "t", "nested": [{"Cookie": "c"}]},
    }
    assert {
        "request": {
            "headers": [["Authorization", "[redacted]"], ["User-Agent", "ua"]],
            "data": {"WEBHOOK_SECRET": "[redacted]", "note": "has [redacted] inside"},
        },
        "extra": {"api_token": "[redacted]", "nested": [{"Cookie": "[redacted]"}]},
        "tags": {},
    } == scrub(event, {})
