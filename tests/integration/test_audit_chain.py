"""The audit log's hash chains: linked by the database at insert, checked by `audit verify`.

Tampering is done as a superuser can: with audit_log's append-only trigger switched off,
or by dropping a partition.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import uuid
from datetime import date

import psycopg
import pytest

from service.audit import chain as audit_chain
from service.audit.chain import Summary
from tests.helpers.audit import (
    THIS_MONTH,
    Pg,
    add_month,
    broken,
    connect,
    guards_off,
    mid,
    months_back,
    partition,
    verify,
    write,
)
from tests.helpers.emulator import REPO_ROOT

M1, M2, M3 = months_back(3), months_back(2), months_back(1)


@pytest.fixture
def three_months(pg: Pg, db_url: str) -> dict[date, list[int]]:
    """Entries in three past months, from two connections (so two chains a month)."""
    ids: dict[date, list[int]] = {}
    with connect(db_url) as other:
        for month in (M1, M2, M3):
            add_month(pg, month)
            ids[month] = []
            for day in range(1, 7):
                writer = pg if day % 2 else other
                ids[month].append(write(writer, at=mid(month, day), actor_id=f"u-{day}")["id"])
    return ids


def chain_of(pg: Pg, entry_id: int) -> list[int]:
    """The ids of the chain an entry is on, in chain order."""
    rows = pg.execute(
        "SELECT b.id FROM audit_log a JOIN audit_log b "
        "ON date_trunc('month', b.at) = date_trunc('month', a.at) "
        "AND b.chain_stripe = a.chain_stripe WHERE a.id = %s ORDER BY b.chain_seq",
        (entry_id,),
    ).fetchall()
    return [r["id"] for r in rows]


async def test_untouched_log_verifies(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """Entries of three months, varied content, verify intact; each month is reported once."""
    write(pg, details={"amount": "1.50", "nested": {"z": [1, 2.50, None]}, "é": "ü"})
    write(pg, actor_type="system", actor_id=None, park_id=None, payout_id=uuid.uuid4())
    outcome, reported = await verify(db_url)
    assert Summary(months=4, entries=20, archived=0, legacy=0) == outcome
    assert [M1, M2, M3, THIS_MONTH] == [r.month for r in reported]


async def test_database_and_verifier_agree_on_the_month_digest(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """The digest `audit verify` computes from the entries is audit_month_digest() in SQL."""
    _, reported = await verify(db_url)
    for result in reported:
        row = pg.execute("SELECT audit_month_digest(%s) AS d", (result.month,)).fetchone()
        assert row is not None
        assert row["d"] == result.digest


def test_a_press_never_waits_for_another_presses_chain(pg: Pg, db_url: str) -> None:
    """While another transaction holds a writer's own chain until it commits, the writer
    links its entry into the next chain at once instead of waiting."""
    with connect(db_url, autocommit=False) as holder, connect(db_url) as writer:
        own = write(writer)["chain_stripe"]  # each backend starts at its own chain
        holder.execute(
            "SELECT 1 FROM audit_chain_heads WHERE month = %s AND stripe = %s FOR UPDATE",
            (THIS_MONTH, own),
        )
        writer.execute("SET lock_timeout = '500ms'")
        entry = write(writer)
        holder.commit()
    assert (own + 1) % 64 == entry["chain_stripe"]


async def test_concurrent_writers_form_chains_that_verify(pg: Pg, db_url: str) -> None:
    """Three connections writing at once leave intact chains and heads that count every entry."""

    def writer() -> None:
        with connect(db_url) as c:
            for _ in range(50):
                write(c)

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcome, _ = await verify(db_url)
    assert Summary(months=1, entries=150, archived=0, legacy=0) == outcome
    row = pg.execute("SELECT sum(last_seq) AS n FROM audit_chain_heads").fetchone()
    assert row is not None
    assert 150 == row["n"]


async def test_edited_entry_is_named(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """An entry whose outcome a superuser rewrote is the first broken link."""
    target = three_months[M2][2]
    with guards_off(pg):
        pg.execute("UPDATE audit_log SET outcome = 'cooldown_active' WHERE id = %s", (target,))
    assert target == broken((await verify(db_url))[0]).entry_id


async def test_deleted_entry_is_named_at_the_next_one(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """A deleted entry in the middle of its chain breaks the link of the entry after it."""
    chain = chain_of(pg, three_months[M2][0])
    with guards_off(pg):
        pg.execute("DELETE FROM audit_log WHERE id = %s", (chain[1],))
    outcome = broken((await verify(db_url))[0])
    assert chain[2] == outcome.entry_id
    assert "missing" in outcome.reason


async def test_deleted_last_entry_is_named(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """Deleting the last entry of a chain is caught against the chain's head, which names it."""
    chain = chain_of(pg, three_months[M2][0])
    with guards_off(pg):
        pg.execute("DELETE FROM audit_log WHERE id = %s", (chain[-1],))
    assert chain[-1] == broken((await verify(db_url))[0]).entry_id


