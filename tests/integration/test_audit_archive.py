"""The DBA's retention procedure of ops/runbooks/README.md ("Audit log retention"), step by
step, with the runbook's own SQL: detach a month, export it with its boundary hashes,
verify the export, record the archive and drop the month, then restore and re-attach it.
`audit verify` crosses the archived gap, and verifies the month again once it is back."""

from __future__ import annotations

import io

import psycopg
import pytest

from service.audit.chain import MonthResult, Summary
from tests.helpers.audit import Pg, add_month, broken, mid, months_back, verify, write

OLD, KEPT = months_back(3), months_back(2)
TABLE = f"audit_log_{OLD:%Y_%m}"
COLUMNS = (
    "id, at, actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details, "
    "chain_stripe, chain_seq, chain_hash"
)

# The runbook's SQL, for the month 2021-01 there: here OLD.
EXPORT = (
    f"COPY (SELECT {COLUMNS} FROM {TABLE} ORDER BY chain_stripe, chain_seq) "
    "TO STDOUT (FORMAT csv, HEADER)"
)
HEADS = (
    "COPY (SELECT month, stripe, last_seq, encode(last_hash, 'hex') AS last_hash, first_id, "
    f"last_id FROM audit_chain_heads WHERE month = '{OLD}' AND last_seq > 0 ORDER BY stripe) "
    "TO STDOUT (FORMAT csv, HEADER)"
)
RESTORE_TABLE = "CREATE TABLE {t} (LIKE audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
IMPORT = "COPY {t} (" + COLUMNS + ") FROM STDIN (FORMAT csv, HEADER)"
BROKEN_LINKS = f"""
SELECT id, chain_stripe, chain_seq FROM (
    SELECT id, chain_stripe, chain_seq, chain_hash,
           lag(chain_seq, 1, 0::bigint) OVER w AS prev_seq,
           lag(chain_hash, 1, audit_chain_genesis('{OLD}', chain_stripe)) OVER w AS prev_hash,
           audit_log_canonical(id, at, actor_type, actor_id, park_id, action, outcome,
                               request_id, payout_id, details, chain_stripe, chain_seq) AS content
    FROM {{t}}
    WINDOW w AS (PARTITION BY chain_stripe ORDER BY chain_seq)
) links
WHERE chain_seq <> prev_seq + 1 OR chain_hash <> sha256(prev_hash || content)
ORDER BY chain_stripe, chain_seq
"""
ENDS_DIFFER = f"""
SELECT coalesce(e.chain_stripe, h.stripe) AS stripe, e.chain_seq, h.last_seq
FROM (SELECT DISTINCT ON (chain_stripe) chain_stripe, chain_seq, chain_hash
      FROM {{t}} ORDER BY chain_stripe, chain_seq DESC) e
FULL JOIN (SELECT stripe, last_seq, last_hash FROM audit_chain_heads
           WHERE month = '{OLD}' AND last_seq > 0) h ON h.stripe = e.chain_stripe
WHERE e.chain_seq IS DISTINCT FROM h.last_seq OR e.chain_hash IS DISTINCT FROM h.last_hash
"""
RECORD = f"""
INSERT INTO audit_archive (month, entries, month_digest, location, export_sha256)
SELECT '{OLD}', sum(last_seq), audit_month_digest('{OLD}'), %(location)s, %(sha256)s
FROM audit_chain_heads WHERE month = '{OLD}'
"""
REATTACH = [
    f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_bounds CHECK (at >= '{OLD}' AND at < '{KEPT}')",
    f"CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON {TABLE} "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()",
    f"ALTER TABLE {TABLE} ENABLE ALWAYS TRIGGER audit_log_no_truncate",
    f"ALTER TABLE audit_log ATTACH PARTITION {TABLE} FOR VALUES FROM ('{OLD}') TO ('{KEPT}')",
]


def export(pg: Pg, statement: str) -> bytes:
    out = io.BytesIO()
    with pg.cursor().copy(statement) as copy:
        for chunk in copy:
            out.write(chunk)
    return out.getvalue()


