"""`fleet-payouts parks import FILE.csv`, run as the real command against a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers.emulator import REPO_ROOT

HEADER = "park_id,instant_payouts_enabled,periodic_payouts_enabled\n"


def run_import(db_url: str, path: Path) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "service", "parks", "import", str(path)],
        env=environ,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_csv(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def parks(pg: psycopg.Connection[dict[str, Any]]) -> dict[str, tuple[bool, bool]]:
    return {
        r["park_id"]: (r["instant_payouts_enabled"], r["periodic_payouts_enabled"])
        for r in pg.execute("SELECT * FROM parks ORDER BY park_id").fetchall()
    }


def full_rows(pg: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    return pg.execute("SELECT * FROM parks ORDER BY park_id").fetchall()


def import_entries(pg: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
    return pg.execute(
        "SELECT * FROM audit_log WHERE action = 'parks.import' ORDER BY at, id"
    ).fetchall()


FLAGS = {
    "imp-1": (True, True),
    "imp-2": (True, False),
    "imp-3": (False, True),
    "imp-4": (False, False),
}
FLAG_LINES = [f"{p},{str(i).lower()},{str(q).lower()}" for p, (i, q) in FLAGS.items()]


def test_import_registers_parks_with_the_given_flags(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """Importing a CSV registers every park in it with exactly the flags of its line."""
    result = run_import(db_url, write_csv(tmp_path, "parks.csv", FLAG_LINES))

    assert 0 == result.returncode, result.stderr
    assert FLAGS == parks(pg)


def test_reimporting_the_same_file_changes_nothing(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """Running the same import twice succeeds and leaves every park row exactly as the first run
    left it.
    """
    path = write_csv(tmp_path, "parks.csv", FLAG_LINES)
    assert 0 == run_import(db_url, path).returncode
    before = full_rows(pg)

    result = run_import(db_url, path)

    assert 0 == result.returncode, result.stderr
    assert before == full_rows(pg)


def test_empty_flag_keeps_the_existing_value(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """An empty flag in the file leaves that flag of an existing park as it was, while a given flag
    is updated.
    """
    assert 0 == run_import(db_url, write_csv(tmp_path, "first.csv", FLAG_LINES)).returncode

    result = run_import(
        db_url,
        write_csv(tmp_path, "second.csv", ["imp-1,,false", "imp-2,false,", "imp-4,,"]),
    )

    assert 0 == result.returncode, result.stderr
    assert {
        "imp-1": (True, False),
        "imp-2": (False, False),
        "imp-3": (False, True),
        "imp-4": (False, False),
    } == parks(pg)


@pytest.mark.parametrize(
    "bad_line",
    [
        pytest.param("bad park!,true,true", id="bad-park-id"),
        pytest.param("imp-9,maybe,true", id="flag-maybe"),
    ],
)
def test_malformed_row_imports_nothing(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]], bad_line: str
) -> None:
    """A file with one malformed row (bad park id, or a flag that is not a boolean) exits non-zero
    and imports none of its rows.
    """
    assert 0 == run_import(db_url, write_csv(tmp_path, "first.csv", ["imp-1,true,true"])).returncode
    before = full_rows(pg)

    result = run_import(
        db_url, write_csv(tmp_path, "bad.csv", ["imp-1,false,false", "imp-5,true,true", bad_line])
    )

    assert 0 != result.returncode
    assert before == full_rows(pg)
    assert 1 == len(import_entries(pg))


def test_import_is_audited(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """An import writes one admin audit entry `parks.import` naming the file and the counts."""
    assert 0 == run_import(db_url, write_csv(tmp_path, "first.csv", FLAG_LINES[:2])).returncode

    result = run_import(
        db_url, write_csv(tmp_path, "second.csv", ["imp-2,false,false", *FLAG_LINES[2:]])
    )

    assert 0 == result.returncode, result.stderr
    entries = import_entries(pg)
    assert 2 == len(entries)
    last = entries[-1]
    assert ("admin", "ok") == (last["actor_type"], last["outcome"])
    assert {"file": "second.csv", "rows": 3, "created": 2, "updated": 1} == last["details"]


def test_import_audits_each_park_it_changes(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """Each park an import registers or changes has its own entry, under its park_id."""
    assert 0 == run_import(db_url, write_csv(tmp_path, "first.csv", FLAG_LINES[:2])).returncode
    result = run_import(
        db_url, write_csv(tmp_path, "second.csv", ["imp-1,true,true", "imp-2,,true"])
    )
    assert 0 == result.returncode, result.stderr

    entries = pg.execute(
        "SELECT park_id, action, details FROM audit_log WHERE park_id IS NOT NULL ORDER BY at, id"
    ).fetchall()
    assert [
        (
            "imp-1",
            "park.register",
            {"instant_payouts_enabled": True, "periodic_payouts_enabled": True},
        ),
        (
            "imp-2",
            "park.register",
            {"instant_payouts_enabled": True, "periodic_payouts_enabled": False},
        ),
        ("imp-2", "park.update", {"periodic_payouts_enabled": True}),
    ] == [(e["park_id"], e["action"], e["details"]["changes"]) for e in entries]
    assert {"source": "import", "file": "second.csv"} == {
        k: entries[-1]["details"][k] for k in ("source", "file")
    }


def test_import_sets_and_releases_holds(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """A hold_reason puts a park on hold, "-" releases it, empty leaves it; each change audited."""
    header = "park_id,hold_reason\n"
    first = tmp_path / "holds.csv"
    first.write_text(header + "h-1,dispute #7\nh-2,\n", encoding="utf-8")
    assert 0 == run_import(db_url, first).returncode
    second = tmp_path / "release.csv"
    second.write_text(header + "h-1,-\nh-2,\n", encoding="utf-8")
    assert 0 == run_import(db_url, second).returncode

    holds = {
        r["park_id"]: r["hold_reason"]
        for r in pg.execute("SELECT park_id, hold_reason FROM parks").fetchall()
    }
    assert {"h-1": None, "h-2": None} == holds
    changes = [
        r["details"]["changes"].get("hold", "-")
        for r in pg.execute(
            "SELECT details FROM audit_log WHERE park_id = 'h-1' ORDER BY at, id"
        ).fetchall()
    ]
    assert [{"reason": "dispute #7"}, None] == changes


def test_a_utf8_file_with_a_byte_order_mark_imports(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark: its header is still the header
    (issue 17 item 11)."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + "imp-1,true,true\n").encode())
    result = run_import(db_url, path)
    assert 0 == result.returncode, result.stderr
    assert {"imp-1": (True, True)} == parks(pg)


def test_a_cp1251_file_is_refused_with_one_line_naming_the_line_and_the_fix(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """A file in another encoding (cp1251, a Russian hold reason on line 3) is refused with
    exit 1 and one stderr line naming line 3 and how to convert it; no traceback, no parks."""
    path = tmp_path / "cp1251.csv"
    text = "park_id,instant_payouts_enabled,periodic_payouts_enabled,hold_reason\n"
    text += "imp-1,true,true,\nimp-2,true,true,Проверка документов\n"
    path.write_bytes(text.encode("cp1251"))
    result = run_import(db_url, path)
    assert 1 == result.returncode
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    assert "line 3" in lines[0] and "UTF-8" in lines[0] and "iconv" in lines[0]
    assert {} == parks(pg)


def test_an_oversized_field_is_refused_by_line_number(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """A quoted field over 128 kB on line 3 is refused with exit 1 and one line naming line
    3, never a traceback."""
    big = '"' + "x" * (200 * 1024) + '"'
    result = run_import(db_url, write_csv(tmp_path, "big.csv", ["imp-1,true,true", big]))
    assert 1 == result.returncode
    lines = result.stderr.strip().splitlines()
    assert 1 == len(lines), result.stderr
    assert "line 3" in lines[0]
    assert {} == parks(pg)


def test_duplicate_lines_the_last_one_wins(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """A park listed twice takes the flags of its last line, with one audit entry."""
    lines = ["imp-1,true,true", "imp-2,false,false", "imp-1,false,true"]
    assert 0 == run_import(db_url, write_csv(tmp_path, "dup.csv", lines)).returncode
    assert {"imp-1": (False, True), "imp-2": (False, False)} == parks(pg)
    registered = pg.execute(
        "SELECT count(*) AS n FROM audit_log WHERE action = 'park.register' AND park_id = 'imp-1'"
    ).fetchone()
    assert registered is not None and 1 == registered["n"]


def test_import_sets_and_clears_the_paid_option(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]]
) -> None:
    """instant_fee_percent/_fixed and instant_payouts_until are set by the import, left alone
    when empty, cleared by "-"; each change is in the park's audit entry."""
    header = "park_id,instant_fee_percent,instant_fee_fixed,instant_payouts_until\n"
    first = tmp_path / "fees.csv"
    first.write_text(header + "f-1,1.50,0.30,2030-01-01T00:00:00Z\nf-2,,,\n", encoding="utf-8")
    assert 0 == run_import(db_url, first).returncode
    again = tmp_path / "again.csv"
    again.write_text(header + "f-1,,,\nf-2,2,0,\n", encoding="utf-8")
    assert 0 == run_import(db_url, again).returncode
    clear = tmp_path / "clear.csv"
    clear.write_text(header + "f-1,-,-,-\n", encoding="utf-8")
    assert 0 == run_import(db_url, clear).returncode

    rows = {
        r["park_id"]: (r["instant_fee_percent"], r["instant_fee_fixed"], r["instant_payouts_until"])
        for r in pg.execute(
            "SELECT park_id, instant_fee_percent, instant_fee_fixed, instant_payouts_until"
            " FROM parks"
        ).fetchall()
    }
    assert (None, None, None) == rows["f-1"]
    assert (Decimal("2.00"), Decimal("0.00"), None) == rows["f-2"]
    changes = [
        r["details"]["changes"]
        for r in pg.execute(
            "SELECT details FROM audit_log WHERE park_id = 'f-1' ORDER BY at, id"
        ).fetchall()
    ]
    assert 2 == len(changes)  # registered, then cleared; the empty row changed nothing
    assert {"percent": "1.50", "fixed": "0.30"} == changes[0]["instant_fee"]
    assert {"instant_fee": None, "instant_payouts_until": None} == changes[1]


@pytest.mark.parametrize(
    "row", ["f-1,101,0,", "f-1,1,,", "f-1,,1,", "f-1,1,0,tomorrow", "f-1,1,0,2030-01-01T00:00:00"]
)
def test_a_malformed_paid_option_imports_nothing(
    db_url: str, tmp_path: Path, pg: psycopg.Connection[dict[str, Any]], row: str
) -> None:
    """A fee part alone, a percent over 100 or an end date without its zone refuses the file."""
    path = tmp_path / "bad.csv"
    path.write_text(
        "park_id,instant_fee_percent,instant_fee_fixed,instant_payouts_until\n" + row + "\n",
        encoding="utf-8",
    )
    result = run_import(db_url, path)
    assert 1 == result.returncode, result.stdout + result.stderr
    assert [] == pg.execute("SELECT park_id FROM parks").fetchall()
