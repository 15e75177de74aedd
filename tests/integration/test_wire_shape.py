"""One wire shape: the payout object of the API, of the events (the outbox trigger's
snapshot) and of OpenAPI is service/payouts/wire.py's PAYOUT_FIELDS, field by field."""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow
from starlette.testclient import TestClient

from service.events import outbox
from service.payouts import wire
from service.payouts.model import Kind
from service.web import openapi
from tests.helpers.api import (
    admin_headers,
    app_client,
    park_headers,
    press_headers,
    register,
)
from tests.helpers.emulator import REPO_ROOT

JSON_TYPE = {wire.Type.MONEY: (int, float, str)}  # jsonb keeps numeric as a JSON number


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with app_client(db_url) as c:
        yield c


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """Whether `value` is valid against the subset of JSON Schema our OpenAPI uses."""
    if "anyOf" in schema:
        return any(conforms(value, s) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind == "null":
        return value is None
    if kind == "object":
        props = schema["properties"]
        return (
            isinstance(value, dict)
            and list(props) == list(value)
            and all(conforms(value[k], props[k]) for k in props)
        )
    if kind != "string" or not isinstance(value, str):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return False
    if schema.get("format") == "date-time":
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    if schema.get("format") == "uuid":
        uuid.UUID(value)
    return True


def make_every_kind(api: TestClient, sql: psycopg.Connection[DictRow]) -> dict[str, str]:
    """One payout of each kind, each taken to a status that fills its kind's fields; their ids."""
    register(api, "wire-i", instant_fee={"percent": "1.50", "fixed": "0.30"})
    instant = api.post(
        "/v1/payouts/instant", json={"amount": "100.00"}, headers=press_headers("wire-i")
    ).json()["id"]
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (instant,))
    sql.execute(
        "UPDATE payouts SET available = 500, amount = 100, currency = 'RUB', billing_params = '{}',"
        " fee_amount = 1.80, net_amount = 98.20, ordered_at = now() WHERE id = %s",
        (instant,),
    )
    sql.execute(
        "UPDATE payouts SET status = 'succeeded', billing_payout_id = 'bp-1', completed_at = now()"
        " WHERE id = %s",
        (instant,),
    )
    sql.execute(
        "UPDATE payouts SET status = 'returned', return_code = 'wrong_iban', returned_at = now()"
        " WHERE id = %s",
        (instant,),
    )
    register(api, "wire-p", instant=False, periodic=True)
    periodic = str(uuid.uuid4())
    sql.execute(
        "INSERT INTO payouts (id, park_id, kind, max_amount)"
        " VALUES (%s, 'wire-p', 'periodic', 1000)",
        (periodic,),
    )
    sql.execute("UPDATE payouts SET status = 'processing' WHERE id = %s", (periodic,))
    sql.execute(
        "UPDATE payouts SET status = 'failed', failure_code = 'rejected',"
        " failure_message = 'refused by Billing', completed_at = now() WHERE id = %s",
        (periodic,),
    )
    register(api, "wire-m")
    manual = api.post(
        "/v1/admin/payouts",
        json={"park_id": "wire-m", "amount": "250.00", "reason": "goodwill"},
        headers={**admin_headers("admin-1"), "Idempotency-Key": "m1"},
    ).json()["id"]
    denied = api.post(
        f"/v1/admin/payouts/{manual}/deny",
        json={"reason": "not this time"},
        headers=admin_headers("admin-2"),
    )
    assert 200 == denied.status_code, denied.text
    return {Kind.INSTANT: instant, Kind.PERIODIC: periodic, Kind.MANUAL: manual}


def test_the_api_the_events_and_openapi_show_one_payout_shape(
    api: TestClient, sql: psycopg.Connection[DictRow]
) -> None:
    """For every kind, every event's snapshot holds exactly wire.SNAPSHOT_COLUMNS with their
    types and nullability; rendered, it is valid against OpenAPI's Payout (built from
    PAYOUT_FIELDS) and, for the payout's last event, equal to the API's answer field by field."""
    ids = make_every_kind(api, sql)
    schema = openapi.SCHEMAS["Payout"]
    assert [f.name for f in wire.PAYOUT_FIELDS] == list(schema["properties"])
    assert [f.name for f in wire.PAYOUT_FIELDS] == schema["required"]
    for field in wire.PAYOUT_FIELDS:
        assert field.nullable == conforms(None, schema["properties"][field.name]), field.name
    events = sql.execute(
        "SELECT type, payout_id, payout::text AS payout FROM events ORDER BY seq"
    ).fetchall()
    seen: set[tuple[str, str]] = set()
    last: dict[str, dict[str, Any]] = {}
    columns = {f.source: f for f in wire.SNAPSHOT_COLUMNS}
    for event in events:
        raw = json.loads(event["payout"])
        assert sorted(columns) == sorted(raw), event["type"]
        for name, field in columns.items():
            value = raw[name]
            if value is None:
                assert field.nullable, (event["type"], name)
            else:
                assert isinstance(value, JSON_TYPE.get(field.type, str)), (event["type"], name)
        rendered = wire.payout_json(outbox.snapshot(event["payout"]))
        assert conforms(rendered, schema), (event["type"], rendered)
        seen.add((raw["kind"], event["type"]))
        last[str(event["payout_id"])] = rendered
    assert {str(k) for k in Kind} == {kind for kind, _ in seen}
    for kind, payout_id in ids.items():
        shown = api.get(
            f"/v1/payouts/{payout_id}", headers=park_headers(f"wire-{str(kind)[0]}")
        ).json()
        for field in wire.PAYOUT_FIELDS:
            assert shown[field.name] == last[payout_id][field.name], (kind, field.name)
        assert conforms(shown, schema), shown
    # Every kind's fields were filled somewhere: no field is checked only as null.
    filled = {k for payout in last.values() for k, v in payout.items() if v is not None}
    assert {f.name for f in wire.PAYOUT_FIELDS} == filled


def test_no_second_definition_of_the_payout_shape() -> None:
    """No module of service/ but wire.py spells the payout object as a dict literal, and no
    named query builds a payout snapshot of its own."""
    names = {f.name for f in wire.PAYOUT_FIELDS}
    spelled = []
    for path in sorted((REPO_ROOT / "service").rglob("*.py")):
        if path.name == "wire.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            keys = {k.value for k in getattr(node, "keys", []) if isinstance(k, ast.Constant)}
            if isinstance(node, ast.Dict) and len(keys & names) >= len(names) // 2:
                spelled.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert [] == spelled
    snapshot = re.compile(r"'requested_amount'\s*,", re.IGNORECASE)
    sql_files = sorted((REPO_ROOT / "sql").glob("*.sql"))
    assert [] == [p.name for p in sql_files if snapshot.search(p.read_text())]
