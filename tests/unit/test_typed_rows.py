"""Rows are typed at the boundary: above the stores, code reads a row's attributes
(frozen dataclasses the store declares, fetched with db.fetch_as / fetch_all_as),
never `row["column"]`, `row.get("column")` or `row[10]`.

The stores (`*/store.py`), the audit chain's reader and `ops/` (which owns its
catalog queries) may read the mappings psycopg hands them; `core/` builds rows.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from service.core import db

ROOT = Path(__file__).resolve().parents[2]

# A name a row is bound to (row, rows[-1], found, existing, ...), indexed by a column
# name, asked for one with .get, or indexed by position.
ROW_INDEX = re.compile(
    r"\b(?:\w*rows?\w*|r|e|found|existing|current|done|waiting|replay|park|payout|flight"
    r"|entry|due|me|have|rel|fn|span|may)"
    r"(?:\[-?\d+\])?"
    r"(?:\[\"\w+\"\]|\.get\(\"\w+\"|\[\d+\](?![\w.\[]))"
)


# Modules that may: they own the queries whose rows they read.
def _is_store(path: str) -> bool:
    return (
        path.endswith("/store.py")
        or path == "service/audit/chain.py"
        or path.startswith(("service/ops/", "service/core/"))
    )


# Still indexing rows, and why. Each entry goes when its module is typed; the
# second test below makes sure a stale entry cannot stay to hide a new lookup.
EXCEPTIONS = {
    # The one wire shape renders both a payouts row and an event's JSON snapshot
    # (a document, not a row); the concepts helper is reshaping it.
    "service/payouts/wire.py": "payout_json takes the snapshot mapping",
    # Not database rows: the CSV file's records (csv.DictReader) and the tuples
    # staged for COPY.
    "service/parks/csv_import.py": "CSV records and COPY tuples",
}


def _lookups() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "service").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if _is_store(name):
            continue
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if ROW_INDEX.search(line):
                found.setdefault(name, []).append(f"{number}: {line.strip()}")
    return found


def test_no_module_above_the_stores_indexes_a_row() -> None:
    """Outside the stores (and the listed exceptions), no row is read by column name or position."""
    lookups = _lookups()
    assert {} == {name: lines for name, lines in lookups.items() if name not in EXCEPTIONS}


def test_every_exception_still_indexes_rows() -> None:
    """Each listed exception still has a lookup: a typed module leaves the list."""
    lookups = _lookups()
    assert [] == [name for name in EXCEPTIONS if name not in lookups]


@pytest.mark.parametrize(
    "line",
    [
        'x = row["park_id"]',
        'x = rows[-1]["at"]',
        'x = found.get("kind")',
        "x = row[10]",
        'x = accepted.payout["id"]',
    ],
)
def test_the_pattern_sees_row_lookups(line: str) -> None:
    """The scan catches each form of a row lookup it is meant to forbid."""
    assert ROW_INDEX.search(line) is not None


@pytest.mark.parametrize(
    "line",
    ["x = row.park_id", "x = rows[0].oldest", 'x = body["params"]', 'x = fields.get("csrf")'],
)
def test_the_pattern_leaves_typed_reads_and_documents_alone(line: str) -> None:
    """Attribute reads of typed rows and lookups in request bodies are not flagged."""
    assert ROW_INDEX.search(line) is None


@dataclasses.dataclass(frozen=True, slots=True)
class _Pair:
    b: int
    a: datetime


class _Column:
    def __init__(self, name: str) -> None:
        self.name = name


class _Cursor:
    def __init__(self, *names: str) -> None:
        self.description = [_Column(n) for n in names]


def test_row_as_maps_columns_by_name_and_drops_undeclared_ones() -> None:
    """Columns the dataclass does not declare (added by a later migration) are dropped."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    make = db.row_as(_Pair)(cast(Any, _Cursor("a", "extra", "b")))
    assert _Pair(b=2, a=at) == make((at, "ignored", 2))


def test_row_as_takes_columns_in_field_order_positionally() -> None:
    """A query selecting exactly the fields, in order, builds the row from its values."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    make = db.row_as(_Pair)(cast(Any, _Cursor("b", "a")))
    assert _Pair(b=2, a=at) == make((2, at))
