"""`fleet-payouts parks import FILE.csv`: load or update many parks at once.

Rows are validated, streamed with COPY into a temporary table in chunks and
upserted from there: 80,000 parks load in seconds, memory stays flat, and a
second run of the same file changes nothing. Every park registered or
changed gets its own audit entry (so it shows in the park's history), and
one more entry records the import itself (file name, counts).
"""

from __future__ import annotations

import csv
import getpass
import sys
from collections.abc import Iterator
from pathlib import Path

from service import audit, db, parks
from service.domain import is_park_id

CHUNK = 5000
TRUE = {"true", "1", "yes", "y", "t"}
FALSE = {"false", "0", "no", "n", "f"}
COLUMNS = ("park_id", "instant_payouts_enabled", "periodic_payouts_enabled", "hold_reason")
# In the hold_reason column: empty leaves the hold as it is, this releases it,
# any other text puts the park on hold with that reason.
RELEASE = "-"
MAX_HOLD_REASON = 500


class ImportError_(Exception):
    """A row of the CSV file is malformed; nothing was imported."""


def _flag(raw: str | None, line: int, column: str) -> bool | None:
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ImportError_(f"line {line}: {column} must be true or false, got {raw!r}")


def _hold(raw: str | None, line: int) -> str | None:
    """The staged hold: None (leave), RELEASE, or a reason."""
    value = (raw or "").strip()
    if not value:
        return None
    if len(value) > MAX_HOLD_REASON or not value.isprintable():
        raise ImportError_(
            f"line {line}: hold_reason must be 1-{MAX_HOLD_REASON} printable characters"
        )
    return value


def read_rows(path: Path) -> Iterator[tuple[str, bool | None, bool | None, str | None]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "park_id" not in reader.fieldnames:
            raise ImportError_("the first line must be a header naming at least park_id")
        unknown = set(reader.fieldnames) - set(COLUMNS)
        if unknown:
            raise ImportError_(f"unknown columns: {', '.join(sorted(unknown))}")
        for row in reader:
            line = reader.line_num
            park_id = (row.get("park_id") or "").strip()
            if not is_park_id(park_id):
                raise ImportError_(f"line {line}: malformed park_id {park_id!r}")
            yield (
                park_id,
                _flag(row.get("instant_payouts_enabled"), line, "instant_payouts_enabled"),
                _flag(row.get("periodic_payouts_enabled"), line, "periodic_payouts_enabled"),
                _hold(row.get("hold_reason"), line),
            )


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total_rows: int) -> None:
        self.total = max(1, total_rows)
        self.tty = sys.stderr.isatty()

    def show(self, rows: int) -> None:
        if not self.tty:
            return
        share = min(1.0, rows / self.total)
        bar = "#" * int(share * 40)
        sys.stderr.write(f"\r[{bar:<40}] {share:6.1%} {rows:>9,} parks")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


async def import_csv(url: str, file: str) -> int:
    path = Path(file)
    if not path.is_file():
        print(f"parks import: no such file: {file}", file=sys.stderr)
        return 2
    with path.open("rb") as f:
        progress = Progress(sum(1 for _ in f) - 1)
    conn = await db.connect(url, name="import")
    actor = getpass.getuser()
    rows = created = updated = 0
    try:
        async with conn, conn.transaction():
            await conn.execute(parks.Q["import_stage"])
            async with conn.cursor().copy(parks.Q["import_copy"]) as copy:
                for row in read_rows(path):
                    await copy.write_row(row)
                    rows += 1
                    if rows % CHUNK == 0:
                        progress.show(rows)
            await conn.execute(parks.Q["import_dedupe"])
            # Updates first (only parks whose flags really change), then the new parks.
            who = {"actor_id": actor, "file": path.name, "release": RELEASE}
            updated = (await conn.execute(parks.Q["import_update"], who)).rowcount
            created = (await conn.execute(parks.Q["import_insert"], who)).rowcount
            await audit.write(
                conn,
                audit.Entry(
                    actor_type="admin",
                    actor_id=actor,
                    action="parks.import",
                    outcome="ok",
                    details={
                        "file": path.name,
                        "rows": rows,
                        "created": created,
                        "updated": updated,
                    },
                ),
            )
    except ImportError_ as exc:
        progress.close()
        print(f"parks import: {exc}; nothing was imported", file=sys.stderr)
        return 1
    progress.show(rows)
    progress.close()
    print(f"parks import: {rows} rows, {created} new parks, {updated} updated")
    return 0
