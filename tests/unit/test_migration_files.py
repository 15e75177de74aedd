"""Migration files that migrate runs outside a transaction: one index built CONCURRENTLY each."""

from __future__ import annotations

import pytest

from service.ops.migrate import CONCURRENTLY, Migration, MigrationError, own_migrations


def test_0020_builds_the_one_index_per_billing_payout_concurrently() -> None:
    """Among migrations/, exactly 0020 runs outside a transaction, and it names its index."""
    assert {"0020_one_payout_per_billing_payout.sql": "payouts_one_per_billing_payout"} == {
        m.name: m.concurrent_index for m in own_migrations() if m.concurrent_index is not None
    }


@pytest.mark.parametrize(
    "body",
    [
        "CREATE INDEX CONCURRENTLY a ON t (x);\nCREATE INDEX CONCURRENTLY b ON t (y);",
        "CREATE INDEX a ON t (x);",
        "ALTER TABLE t ADD COLUMN x int;",
    ],
)
def test_a_concurrent_file_that_is_not_one_concurrent_index_is_refused(body: str) -> None:
    """A `-- migrate: concurrently` file holding anything but one CREATE INDEX CONCURRENTLY is
    refused by name before it runs (outside a transaction, a half-run file would stay half)."""
    migration = Migration("0099_bad.sql", f"{CONCURRENTLY}\n-- why\n{body}\n")
    with pytest.raises(MigrationError, match=r"0099_bad\.sql"):
        _ = migration.concurrent_index
