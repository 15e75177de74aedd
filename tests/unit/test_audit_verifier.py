"""The audit chain's canonical form and MonthVerifier (service/audit/chain.py): no database.

The database builds the same links (migrations/0003_audit_chain.sql); that both agree is
pinned by tests/integration/test_audit_chain.py.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import pytest

from service.audit.chain import (
    Archive,
    Broken,
    Head,
    MonthResult,
    MonthVerifier,
    Row,
    canonical,
    genesis,
    month_digest,
    months,
)

MONTH = date(2026, 3, 1)
T0 = datetime(2026, 3, 5, 12, 0, tzinfo=UTC)


def chain(stripe: int, n: int, first_id: int, month: date = MONTH) -> list[Row]:
    """n linked entries of one chain, ids first_id, first_id + 2, ... (another chain may
    take the ids between)."""
    rows: list[Row] = []
    prev = genesis(month, stripe)
    for seq in range(1, n + 1):
        entry_id = first_id + 2 * (seq - 1)
        content = (
            entry_id,
            T0 + timedelta(seconds=entry_id),
            "user",
            f"user-{entry_id}",
            "park-1",
            "payout.instant.request",
            "ok",
            None,
            None,
            f'{{"n": {entry_id}}}',
        )
        link = hashlib.sha256(prev + canonical(*content, stripe, seq)).digest()
        rows.append(Row(*content, stripe, seq, link))
        prev = link
    return rows


def link_of(row: Row) -> bytes:
    """The chain hash of an entry these tests linked."""
    if row.chain_hash is None:
        raise ValueError(f"entry {row.id} has no link")
    return row.chain_hash


def heads_of(*chains: list[Row]) -> list[Head]:
    return [
        Head(c[-1].chain_stripe or 0, c[-1].chain_seq or 0, link_of(c[-1]), c[0].id, c[-1].id)
        for c in chains
    ]


def run(verifier: MonthVerifier, rows: list[Row]) -> MonthResult | Broken:
    for row in rows:
        broken = verifier.feed(row)
        if broken:
            return broken
    return verifier.finish()


def broken_at(result: MonthResult | Broken) -> int | None:
    assert isinstance(result, Broken), result
    return result.entry_id


A = chain(0, 4, first_id=1)  # ids 1, 3, 5, 7
B = chain(5, 3, first_id=2)  # ids 2, 4, 6


def test_canonical_form_is_length_prefixed_and_versioned() -> None:
    """Every field is a 4-byte big-endian length and its bytes, NULL is length -1, version first."""
    got = canonical(
        7,
        datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC),
        "user",
        None,
        "p",
        "a",
        "ok",
        None,
        UUID(int=1),
        "{}",
        3,
        9,
    )
    expected = (
        b"\x01"
        + b"\x00\x00\x00\x08" + (7).to_bytes(8, "big")
        + b"\x00\x00\x00\x08" + (1_000_005).to_bytes(8, "big")
        + b"\x00\x00\x00\x04user"
        + b"\xff\xff\xff\xff"
        + b"\x00\x00\x00\x01p"
        + b"\x00\x00\x00\x01a"
        + b"\x00\x00\x00\x02ok"
        + b"\xff\xff\xff\xff"
        + b"\x00\x00\x00\x10" + UUID(int=1).bytes
        + b"\x00\x00\x00\x02{}"
        + b"\x00\x00\x00\x02" + (3).to_bytes(2, "big")
        + b"\x00\x00\x00\x08" + (9).to_bytes(8, "big")
    )  # fmt: skip
    assert expected == got


def test_an_empty_and_a_missing_value_differ() -> None:
    """An empty string and NULL give different canonical forms (no two values share one)."""
    base = (1, T0, "user", "", "p", "a", "ok", None, None, "{}", 0, 1)
    assert canonical(*base) != canonical(*base[:3], None, *base[4:])  # type: ignore[arg-type]


def test_intact_month_verifies_and_digests_its_chain_ends() -> None:
    """Two untouched chains verify; the month digest is the one its heads give."""
    result = run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), A + B)
    assert isinstance(result, MonthResult), result
    assert (7, 0) == (result.entries, result.legacy)
    assert month_digest([(0, 4, link_of(A[-1])), (5, 3, link_of(B[-1]))]) == result.digest


def test_edited_entry_is_named() -> None:
    """An entry whose content changed is the broken link."""
    edited = list(A)
    edited[1] = A[1]._replace(outcome="refused")
    assert 3 == broken_at(run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), edited + B))


def test_deleted_entry_is_named_at_the_next_one() -> None:
    """A gap in a chain's seq names the entry after the deleted one."""
    result = run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), [A[0], *A[2:], *B])
    assert 5 == broken_at(result)
    assert isinstance(result, Broken)
    assert "missing" in result.reason