def load(pg: Pg, table: str, data: bytes) -> None:
    pg.execute(RESTORE_TABLE.format(t=table))
    with pg.cursor().copy(IMPORT.format(t=table)) as copy:
        copy.write(data)


def problems(pg: Pg, table: str) -> list[tuple[object, ...]]:
    links = pg.execute(BROKEN_LINKS.format(t=table)).fetchall()
    ends = pg.execute(ENDS_DIFFER.format(t=table)).fetchall()
    return [tuple(r.values()) for r in [*links, *ends]]


@pytest.fixture
def archived(pg: Pg, db_url: str) -> bytes:
    """Two past months of entries, the older one detached, exported, checked, recorded and
    dropped as the runbook says; returns its export."""
    add_month(pg, months_back(1))  # every month up to now is there (SPEC section 7)
    for month in (OLD, KEPT):
        add_month(pg, month)
        for day in range(1, 5):
            write(pg, at=mid(month, day), details={"day": day, "note": 'ä, "quoted"'})
    with psycopg.connect(db_url, autocommit=True) as other:
        write(other, at=mid(OLD, 9))  # type: ignore[arg-type]  # a second chain
    pg.execute("SET ROLE fleet_payouts_owner")
    pg.execute(f"ALTER TABLE audit_log DETACH PARTITION {TABLE} CONCURRENTLY")
    rows, heads = export(pg, EXPORT), export(pg, HEADS)
    assert 3 == len(heads.splitlines())  # header and two chains
    load(pg, "audit_restore", rows)
    assert [] == problems(pg, "audit_restore")
    pg.execute(RECORD, {"location": "s3://audit-archive/x.csv", "sha256": "0" * 64})
    pg.execute(f"DROP TABLE {TABLE}")
    pg.execute("DROP TABLE audit_restore")
    pg.execute("RESET ROLE")
    return rows


async def test_verify_crosses_an_archived_month(db_url: str, archived: bytes) -> None:
    """With a month archived and dropped, `audit verify` reports it archived and the log intact."""
    outcome, reported = await verify(db_url)
    assert Summary(months=2, entries=4, archived=1, legacy=0) == outcome
    assert [(OLD, 0, 5), (KEPT, 4, None)] == [
        (r.month, r.entries, r.archived.entries if r.archived else None) for r in reported
    ]


async def test_restored_month_verifies_against_its_archive(
    pg: Pg, db_url: str, archived: bytes
) -> None:
    """The export loaded back and re-attached passes the checks, and `audit verify` again."""
    pg.execute("SET ROLE fleet_payouts_owner")
    load(pg, TABLE, archived)
    assert [] == problems(pg, TABLE)
    for statement in REATTACH:
        pg.execute(statement)
    pg.execute("RESET ROLE")
    outcome, reported = await verify(db_url)
    assert isinstance(outcome, Summary), outcome
    restored: MonthResult = next(r for r in reported if r.month == OLD)
    assert (5, restored.archived) == (restored.entries, restored.archived)
    assert restored.archived is not None


def test_export_checks_find_an_edited_line(pg: Pg, archived: bytes) -> None:
    """An export with one entry's outcome changed fails the runbook's link check at that entry."""
    lines = archived.decode().splitlines(keepends=True)
    lines[2] = lines[2].replace(",ok,", ",cooldown_active,", 1)
    pg.execute("SET ROLE fleet_payouts_owner")
    load(pg, "audit_suspect", "".join(lines).encode())
    edited_id = int(lines[2].split(",", 1)[0])
    assert [edited_id] == [p[0] for p in problems(pg, "audit_suspect")]


async def test_a_dropped_month_without_its_archive_record_is_broken(
    pg: Pg, db_url: str, archived: bytes
) -> None:
    """Remove the archive record and the same gap is a broken log again."""
    pg.execute("DELETE FROM audit_archive")
    assert OLD == broken((await verify(db_url))[0]).month
