"""The request pool's checkout and return: no probe for a connection just used, none of
its work deferred to a task (issue 21: the press's CPU and latency)."""

from __future__ import annotations

import pytest

from service.core import db
from tests.helpers.metrics import statements_sent


async def test_a_returned_connection_is_back_in_the_pool_before_the_caller_resumes(
    db_url: str,
) -> None:
    """A connection leaves `pool.connection()` straight back into the pool, with no hop
    through a pool worker task (psycopg_pool takes one whenever a reset callback is set)."""
    pool = db.make_pool(db_url, name="test-return", min_size=1, max_size=1)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        # No await between the block's end and this read: nothing else ran meanwhile.
        assert 1 == pool.get_stats()["pool_available"]
    finally:
        await pool.close()


async def test_a_connection_handed_out_again_soon_is_not_probed(db_url: str) -> None:
    """The second of two checkouts in a row sends no probe: its only statement is the caller's."""
    pool = db.make_pool(db_url, name="test-probe", min_size=1, max_size=1)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        before = statements_sent()
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert 1 == statements_sent() - before
    finally:
        await pool.close()


async def test_a_connection_idle_past_the_limit_is_probed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PROBE_AFTER_IDLE_SECONDS since it was last handed out, a checkout probes first:
    the caller's statement is the second one sent."""
    pool = db.make_pool(db_url, name="test-probe-idle", min_size=1, max_size=1)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        # Every connection counts as idle past the limit now (no sleeping in a test).
        monkeypatch.setattr(db, "PROBE_AFTER_IDLE_SECONDS", -1.0)
        before = statements_sent()
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        assert 2 == statements_sent() - before
    finally:
        await pool.close()
