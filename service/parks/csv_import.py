"""`fleet-payouts parks import FILE.csv`: load or update many parks at once.

The file is read once to count its lines (for the progress bar), then once
more, row by row, validated and streamed with COPY into a temporary table;
duplicates are dropped (the last line wins) and the parks are upserted from
there in batches of BATCH lines, each a set-based statement with one
audit entry per park it registers or changes, plus one entry for the import
itself (file name, counts). Every step is linear in the file and memory
stays flat whatever its size: `make bench` measures 80,000 and 1,000,000
parks (tests/bench/park_import.py). A second run of the same file changes
nothing. One transaction: a bad line imports nothing.

The file is UTF-8 (a byte-order mark, as Excel's "CSV UTF-8" writes, is
accepted); any other encoding, an oversized field or a malformed row is
refused with one line naming the file's line and what to do.
"""

from __future__ import annotations

import csv
import getpass
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO

from service.audit import store as audit
from service.core import db
from service.core.values import is_park_id, parse_timestamp
from service.parks import store as parks
from service.parks.fees import parse_fee_fixed, parse_fee_percent

# Lines per upsert statement: big enough that per-statement costs vanish, small
# enough that one statement's RETURNING rows and audit entries stay a few MB.
BATCH = 50_000
PROGRESS_EVERY = 5000
TRUE = {"true", "1", "yes", "y", "t"}
FALSE = {"false", "0", "no", "n", "f"}
COLUMNS = (
    "park_id",
    "instant_payouts_enabled",
    "periodic_payouts_enabled",
    "hold_reason",
    "instant_fee_percent",
    "instant_fee_fixed",
    "instant_payouts_until",
)
# In the hold_reason column: empty leaves the hold as it is, this releases it,
# any other text puts the park on hold with that reason.
RELEASE = "-"
MAX_HOLD_REASON = 500
# No field of this file is longer than a hold reason; the csv module's own limit
# (128 kB) bounds what one field may hold in memory, this bounds a line without a
# newline (a binary file) the same way.
MAX_LINE_BYTES = 256 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
ENCODING_HINT = (
    'save it as "CSV UTF-8" (Excel: File > Save As > CSV UTF-8), '
    "or convert it: iconv -f cp1251 -t utf-8 FILE > FILE.utf8.csv"
)


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
    raise ImportError_(f"line {line}: {column} must be true or false, got {raw[:40]!r}")


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


Row = tuple[
    int,
    str,
    bool | None,
    bool | None,
    str | None,
    Decimal | None,
    Decimal | None,
    bool,
    datetime | None,
    bool,
]


def _fee(row: dict[str, str | None], line: int) -> tuple[Decimal | None, Decimal | None, bool]:
    """The staged fee: (percent, fixed, clear). Both parts or neither; `-` in both clears it."""
    percent = (row.get("instant_fee_percent") or "").strip()
    fixed = (row.get("instant_fee_fixed") or "").strip()
    if not percent and not fixed:
        return None, None, False
    if percent == RELEASE and fixed in (RELEASE, ""):
        return None, None, True
    try:
        return parse_fee_percent(percent), parse_fee_fixed(fixed), False
    except ValueError as exc:
        raise ImportError_(
            f"line {line}: instant_fee_percent and instant_fee_fixed go together "
            f"(0-100 and >= 0, decimal strings; - clears): {exc}"
        ) from None


def _until(raw: str | None, line: int) -> tuple[datetime | None, bool]:
    """The staged end date: (date, clear)."""
    value = (raw or "").strip()
    if not value:
        return None, False
    if value == RELEASE:
        return None, True
    try:
        return parse_timestamp(value), False
    except ValueError:
        raise ImportError_(
            f"line {line}: instant_payouts_until must be an RFC 3339 timestamp with its zone"
        ) from None


class _TextLines:
    """The file's lines as text: UTF-8, a leading BOM dropped, each checked as it is read.

    `number` is the line last read: where the csv module was when it raised.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        while line := self.f.readline(MAX_LINE_BYTES + 1):
            self.number += 1
            if len(line) > MAX_LINE_BYTES:
                raise ImportError_(f"line {self.number}: longer than {MAX_LINE_BYTES} bytes")
            if self.number == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM) :]
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                raise ImportError_(f"line {self.number}: not UTF-8 text; {ENCODING_HINT}") from None


def read_rows(path: Path) -> Iterator[Row]:
    """Each row as staged (line first); ImportError_ on the first bad one."""
    with path.open("rb") as f:
        lines = _TextLines(f)
        reader = csv.DictReader(lines)
        try:
            fieldnames = reader.fieldnames
            if fieldnames is None or "park_id" not in fieldnames:
                raise ImportError_("the first line must be a header naming at least park_id")
            unknown = set(fieldnames) - set(COLUMNS)
            if unknown:
                raise ImportError_(f"unknown columns: {', '.join(sorted(unknown))[:200]}")
            for row in reader:
                yield _row(row, reader.line_num)
        except csv.Error as exc:
            # A field over the csv module's limit (128 kB), a NUL byte, a broken quote.
            raise ImportError_(f"line {lines.number}: {exc}") from None


def _row(row: dict[str, str], line: int) -> Row:
    park_id = (row.get("park_id") or "").strip()
    if not is_park_id(park_id):
        raise ImportError_(f"line {line}: malformed park_id {park_id[:80]!r}")
    return (
        line,
        park_id,
        _flag(row.get("instant_payouts_enabled"), line, "instant_payouts_enabled"),
        _flag(row.get("periodic_payouts_enabled"), line, "periodic_payouts_enabled"),
        _hold(row.get("hold_reason"), line),
        *_fee(dict(row), line),
        *_until(row.get("instant_payouts_until"), line),
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
    rows = created = updated = last_line = 0
    try:
        async with conn, conn.transaction():
            await conn.execute(parks.Q["import_stage"])
            async with conn.cursor().copy(parks.Q["import_copy"]) as copy:
                for row in read_rows(path):
                    await copy.write_row(row)
                    rows += 1
                    last_line = row[0]
                    if rows % PROGRESS_EVERY == 0:
                        progress.show(rows)
            await conn.execute(parks.Q["import_dedupe"])
            await conn.execute(parks.Q["import_index"])
            who = {"actor_id": actor, "file": path.name, "release": RELEASE}
            for after in range(0, last_line, BATCH):
                lines = {**who, "after": after, "upto": after + BATCH}
                # Updates first (only parks whose flags really change), then the new parks.
                updated += (await conn.execute(parks.Q["import_update"], lines)).rowcount
                created += (await conn.execute(parks.Q["import_insert"], lines)).rowcount
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
        print(f"parks import: {path.name}: {exc}; nothing was imported", file=sys.stderr)
        return 1
    progress.show(rows)
    progress.close()
    print(f"parks import: {rows} rows, {created} new parks, {updated} updated")
    return 0