async def test_swapped_contents_are_caught(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """Two entries that swap what they say (actor, outcome) break at the first of them."""
    chain = chain_of(pg, three_months[M1][0])
    a, b = chain[0], chain[1]
    with guards_off(pg):
        pg.execute(
            "UPDATE audit_log x SET actor_id = y.actor_id, outcome = y.outcome "
            "FROM audit_log y WHERE (x.id, y.id) IN ((%s, %s), (%s, %s))",
            (a, b, b, a),
        )
    rows = pg.execute(
        "SELECT actor_id FROM audit_log WHERE id IN (%s, %s) ORDER BY id", (a, b)
    ).fetchall()
    assert ["u-3", "u-1"] == [r["actor_id"] for r in rows]  # really swapped
    assert a == broken((await verify(db_url))[0]).entry_id


@pytest.mark.parametrize("how", ["delete every row", "detach and drop"])
async def test_emptied_middle_month_is_caught(
    pg: Pg, db_url: str, three_months: dict[date, list[int]], how: str
) -> None:
    """A month emptied in the middle of the log is caught, naming its first chain's first entry."""
    if how == "delete every row":
        with guards_off(pg):
            pg.execute(f"DELETE FROM {partition(M2)}")
    else:
        pg.execute(f"ALTER TABLE audit_log DETACH PARTITION {partition(M2)}")
        pg.execute(f"DROP TABLE {partition(M2)}")
    outcome = broken((await verify(db_url))[0])
    first = pg.execute(
        "SELECT first_id FROM audit_chain_heads WHERE month = %s AND last_seq > 0 "
        "ORDER BY stripe LIMIT 1",
        (M2,),
    ).fetchone()
    assert first is not None
    assert (M2, first["first_id"]) == (outcome.month, outcome.entry_id)
    assert first["first_id"] in three_months[M2]


async def test_entry_written_with_the_chain_trigger_off_is_named(pg: Pg, db_url: str) -> None:
    """An entry a superuser slipped in with the chain trigger disabled has no link: named."""
    write(pg)
    pg.execute("ALTER TABLE audit_log DISABLE TRIGGER zz_audit_log_chain")
    try:
        forged = write(pg, outcome="ok", actor_id="someone-else")
    finally:
        pg.execute("ALTER TABLE audit_log ENABLE ALWAYS TRIGGER zz_audit_log_chain")
    assert forged["chain_hash"] is None
    assert forged["id"] == broken((await verify(db_url))[0]).entry_id


async def test_entries_older_than_the_chain_are_counted_not_failed(pg: Pg, db_url: str) -> None:
    """Unlinked entries up to the recorded legacy id (written before 0003) verify as legacy."""
    pg.execute("ALTER TABLE audit_log DISABLE TRIGGER zz_audit_log_chain")
    try:
        old = [write(pg)["id"] for _ in range(3)]
    finally:
        pg.execute("ALTER TABLE audit_log ENABLE ALWAYS TRIGGER zz_audit_log_chain")
    pg.execute("UPDATE audit_chain_legacy SET max_id = %s", (max(old),))
    write(pg)
    outcome, _ = await verify(db_url)
    assert Summary(months=1, entries=1, archived=0, legacy=3) == outcome


async def test_since_starts_at_its_month(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """--since skips the months before its own: a break there is not looked at."""
    with guards_off(pg):
        pg.execute("UPDATE audit_log SET outcome = 'x' WHERE id = %s", (three_months[M1][0],))
    outcome, reported = await verify(db_url, since=date(M2.year, M2.month, 20))
    assert Summary(months=2, entries=12, archived=0, legacy=0) == outcome
    assert [M2, M3] == [r.month for r in reported]


def test_replica_mode_does_not_switch_the_guards_off(pg: Pg) -> None:
    """Under session_replication_role = replica the append-only trigger still refuses."""
    entry = write(pg)
    pg.execute("SET session_replication_role = replica")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg.execute("DELETE FROM audit_log WHERE id = %s", (entry["id"],))


def test_cli_exits_0_when_intact_and_1_naming_the_entry(pg: Pg, db_url: str) -> None:
    """`fleet-payouts audit verify` exits 0 on an intact log, 1 naming the edited entry's id."""
    ids = [write(pg)["id"] for _ in range(3)]
    cmd = [sys.executable, "-m", "service", "audit", "verify"]
    env = {**os.environ, "DATABASE_URL": db_url}
    ok = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert 0 == ok.returncode, ok.stderr
    assert "audit verify: intact: 3 entries in 1 month" in ok.stdout
    with guards_off(pg):
        pg.execute("UPDATE audit_log SET details = '{\"x\": 1}' WHERE id = %s", (ids[1],))
    bad = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert 1 == bad.returncode, bad.stderr
    assert f"audit verify: BROKEN at entry {ids[1]} " in bad.stdout


# --- months that vanish (issue 15, break 6) -------------------------------------------


def _drop_month(pg: Pg, month: date) -> None:
    """What a superuser can do: detach and drop a month, and delete its chain heads."""
    pg.execute(f"ALTER TABLE audit_log DETACH PARTITION {partition(month)}")
    pg.execute(f"DROP TABLE {partition(month)}")
    pg.execute("DELETE FROM audit_chain_heads WHERE month = %s", (month,))


async def test_month_dropped_with_its_heads_is_named(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """A middle month detached, dropped and its chain heads deleted is named by `audit
    verify`, which exits 1."""
    _drop_month(pg, M2)
    outcome = broken((await verify(db_url))[0])
    assert (M2, None) == (outcome.month, outcome.entry_id)
    assert f"no partition of audit_log holds {M2:%Y-%m}" in outcome.reason
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert 1 == await audit_chain.run(db_url, since=None)
    assert f"audit verify: BROKEN at a month record ({M2:%Y-%m})" in out.getvalue()


async def test_first_month_dropped_after_a_verify_is_named(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """The oldest month dropped with its heads, once a verify has recorded it, is named:
    the record remembers where the log began."""
    assert isinstance((await verify(db_url))[0], Summary)
    _drop_month(pg, M1)
    assert M1 == broken((await verify(db_url))[0]).month


async def test_an_archived_or_present_month_is_not_missing(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """A month with a partition but no entries between others is not a gap."""
    with guards_off(pg):
        pg.execute(f"DELETE FROM {partition(M2)}")
    pg.execute("DELETE FROM audit_chain_heads WHERE month = %s", (M2,))
    outcome, reported = await verify(db_url)
    assert Summary(months=2, entries=12, archived=0, legacy=0) == outcome
    assert [M1, M3] == [r.month for r in reported]


# --- incremental verify (issue 18, item 10) -------------------------------------------


def _recorded(pg: Pg) -> list[tuple[date, int]]:
    rows = pg.execute("SELECT month, entries FROM audit_verified_months ORDER BY id").fetchall()
    return [(r["month"], r["entries"]) for r in rows]


async def test_incremental_verify_walks_a_closed_month_once(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """A closed month walked intact is recorded; the next incremental run reports it from
    its record (same digest and counts) and walks only the current month."""
    write(pg)
    first, walked = await verify(db_url, full=False)
    assert [(M1, 6), (M2, 6), (M3, 6)] == _recorded(pg)
    second, again = await verify(db_url, full=False)
    assert first == second == Summary(months=4, entries=19, archived=0, legacy=0)
    assert [(M1, True), (M2, True), (M3, True), (THIS_MONTH, False)] == [
        (r.month, r.verified_at is not None) for r in again
    ]
    assert [r.digest for r in walked] == [r.digest for r in again]
    assert 3 == len(_recorded(pg))  # nothing walked again, nothing recorded again


async def test_incremental_verify_walks_again_a_month_whose_heads_moved(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """An entry added to a recorded month moves its heads: the next incremental run walks
    that month again (and records it anew), not the others."""
    await verify(db_url, full=False)
    write(pg, at=mid(M2, 20))
    outcome, reported = await verify(db_url, full=False)
    assert isinstance(outcome, Summary), outcome
    assert [(M1, True), (M2, False), (M3, True)] == [
        (r.month, r.verified_at is not None) for r in reported
    ]
    assert (M2, 7) == _recorded(pg)[-1]


async def test_incremental_verify_says_a_closed_month_changed(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """A recorded month whose last entry was deleted and its chain head rewound to match (a
    superuser hiding a deletion) is walked again and reported CHANGED with the digest and
    count recorded before."""
    _, before = await verify(db_url, full=False)
    chain = chain_of(pg, three_months[M2][0])
    with guards_off(pg):
        pg.execute("DELETE FROM audit_log WHERE id = %s", (chain[-1],))
    pg.execute(
        "UPDATE audit_chain_heads h SET last_seq = a.chain_seq, last_hash = a.chain_hash, "
        "last_id = a.id FROM audit_log a WHERE a.id = %s AND h.month = %s "
        "AND h.stripe = a.chain_stripe",
        (chain[-2], M2),
    )
    outcome, reported = await verify(db_url, full=False)
    assert isinstance(outcome, Summary), outcome
    changed = next(r for r in reported if r.month == M2)
    assert changed.changed_since is not None
    was = next(r for r in before if r.month == M2)
    assert (6, was.digest) == (changed.changed_since.entries, changed.changed_since.month_digest)
    assert 5 == changed.entries
    assert "CHANGED since verified" in audit_chain._line(changed)


async def test_full_verify_walks_recorded_months_that_incremental_trusts(
    pg: Pg, db_url: str, three_months: dict[date, list[int]]
) -> None:
    """An entry of a recorded month rewritten without touching the heads (a superuser's
    edit) is named by a full walk; the incremental run trusts the record (its documented
    limit: run --full now and then)."""
    await verify(db_url, full=False)
    target = three_months[M2][2]
    with guards_off(pg):
        pg.execute("UPDATE audit_log SET outcome = 'refused' WHERE id = %s", (target,))
    assert isinstance((await verify(db_url, full=False))[0], Summary)
    assert target == broken((await verify(db_url, full=True))[0]).entry_id


def test_cli_full_flag_walks_every_month(pg: Pg, db_url: str) -> None:
    """`audit verify --full` is accepted and walks; plain `audit verify` is incremental."""
    add_month(pg, M3)
    write(pg, at=mid(M3))
    cmd = [sys.executable, "-m", "service", "audit", "verify"]
    env = {**os.environ, "DATABASE_URL": db_url}
    for _ in range(2):
        plain = subprocess.run(
            cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
    assert 0 == plain.returncode, plain.stderr
    assert "unchanged since verified" in plain.stdout
    full = subprocess.run(
        [*cmd, "--full"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert 0 == full.returncode, full.stderr
    assert "unchanged since verified" not in full.stdout


# --- one statement, many entries (issue 17, item 10) ---------------------------------

MANY = (
    "INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, details) "
    "SELECT 'admin', 'importer', 'park-' || g, 'park.update', 'ok', jsonb_build_object('n', g) "
    "FROM generate_series(1, %s) g"
)


def _head_updates(c: Pg) -> int:
    row = c.execute(
        "SELECT n_tup_upd AS n FROM pg_stat_xact_user_tables WHERE relname = 'audit_chain_heads'"
    ).fetchone()
    return int(row["n"]) if row else 0


async def test_one_statement_of_many_entries_moves_each_head_once(
    pg: Pg, app_db_url: str, db_url: str
) -> None:
    """As the app role, one INSERT of 3,000 audit rows updates its chain's head once (not
    once per row, which made such inserts quadratic), and every row verifies."""
    with connect(app_db_url, autocommit=False) as app:
        app.execute(MANY, (3000,))
        assert 1 == _head_updates(app)
        app.execute(MANY, (10,))
        assert 2 == _head_updates(app)
        app.commit()
    outcome, _ = await verify(db_url)
    assert Summary(months=1, entries=3010, archived=0, legacy=0) == outcome
    heads = pg.execute("SELECT sum(last_seq) AS n FROM audit_chain_heads").fetchone()
    assert {"n": 3010} == heads


def _partition_reads(c: Pg) -> int:
    """Rows this transaction read from this month's audit partition, by any scan."""
    row = c.execute(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) AS n "
        "FROM pg_stat_xact_user_tables WHERE relname = %s",
        (partition(THIS_MONTH),),
    ).fetchone()
    return int(row["n"]) if row else 0


async def test_linking_reads_one_entry_per_entry_whatever_the_statistics(
    pg: Pg, app_db_url: str, db_url: str
) -> None:
    """With the month's partition analyzed while it was empty (a month's first days, or an
    ANALYZE before a big batch: the periodic scan's case), one INSERT of 2,000 entries reads
    back one earlier entry per entry, not every earlier one (0009's lookup, planned as a
    sequential scan or a walk of the stripe, read ~2 million rows here and made the scan
    of 80,000 parks 7-8x its baseline); the chain still verifies."""
    pg.execute(f"ANALYZE {partition(THIS_MONTH)}")
    with connect(app_db_url, autocommit=False) as app:
        app.execute(MANY, (2000,))
        reads = _partition_reads(app)
        app.commit()
    assert reads <= 2 * 2000
    assert Summary(months=1, entries=2000, archived=0, legacy=0) == (await verify(db_url))[0]


async def test_entries_rolled_back_to_a_savepoint_leave_the_chain_whole(
    app_db_url: str, db_url: str
) -> None:
    """Entries of a statement rolled back to a savepoint leave no trace in the chain: the
    entries after them link to those before."""
    with connect(app_db_url, autocommit=False) as app:
        app.execute(MANY, (3,))
        app.execute("SAVEPOINT s")
        app.execute(MANY, (3,))
        app.execute("ROLLBACK TO SAVEPOINT s")
        app.execute(MANY, (2,))
        app.commit()
    assert Summary(months=1, entries=5, archived=0, legacy=0) == (await verify(db_url))[0]


async def test_a_cut_tail_stays_named_after_more_entries(pg: Pg, db_url: str) -> None:
    """Entries appended after a superuser deleted a chain's last entry continue from the
    head, not from the table: the gap is named at the first of them."""
    pg.execute(MANY, (3,))
    last = pg.execute("SELECT max(id) AS id FROM audit_log").fetchone()
    assert last is not None
    with guards_off(pg):
        pg.execute("DELETE FROM audit_log WHERE id = %s", (last["id"],))
    pg.execute(MANY, (2,))
    outcome = broken((await verify(db_url))[0])
    assert last["id"] + 1 == outcome.entry_id
    assert "missing" in outcome.reason


async def test_a_tail_hint_set_by_the_caller_is_ignored(app_db_url: str, db_url: str) -> None:
    """Chain-tail hints the app role sets by hand before its insert (pointing nowhere, or at
    an older entry of the chain) change no link: the entries verify."""
    with connect(app_db_url, autocommit=False) as app:
        app.execute(MANY, (3,))
        app.commit()
        old = app.execute("SELECT id, at, chain_seq FROM audit_log ORDER BY id LIMIT 1").fetchone()
        assert old is not None
        micros = int(old["at"].timestamp() * 1_000_000)
        pointers = (f"{micros}/{old['id']}", f"{micros}/{old['id']}/{old['chain_seq']}")
        for stripe in range(64):
            name = f"fleet_payouts.audit_tail_{THIS_MONTH:%Y%m}_{stripe}"
            for value in ("garbage", "1/1", "1/1/1", *pointers):
                app.execute("SELECT set_config(%s, %s, true)", (name, value))
        app.execute(MANY, (4,))
        app.commit()
    assert Summary(months=1, entries=7, archived=0, legacy=0) == (await verify(db_url))[0]
