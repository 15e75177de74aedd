"""The payout state machine is defined once (service/payouts/model.py) and every other place
that spells it out agrees: the schema's checks, index predicates and trigger functions as
the database holds them now, every status list in sql/*.sql, and the OpenAPI description.

A new status is added to `domain.Status` (and to a named set or TRANSITIONS) and to one
migration; these tests name every place that still disagrees.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow

from service.payouts import model as domain
from service.payouts.model import Kind, Status
from service.web import openapi

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
STATUS_LIST = re.compile(r"\bstatus\s*(?:NOT\s+)?IN\s*\(([^)]*)\)", re.IGNORECASE)
STATUS_ONE = re.compile(r"\bstatus\s*(?:=|<>|!=)\s*'([a-z_]+)'", re.IGNORECASE)
# procrastinate's job statuses share the column name in queries that join its table.
JOB_STATUSES = {"todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted"}


def literal_sets(text: str) -> list[set[str]]:
    """Every `status [NOT] IN ('a', 'b')` list in `text`, as a set of its literals."""
    return [set(re.findall(r"'([a-z_]+)'", m.group(1))) for m in STATUS_LIST.finditer(text)]


def named(values: set[str]) -> str | None:
    """The domain's name of this set of statuses, if it has one."""
    for name, statuses in domain.NAMED_STATUS_SETS.items():
        if values == {str(s) for s in statuses}:
            return name
    return None


def undefined_lists(where: str, text: str) -> list[str]:
    problems = []
    for values in literal_sets(text):
        if values <= JOB_STATUSES and not values <= {str(s) for s in Status}:
            continue  # a procrastinate job status list
        if named(values) is None:
            problems.append(
                f"{where}: status list {sorted(values)} is no set of service.payouts.model"
            )
    for m in STATUS_ONE.finditer(text):
        if m.group(1) not in {str(s) for s in Status} | JOB_STATUSES:
            problems.append(f"{where}: {m.group(1)!r} is no domain.Status")
    return problems


def test_every_status_list_in_the_named_queries_is_a_set_of_the_domain() -> None:
    """Each `status IN (...)` of sql/*.sql is one of domain.NAMED_STATUS_SETS and every
    single status compared is a domain.Status."""
    problems = [
        p for f in sorted(SQL_DIR.glob("*.sql")) for p in undefined_lists(f.name, f.read_text())
    ]
    assert [] == problems


def test_every_status_list_in_the_live_schema_is_a_set_of_the_domain(
    pg: psycopg.Connection[DictRow],
) -> None:
    """The payouts table's checks, its index predicates and every trigger function of the
    schema, as the database holds them after all migrations, list only domain sets."""
    texts: list[tuple[str, str]] = []
    for row in pg.execute(
        "SELECT conname AS name, pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = 'payouts'::regclass AND contype = 'c'"
    ):
        texts.append((f"constraint {row['name']}", row["def"]))
    for row in pg.execute(
        "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def"
        " FROM pg_index WHERE indrelid = 'payouts'::regclass"
    ):
        texts.append((f"index {row['name']}", row["def"]))
    for row in pg.execute(
        "SELECT p.proname AS name, pg_get_functiondef(p.oid) AS def FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.prokind = 'f' AND p.proname NOT LIKE 'procrastinate%'"
    ):
        texts.append((f"function {row['name']}", row["def"]))
    for row in pg.execute(
        "SELECT tgname AS name, pg_get_triggerdef(oid) AS def FROM pg_trigger"
        " WHERE tgrelid = 'payouts'::regclass AND NOT tgisinternal"
    ):
        texts.append((f"trigger {row['name']}", row["def"]))
    problems = [p for where, text in texts for p in undefined_lists(where, text)]
    assert [] == problems


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        ("payouts_status_check", {str(s) for s in Status}),
        ("payouts_kind_check", {str(k) for k in Kind}),
    ],
)
def test_the_schema_checks_list_exactly_the_domain_s_values(
    pg: psycopg.Connection[DictRow], constraint: str, expected: set[str]
) -> None:
    """The CHECK on payouts.status (kind) admits exactly domain.Status (domain.Kind)."""
    row = pg.execute(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE conname = %s",
        (constraint,),
    ).fetchone()
    assert row is not None
    assert expected == set(re.findall(r"'([a-z_]+)'", row["def"]))


def test_one_payout_in_flight_is_the_domain_s_in_flight(pg: psycopg.Connection[DictRow]) -> None:
    """The unique index behind "one payout in flight per park" covers exactly IN_FLIGHT."""
    row = pg.execute(
        "SELECT pg_get_indexdef('payouts_one_in_flight_per_park'::regclass) AS d"
    ).fetchone()
    assert row is not None
    assert {str(s) for s in domain.IN_FLIGHT} == set(re.findall(r"'([a-z_]+)'", row["d"]))


def test_the_events_type_check_lists_the_domain_s_event_types(
    pg: psycopg.Connection[DictRow],
) -> None:
    """The CHECK on events.type admits exactly domain.EVENT_TYPES."""
    row = pg.execute(
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conrelid = 'events'::regclass AND conname = 'events_type_check'"
    ).fetchone()
    assert row is not None
    assert set(domain.EVENT_TYPES) == set(re.findall(r"'(payout\.[a-z_]+)'", row["def"]))


def test_the_openapi_description_takes_statuses_kinds_and_event_types_from_the_domain() -> None:
    """OpenAPI's Payout.status, Payout.kind and Event.type enums are the domain's."""
    schemas: dict[str, Any] = openapi.SCHEMAS
    payout = schemas["Payout"]["properties"]
    assert [str(s) for s in Status] == payout["status"]["enum"]
    assert [str(k) for k in Kind] == payout["kind"]["enum"]
    assert list(domain.EVENT_TYPES) == schemas["Event"]["properties"]["type"]["enum"]
