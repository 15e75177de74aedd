"""Recurring chores: a database away is one warning line a tick, anything else a traceback."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from service.core.background import Every


async def run_once(error: Exception) -> None:
    """Start a chore that fails with `error`, wait for its first run, stop it."""
    ran = asyncio.Event()

    async def chore() -> None:
        ran.set()
        raise error

    every = Every(60, chore, "gauges").start()
    async with asyncio.timeout(5):
        await ran.wait()
    await every.stop()


async def test_database_away_is_a_warning_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chore failing on an unreachable database logs one WARNING line, no traceback."""
    with caplog.at_level(logging.WARNING, logger="service.core.background"):
        await run_once(psycopg.OperationalError("connection refused"))
    records = [r for r in caplog.records if r.name == "service.core.background"]
    assert [("WARNING", None)] == [(r.levelname, r.exc_info) for r in records]
    assert "database unavailable" in records[0].getMessage()


async def test_any_other_failure_is_an_error_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chore failing for any other reason logs an ERROR with the traceback."""
    with caplog.at_level(logging.WARNING, logger="service.core.background"):
        await run_once(RuntimeError("bug"))
    records = [r for r in caplog.records if r.name == "service.core.background"]
    assert ["ERROR"] == [r.levelname for r in records]
    assert records[0].exc_info is not None