def test_deleted_tail_is_named_by_the_head() -> None:
    """The last entries of a chain gone: the head's last entry id is named."""
    assert 7 == broken_at(run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), A[:2] + B))


def test_swapped_contents_are_caught() -> None:
    """Two entries that swap everything but their place in the chain break at the first."""
    swapped = list(A)
    swapped[1] = _linked_as(A[2], A[1])
    swapped[2] = _linked_as(A[1], A[2])
    assert 5 == broken_at(run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), swapped + B))


def _linked_as(content: Row, place: Row) -> Row:
    """`content`'s entry in `place`'s position of the chain, with `place`'s link."""
    return content._replace(
        chain_stripe=place.chain_stripe,
        chain_seq=place.chain_seq,
        chain_hash=place.chain_hash,
    )


def test_a_whole_missing_chain_is_named_by_its_first_entry() -> None:
    """A chain the heads remember and the month lacks names its first entry id."""
    assert 2 == broken_at(run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), A))


def test_an_emptied_month_is_caught() -> None:
    """No entries at all where the heads count some: broken at the first chain's first id."""
    assert 1 == broken_at(run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0), []))


def test_entry_the_heads_do_not_know_is_caught() -> None:
    """An entry beyond its chain's head (written around the trigger) is named."""
    heads = [Head(0, 3, link_of(A[2]), 1, 5), *heads_of(B)]
    assert 7 == broken_at(run(MonthVerifier(MONTH, heads, legacy_max_id=0), A + B))


def test_unlinked_entries_are_legacy_only_up_to_the_recorded_id() -> None:
    """Entries without a link count as legacy up to legacy_max_id; a later one is broken."""
    legacy = A[0]._replace(chain_stripe=None, chain_seq=None, chain_hash=None)
    verifier = MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=100)
    unlinked = [legacy._replace(id=100), legacy._replace(id=101)]
    result = run(verifier, [*A, *B, *unlinked])
    assert 101 == broken_at(result)
    assert 1 == verifier.legacy


def test_archived_month_is_crossed_with_its_record() -> None:
    """A month with no entries left but an archive record matching its heads verifies."""
    digest = month_digest([(0, 4, link_of(A[-1])), (5, 3, link_of(B[-1]))])
    archive = Archive(entries=7, month_digest=digest, location="s3://audit/2026-03")
    result = run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0, archive=archive), [])
    assert isinstance(result, MonthResult), result
    assert (archive, digest) == (result.archived, result.digest)


def test_archive_record_that_does_not_match_the_heads_is_broken() -> None:
    """An archive record whose digest is not the heads' is reported."""
    archive = Archive(entries=7, month_digest=b"\x00" * 32, location="x")
    result = run(MonthVerifier(MONTH, heads_of(A, B), legacy_max_id=0, archive=archive), [])
    assert isinstance(result, Broken)
    assert "archive" in result.reason


def test_months_cross_the_year() -> None:
    """The months walked from November to February are the four in between, in order."""
    assert [date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)] == list(
        months(date(2025, 11, 17), date(2026, 2, 1))
    )


@pytest.mark.parametrize("stripe", [0, 63])
def test_genesis_differs_per_month_and_chain(stripe: int) -> None:
    """Each chain of each month starts from its own genesis hash."""
    assert genesis(MONTH, stripe) != genesis(date(2026, 4, 1), stripe)
    assert genesis(MONTH, stripe) != genesis(MONTH, stripe + 1)
